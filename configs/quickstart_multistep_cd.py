"""Quickstart: multistep consistency distillation (CD) of the EDM digits quickstart's diffusion model.

Run (the teacher first, then the student; the teacher's workdir is read-only to the student):
    python -m consistency_jax.main --config=configs/quickstart_edm.py --workdir=/tmp/quickstart_edm
    python -m consistency_jax.main --config=configs/quickstart_multistep_cd.py --workdir=/tmp/quickstart_multistep_cd \
        --config.method.teacher_workdir=/tmp/quickstart_edm

Expected report (Frechet distance, digits features, 297 images, EMA 0.99): the commands above in fresh
workdirs, alone on a quiet 2-core AVX-512 AMD EPYC (flock, load 1.7-2.0), 2026-11-26 23:20-23:31 UTC; the
teacher's 18-step Heun distance 2.515; 600 steps (teacher steps annealed over the first 300):
    S = 1, 2, 4, 8 steps: 89.9, 16.5, 4.00, 1.94;  held-out floor (real_test) 1.89;  untrained 257.3
8 steps is at the floor (1.03x; target <= 1.5x); the distance falls from 1 to 4 steps. Wall 1:37 for the
student (peak RSS 2.0 GB), after the teacher's 1:58; 1,000 steps (an older teacher, Heun 2.55) gave
98.1, 15.2, 3.59, 1.87.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quickstart_edm  # noqa: E402
import quickstart_multistep  # noqa: E402

from consistency_jax import methods  # noqa: E402


def get_config():
    config = quickstart_multistep.get_config()
    ct_fields = config.method
    config.method = methods.method_config("multistep_cd")
    for name in ("segments", "teacher_steps_start", "teacher_steps_end", "anneal_steps"):
        config.method[name] = ct_fields[name]
    config.method.xvar_frac = 0.75
    # The teacher's data, network and parametrization: the student starts from the teacher's params.
    teacher = quickstart_edm.get_config()
    config.data = teacher.data
    config.model = teacher.model
    config.parametrization = teacher.parametrization
    # One CPU device, as the teacher: this network ran slower split over two
    # (the command took 1:49 against 1:37 on a quiet 2-core host).
    config.mesh = teacher.mesh
    return config
