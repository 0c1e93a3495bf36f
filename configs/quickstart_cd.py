"""Quickstart: consistency distillation (CD) of the EDM digits quickstart, on a laptop CPU in a few minutes.

Run (after training the teacher with configs/quickstart_edm.py):
    python -m consistency_jax.main --config=configs/quickstart_cd.py --workdir=/tmp/quickstart_cd \\
        --config.method.teacher_workdir=/tmp/quickstart_edm

Without --config.method.teacher_workdir the run stops at start saying which
flag and which run to give.

Hardware: any CPU. Expected: 500 CD steps at batch 128 (the student starts
from the teacher's params; each step also runs two teacher evaluations for
the Heun step), then the evaluation; about 3 minutes on a 2-core AVX-512 CPU (189 s of
CPU time; up to 10 on a slow AVX2 one).
Expected report (297 images, digits features): 1-step about 3.3, 2-step
(sigma 80 -> 0.821) about 3.0, against 1.89 for held-out real digits (the
floor): within 2.5x (1-step) and 2x (2-step) of the floor.
MEASURED (teacher /work/runs/edm_quickstart, 18-step Heun 2.55): 1-step
3.27 (1.73x the floor), 2-step 3.01 (1.60x); the command above under
flock, 7:20 wall (42% of a CPU) on a host loaded 9-14 by other jobs (see the README section "EDM, CT and CD").

Settings: the CM paper's CIFAR-10 CD (methods/ct.py): N = 18, one Heun step
of the teacher, uniform interval index and weighting, l2 distance, target =
the student under stop-gradient (mu = 0), RAdam, no warm-up; evaluation EMA
0.99 for a short run. Tuning (this host, under load, teacher 2.55):
lr 4e-4 (the paper's): 1-step 4.30, 2-step 3.84 (2-step target missed);
lr 1e-3: 1-step 3.27, 2-step 3.01.
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
    config.optimizer.learning_rate = 1e-3
    config.optimizer.lr_schedule = "constant"

    config.training.num_steps = 500
    config.training.ema_rates = (0.99,)

    config.sampling.num_steps = 1
    config.sampling.mid_sigma = 0.821
    config.eval.steps = (1, 2)
    return config
