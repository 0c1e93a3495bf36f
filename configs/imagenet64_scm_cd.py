"""sCD on class-conditional ImageNet 64x64 (Lu & Song 2024): distilling a TrigFlow diffusion model of the same network.

Run:
    python -m consistency_jax.main --config=configs/imagenet64_scm_cd.py --workdir=/path/to/scd_in64 \\
        --config.method.teacher_workdir=/path/to/trigflow_in64

Published FID (50k samples, table 7; t_mid = 1.1): sCD-S (280M) 1-step 2.97, 2-step 2.07;
M 2.79 / 1.89; L 2.43 / 1.70; XL (1.1B) 2.44 / 1.66 (the table-1 entry). No guidance on
ImageNet 64 (the guidance-scale input is the 512x512 models').

Recipe: imagenet64_scm_ct.py's (table 4: batch 2048, Adam 1e-4 (S) with the 35k-step
rsqrt decay, betas (0.9, 0.99), eps 1e-11, ln(sd tan t) ~ N(-1.0, 1.6^2), c = 0.1, 10k
warm-up, adaptive weighting, 400k iterations) with no dropout; the PF-ODE comes from the
frozen teacher's EMA (kept in the train state) and the student starts from it. The same
network caveat as imagenet64_scm_ct.py: ADM with the TrigFlow changes, not EDM2.

FastGen's alternative (fastgen/configs/experiments/EDM/config_scd_in64.py), runnable with
NVIDIA's EDM ImageNet-64 ADM checkpoint converted by `python -m consistency_jax.convert`:
--config.method.time_conditioning=edm, config.model = the teacher's ADM (no adaptive
double normalisation, dropout 0), lr 7e-5, batch 1024, 600k iterations, gradient clipping 10,
bf16 with float32 JVP; FastGen puts its 2-step point at EDM sigma 1.1 (t = 1.144).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import imagenet64_scm_ct  # noqa: E402  (configs are exec'd by path, not imported as a package)

import ml_collections  # noqa: E402


def get_config() -> ml_collections.ConfigDict:
    return imagenet64_scm_ct.get_config(method="scm_cd", dropout=0.0)
