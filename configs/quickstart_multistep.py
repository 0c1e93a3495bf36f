"""Quickstart: multistep consistency training (CT, no teacher) on scikit-learn's 8x8 digits.

Run:
    python -m consistency_jax.main --config=configs/quickstart_multistep.py --workdir=/tmp/quickstart_multistep

TUNING: numbers to be filled in.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quickstart  # noqa: E402

from consistency_jax import methods  # noqa: E402


def get_config():
    config = quickstart.get_config()  # digits, the small NCSN++, RAdam, the quality report
    config.method = methods.method_config("multistep_ct")
    config.method.segments = 8
    config.method.teacher_steps_start = 64
    config.method.teacher_steps_end = 1280
    config.method.anneal_steps = 500

    config.training.num_steps = 1000
    config.training.ema_rates = (0.99,)
    config.training.sample_every = 500

    config.sampling.num_steps = 8
    config.eval.steps = (1, 2, 4, 8)
    return config
