"""Quickstart: consistency distillation (CD) of the EDM digits quickstart, on a laptop CPU in a few minutes.

Run (after training the teacher with configs/quickstart_edm.py):
    python -m consistency_jax.main --config=configs/quickstart_cd.py --workdir=/tmp/quickstart_cd \\
        --config.method.teacher_workdir=/tmp/quickstart_edm

TUNING: numbers to be filled in.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quickstart_edm  # noqa: E402

from consistency_jax import methods  # noqa: E402


def get_config():
    # The teacher's network, data and parametrization: the student starts from the teacher's params.
    config = quickstart_edm.get_config()
    config.method = methods.method_config("cd")
    config.method.num_scales = 18
    config.method.target_ema = 0.0
    config.method.solver = "heun"
    config.method.distance = "l2"
    config.method.weighting = "uniform"
    config.method.init_from_teacher = True

    config.optimizer.name = "radam"
    config.optimizer.learning_rate = 4e-4
    config.optimizer.lr_schedule = "constant"

    config.training.num_steps = 500
    config.training.ema_rates = (0.99,)

    config.sampling.num_steps = 1
    config.sampling.mid_sigma = 0.821
    config.eval.steps = (1, 2)
    return config
