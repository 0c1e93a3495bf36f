"""EDM diffusion training on CIFAR-10 (Karras et al. 2022), unconditional: the teacher of CD and ECT.

Run:
    python -m consistency_jax.main --config=configs/cifar10_edm.py --workdir=/path/to/workdir
    python -m consistency_jax.main --config=configs/cifar10_edm.py:ncsnpp --workdir=...   # the VE network

Two networks, as in EDM's train.py (NVlabs/edm, train.py --arch): 'ddpmpp'
(the default; EDM's "VP" models, 55.7M parameters, the network ECT fine-tunes)
and 'ncsnpp' (EDM's "VE" models, 56.4M; the network the consistency-model
paper distils on CIFAR-10, configs/cifar10_cd.py). Both use the EDM
preconditioning and loss (train.py --precond=edm, the default: EDMPrecond and
EDMLoss in training/networks.py and training/loss.py), the same for VP and VE.

Recipe (EDM README "exact training configurations", train.py defaults,
training/training_loop.py): batch 512, 200 Mimg = 390,625 iterations, Adam
lr 1e-3 (betas 0.9/0.999, eps 1e-8) ramped up linearly over the first 10 Mimg
(19,531 iterations), dropout 0.13, EMA with a half-life of 0.5 Mimg
(0.5^(512/500,000) = 0.999290 per iteration), ln(sigma) ~ N(-1.2, 1.2^2),
weight (sigma^2 + 0.25) / (0.5 sigma)^2, no gradient clipping (EDM only
replaces non-finite gradients), no x-flips of the dataset.
Differences from EDM, each lowering quality somewhat:
- EDM's non-leaking augmentation pipeline (--augment=0.12, with the
  augmentation labels fed to the network) is not implemented here.
- EDM ramps the EMA half-life up to 0.05 x the images seen so far; here the
  EMA rate is constant from the start (it matters only early in training).

Sampling: EDM's deterministic Heun sampler with 18 noise levels (rho 7,
sigma 80 -> 0.002, then 0): 35 network evaluations (EDM generate.py defaults).

Published FID (50k samples, unconditional, 35 evaluations): 1.97 for the VP
network (EDM paper Table 2 and README abstract; the minimum of three FID
evaluations), 1.98 for VE (paper Table 2). SPEC section 1 quotes 2.01 for VP
(source not recorded there: unconfirmed).

Hardware: EDM trained each CIFAR-10 model on 8 V100 GPUs in about 2 days
(EDM README). Here expect the same order on 8 A100/H100 GPUs in float32; use
--config.model.dtype=bfloat16 to go faster.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default  # noqa: E402  (configs are exec'd by path, not imported as a package)
from cifar10_ict import ncsnpp_model  # noqa: E402

import ml_collections  # noqa: E402

from consistency_jax import methods  # noqa: E402

NETWORKS = ("ddpmpp", "ncsnpp")


def edm_network(arch: str, dropout: float) -> ml_collections.ConfigDict:
    """EDM's SongUNet for CIFAR-10: 'ddpmpp' (VP) or 'ncsnpp' (VE), as train.py --arch sets it up."""
    if arch not in NETWORKS:
        raise ValueError(f"Unknown network {arch!r} (configs/cifar10_edm.py:<network>); valid: {', '.join(NETWORKS)}.")
    model = ncsnpp_model(num_res_blocks=4)  # 128 channels, (2, 2, 2), attention at 16x16
    model.dropout = dropout
    # EDM's FourierEmbedding scale 16 on c_noise = ln(sigma) / 4.
    model.fourier_scale = 16.0
    if arch == "ddpmpp":  # positional noise embedding, no progressive input, [1, 1] resampling
        model.embedding_type = "positional"
        model.progressive_input = "none"
        model.resample_filter = (1, 1)
    return model


def get_config(network: str = "ddpmpp") -> ml_collections.ConfigDict:
    config = default.get_config()

    config.method = methods.method_config("edm")
    config.method.p_mean = -1.2
    config.method.p_std = 1.2

    config.parametrization.sigma_min = 0.002
    config.parametrization.sigma_max = 80.0
    config.parametrization.sigma_data = 0.5
    config.parametrization.rho = 7.0
    config.parametrization.c_noise = "edm"  # ln(sigma) / 4

    config.model = edm_network(network or "ddpmpp", dropout=0.13)

    config.data.name = "cifar10"
    config.data.image_size = 32
    config.data.num_channels = 3
    config.data.num_classes = 0
    config.data.random_flip = False

    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    config.optimizer.warmup_steps = 19_531  # 10 Mimg at batch 512
    config.optimizer.lr_schedule = "constant"
    config.optimizer.grad_clip_norm = 0.0

    config.training.batch_size = 512
    config.training.num_steps = 390_625  # 200 Mimg
    config.training.ema_rates = (0.5 ** (512 / 500_000),)  # half-life 0.5 Mimg: 0.999290
    config.training.log_every = 100
    config.training.sample_every = 10_000
    config.training.checkpoint_every = 10_000
    config.training.keep_every = 50_000

    config.sampling.num_steps = 18  # Heun: 35 network evaluations
    config.eval.feature_extractor = "inception"
    config.eval.num_samples = 50_000
    config.eval.steps = (18,)
    return config
