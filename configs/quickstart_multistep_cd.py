"""Quickstart: multistep consistency distillation (CD) of the EDM digits quickstart's diffusion model.

Run (the teacher first, then the student; the teacher's workdir is read-only to the student):
    python -m consistency_jax.main --config=configs/quickstart_edm.py --workdir=/tmp/quickstart_edm
    python -m consistency_jax.main --config=configs/quickstart_multistep_cd.py --workdir=/tmp/quickstart_multistep_cd \
        --config.method.teacher_workdir=/tmp/quickstart_edm

Expected report (Frechet distance, digits features, 297 images, EMA 0.99), measured on the AVX-512 2-core host
at step 1000 with the teacher /work/runs/edm_quickstart (quickstart_edm.py, 18-step Heun 2.55):
    S = 1, 2, 4, 8 steps: 98.1, 15.2, 3.59, 1.87;  held-out floor (real_test) 1.89;  untrained 257.3
8 steps is at the floor (0.99x; target <= 1.5x). Wall 23 min under a load of 9-17 from other jobs (not a
timing; training 1.7-3.3 steps/s when the host was less busy).
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
    return config
