"""Quickstart: SCT tunes the digits diffusion model of configs/quickstart_edm.py into a consistency model.

Run (after the EDM quickstart, whose workdir is the teacher):
    python -m consistency_jax.main --config=configs/quickstart_edm.py --workdir=/tmp/quickstart_edm
    python -m consistency_jax.main --config=configs/quickstart_sct.py --workdir=/tmp/quickstart_sct \
        --config.method.teacher_workdir=/tmp/quickstart_edm

TUNING: numbers to be filled in.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quickstart_ect  # noqa: E402


def get_config():
    return quickstart_ect.get_config("sct")
