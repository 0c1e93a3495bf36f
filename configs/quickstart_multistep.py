"""Quickstart: multistep consistency training (CT, no teacher) on scikit-learn's 8x8 digits.

Run:
    python -m consistency_jax.main --config=configs/quickstart_multistep.py --workdir=/tmp/quickstart_multistep

Expected report (Frechet distance, digits features, 297 images, EMA 0.99, reference = training set): the
docstring command in a fresh workdir, alone on a quiet 2-core AVX-512 AMD EPYC (flock, load 1.7-1.8),
2026-11-26 23:13 UTC, 600 steps (the teacher steps anneal 64 -> 1280 over the first 300):
    S = 1, 2, 4, 8 steps: 103.2, 11.08, 2.99, 1.64;  held-out floor (real_test) 1.89;  untrained 257.3
Wall 2:19 (peak RSS 2.0 GB; the host split into 2 CPU devices, configs/quickstart.py), about 7 min on an
AVX2-only host. 1,000 steps (the previous setting, 3:31 here) gave 107.5, 10.9, 2.40, 1.25.
The distance falls from 1 to 4 steps and 8 steps is near the floor (0.87x; target <= 1.5x). One step is
poor by design: the model has S = 8 segments and the 1-, 2- and 4-step rows run it on coarser grids (the
paper trains one model per S).
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
    config.method.anneal_steps = 300

    config.training.num_steps = 600
    config.training.ema_rates = (0.99,)
    config.training.sample_every = 300

    config.sampling.num_steps = 8
    config.eval.steps = (1, 2, 4, 8)
    return config
