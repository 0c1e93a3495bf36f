"""Multistep consistency training (CT) on class-conditional ImageNet 64x64 (Heek, Hoogeboom & Salimans 2024).

Run (S = number of segments = sampling steps; the text after ':' sets it, default 8):
    python -m consistency_jax.main --config=configs/imagenet64_multistep_ct.py:8 --workdir=/path/to/workdir \
        --config.method.teacher_workdir=/path/to/edm_imagenet64_converted

The paper starts every run from a pretrained diffusion model ("we initialize the consistency models from
the pre-trained diffusion model weights which we found to greatly increase robustness and convergence"):
teacher_workdir here is only that initialisation (an EDM ImageNet-64 ADM checkpoint converted with
`python -m consistency_jax.convert`, or a diffusion run of this framework). Without it, training starts
from random weights, which the paper did not report.

Published FID (50k samples, the paper's Table 1, small 394M-parameter UViT, multistep CT; S-step model
sampled with S steps): S = 1: 7.2, 2: 2.7, 4: 1.8, 8: 1.5, 16: 1.5 (large 1.23B UViT: 6.4, 2.3, 1.6, 1.5,
1.6). The aDDIM sampler on the base diffusion model: 1.5 at 512 steps. Each S is its own training run.

From the paper (arXiv 2403.06807v3, Algorithm 1 and appendix A.1): batch 2048, 200k steps, teacher steps
annealed exponentially from 64 to 1280 over 100k steps, pseudo-Huber "epsilon" 1e-4, weight SNR(t) + 1.
The paper's network is a UViT that this framework does not have; this config uses EDM's ImageNet-64 ADM
(imagenet64_ict.adm_model, 296M parameters), so that EDM's public checkpoint can be the initialisation,
and the numbers above are the paper's network's, not this config's.

Unconfirmed (the paper does not say, or no code was published): optimizer and learning rate (Adam, lr
1e-4 here, for fine-tuning), EMA rate 0.9999, dropout 0.1 (EDM's ADM trained with it; the paper's UViT
used 0.2 in its middle blocks),
the schedule's truncation (sigma in [0.002, 80], EDM's range, so that the EDM initialisation is queried
where it was trained), the pseudo-Huber norm ('rms', see methods/multistep.py), no random flips. The
paper's schedule is "an interpolated cosine schedule from noise resolution 32 to 64", which it calls
practically identical to the cosine schedule used here (logsnr_shift = 0).

Hardware: the paper trains the small model on 64 TPUv5e chips at 2.7 steps/s (CT): 200k steps in about
21 hours. Cost here: 2 forward + 1 backward ADM passes per image per step (~3 x 210.7 GFLOP), 200k * 2048
* 632 GFLOP = 2.6e20 FLOP: about 3 days at a sustained 1 PFLOP/s.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default  # noqa: E402  (configs are exec'd by path, not imported as a package)
import imagenet64_ict  # noqa: E402

import ml_collections  # noqa: E402

from consistency_jax import methods  # noqa: E402


def get_config(segments: str = "8", method: str = "multistep_ct") -> ml_collections.ConfigDict:
    """The text after ':' in --config=...py:S is the number of segments S (student steps)."""
    segments = int(segments)
    config = default.get_config()
    config.method = methods.method_config(method)
    config.method.segments = segments
    config.method.teacher_steps_start = 64
    config.method.teacher_steps_end = 1280
    config.method.anneal_steps = 100_000
    config.method.huber_eps = 1e-4
    config.method.weighting = "snr_plus_one"

    # EDM's range and c_noise (EDMPrecond feeds ln(sigma) / 4): the converted EDM network's own settings.
    config.parametrization.sigma_min = 0.002
    config.parametrization.sigma_max = 80.0
    config.parametrization.sigma_data = 0.5
    config.parametrization.c_noise = "edm"

    config.data.name = "imagenet_resized/64x64"
    config.data.image_size = 64
    config.data.num_channels = 3
    config.data.num_classes = 1000
    config.data.random_flip = False

    # Must be the initialisation's network (the run stops at start with the differing arrays otherwise).
    config.model = imagenet64_ict.adm_model(config, num_res_blocks=3)
    config.model.dropout = 0.1

    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-4
    config.optimizer.lr_schedule = "constant"

    config.training.batch_size = 2048
    config.training.num_steps = 200_000
    config.training.ema_rates = (0.9999,)
    config.training.log_every = 100
    config.training.sample_every = 10_000
    config.training.checkpoint_every = 5_000
    config.training.keep_every = 50_000

    config.sampling.num_steps = segments
    config.eval.feature_extractor = "inception"
    config.eval.num_samples = 50_000
    config.eval.steps = (segments,)
    return config
