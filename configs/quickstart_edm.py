"""Quickstart: an EDM diffusion model on scikit-learn's 8x8 digits (the teacher of the CD quickstart).

Run:
    python -m consistency_jax.main --config=configs/quickstart_edm.py --workdir=/tmp/quickstart_edm

Hardware: any CPU. Expected: 1,200 EDM steps at batch 128 with a 0.33M-parameter
NCSN++, then the evaluation; about 3 to 3.5 minutes on a 2-core AVX-512 CPU
(up to 10 on a slow AVX2 one); see MEASURED below.
Expected report: Frechet distance (digits features, 297 images) of EDM's
Heun sampler (18 noise levels = 35 network evaluations) about 2.5-2.8,
against 1.89 for held-out real digits (the floor) and 257 for the untrained
network (the ceiling): within 1.5x of the floor.
MEASURED: 2.55 (1.35x the floor), 5:42 wall under a load of 7-12 from other
jobs (203 s CPU); see the README section "EDM, CT and CD".

Settings: EDM's loss and preconditioning (methods/edm.py; ln sigma ~ N(-1.2,
1.2^2), sigma_data 0.5), EDM's deterministic Heun sampler. For a short run:
Adam lr 2e-3 with a cosine decay to 0, gradient clipping at 1, an evaluation
EMA of 0.99 (0.995 and 0.998 measured worse: 2.82 and 3.46 at 1,200 steps).
Tuning on this host (FID of 297 samples moves by about +-0.15 between
settings that should be equal): 32 channels, 1,000 steps: 2.49 but twice the
compute; 24 channels, 1,000 steps: 2.92; 16 channels, constant lr: 2.58 at
1,000, 2.75 at 1,200, 2.73 at 1,500 steps; 16 channels, cosine, 1,200: 2.66.

The trained workdir is the teacher of configs/quickstart_cd.py
(--config.method.teacher_workdir=<this workdir>).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default  # noqa: E402

from consistency_jax import methods  # noqa: E402


def get_config():
    config = default.get_config()
    config.method = methods.method_config("edm")
    config.data.name = "digits"
    config.data.image_size = 8
    config.data.num_channels = 1

    # A small NCSN++ (0.33M parameters): 8x8 -> 4x4 -> 2x2, attention at 2x2.
    config.model.model_channels = 16
    config.model.channel_mult = (1, 2, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (2,)
    config.model.dropout = 0.0
    config.model.embedding_type = "fourier"
    # c_noise = ln(sigma) / 4 spans [-1.6, 1.1]; scale 1 spreads the Fourier phases over it.
    config.model.fourier_scale = 1.0

    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_steps = 0
    config.optimizer.lr_schedule = "cosine"  # to 0 at the end: a short run's last weights are its best
    config.optimizer.grad_clip_norm = 1.0

    config.training.batch_size = 128
    config.training.num_steps = 1200
    config.training.ema_rates = (0.99,)
    config.training.log_every = 100
    config.training.sample_every = 0
    config.training.checkpoint_every = 600

    config.sampling.num_samples = 256
    config.sampling.batch_size = 297  # one sampler batch per evaluation row
    config.sampling.num_steps = 18  # Heun: 18 noise levels = 35 network evaluations

    config.eval.feature_extractor = "digits"
    config.eval.num_samples = 297  # the size of the held-out real split
    config.eval.steps = (18,)
    return config
