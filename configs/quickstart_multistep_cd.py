"""Quickstart: multistep consistency distillation (CD) of the EDM digits quickstart's diffusion model.

Run (the teacher first, then the student; the teacher's workdir is read-only to the student):
    python -m consistency_jax.main --config=configs/quickstart_edm.py --workdir=/tmp/quickstart_edm
    python -m consistency_jax.main --config=configs/quickstart_multistep_cd.py --workdir=/tmp/quickstart_multistep_cd \
        --config.method.teacher_workdir=/tmp/quickstart_edm

TUNING: numbers to be filled in.
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
