"""Quickstart: multistep consistency training (CT, no teacher) on scikit-learn's 8x8 digits.

Run:
    python -m consistency_jax.main --config=configs/quickstart_multistep.py --workdir=/tmp/quickstart_multistep

Expected report (Frechet distance, digits features, 297 images, EMA 0.99, reference = training set), measured
on the AVX-512 2-core host at step 1000 (the untimed development run with this exact config; under a load of
~18 from other jobs it took 33 min, 0.6 steps/s, so the time says nothing; a quiet host runs the base
quickstart at ~4.8 steps/s, i.e. ~3.5 min of training plus compile and evaluation):
    S = 1, 2, 4, 8 steps: 107.0, 10.5, 2.05, 1.10;  held-out floor (real_test) 1.89;  untrained 257.3
The distance falls from 1 to 4 steps and 8 steps is below the floor (0.58x; target <= 1.5x). One step is
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
    config.method.anneal_steps = 500

    config.training.num_steps = 1000
    config.training.ema_rates = (0.99,)
    config.training.sample_every = 500

    config.sampling.num_steps = 8
    config.eval.steps = (1, 2, 4, 8)
    return config
