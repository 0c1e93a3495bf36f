"""Multistep consistency distillation (CD) on class-conditional ImageNet 64x64 (Heek, Hoogeboom & Salimans 2024).

Run (S = number of segments = sampling steps; the text after ':' sets it, default 8):
    python -m consistency_jax.main --config=configs/imagenet64_multistep_cd.py:8 --workdir=/path/to/workdir \
        --config.method.teacher_workdir=/path/to/edm_imagenet64_converted

The teacher (required) is a diffusion model: EDM's ImageNet-64 ADM checkpoint converted with
`python -m consistency_jax.convert`, or a diffusion run of this framework. It is frozen in the train state
(a resumed run never reads it again), takes each teacher step with aDDIM (xvar_frac 0.75), and, as in the
paper, also initialises the student (init_from_teacher).

Published FID (50k samples, the paper's Table 1, small 394M-parameter UViT, multistep CD; S-step model
sampled with S steps): S = 1: 4.3, 2: 2.0, 4: 1.7, 8: 1.6, 16: 1.5 (large 1.23B UViT: 3.2, 1.9, 1.6, 1.4,
1.4; the abstract's "1.4 FID on ImageNet64 in 8 steps"). The teacher (aDDIM, 512 steps): 1.5 (small),
1.4 (large). Each S is its own training run.

Everything else as imagenet64_multistep_ct.py (see its docstring for what the paper gives and what is
unconfirmed; in particular the numbers above are the paper's UViT's, and this config uses EDM's ADM).

Hardware: the paper trains the small model on 64 TPUv5e chips at 2.5 steps/s (CD): 200k steps in about
22 hours. Cost here: one teacher forward more than CT, ~4 x 210.7 GFLOP per image per step: 3.5e20 FLOP,
about 4 days at a sustained 1 PFLOP/s.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import imagenet64_multistep_ct  # noqa: E402  (configs are exec'd by path, not imported as a package)

import ml_collections  # noqa: E402


def get_config(segments: str = "8") -> ml_collections.ConfigDict:
    """The text after ':' in --config=...py:S is the number of segments S (student steps)."""
    config = imagenet64_multistep_ct.get_config(segments, method="multistep_cd")
    config.method.xvar_frac = 0.75  # the paper's "xvar_frac of 0.75 for aDDIM"
    return config
