"""Quickstart: ECT tunes the digits diffusion model of configs/quickstart_edm.py into a consistency model.

Run (after the EDM quickstart, whose workdir is the teacher):
    python -m consistency_jax.main --config=configs/quickstart_edm.py --workdir=/tmp/quickstart_edm
    python -m consistency_jax.main --config=configs/quickstart_ect.py --workdir=/tmp/quickstart_ect \
        --config.method.teacher_workdir=/tmp/quickstart_edm

TUNING: numbers to be filled in.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default  # noqa: E402
import quickstart_edm  # noqa: E402

from consistency_jax import methods  # noqa: E402


def get_config(method_name: str = "ect"):
    config = default.get_config()
    teacher = quickstart_edm.get_config()
    config.method = methods.method_config(method_name)
    config.method.p_mean = -1.1
    config.method.p_std = 2.0
    config.method.q = 2.0
    config.method.stage_steps = 50
    config.method.huber_c = 0.0
    config.method.weighting = "inverse_gap"
    config.method.boundary = "sampling"

    # The teacher's data and network (the student starts from its params); its parametrization too.
    config.data = teacher.data
    config.model = teacher.model
    config.parametrization = teacher.parametrization

    config.optimizer.name = "radam"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 0
    config.optimizer.grad_clip_norm = 1.0

    config.training.batch_size = 128
    config.training.num_steps = 250
    config.training.ema_rates = (0.99,)
    config.training.log_every = 50
    config.training.sample_every = 0
    config.training.checkpoint_every = 250

    config.sampling.num_samples = 256
    config.sampling.num_steps = 1
    config.sampling.mid_sigma = 0.821

    config.eval.feature_extractor = "digits"
    config.eval.num_samples = 297  # the size of the held-out real split
    config.eval.steps = (1, 2)
    return config
