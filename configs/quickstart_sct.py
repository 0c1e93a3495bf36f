"""Quickstart: SCT tunes the digits diffusion model of configs/quickstart_edm.py into a consistency model.

Run (after the EDM quickstart, whose workdir is the teacher):
    python -m consistency_jax.main --config=configs/quickstart_edm.py --workdir=/tmp/quickstart_edm
    python -m consistency_jax.main --config=configs/quickstart_sct.py --workdir=/tmp/quickstart_sct \
        --config.method.teacher_workdir=/tmp/quickstart_edm

Everything as quickstart_ect.py (same teacher, steps and optimizer, so the two compare at the same step
count) except SCT's variance-reduced target: the posterior mean over the 128 digits of each batch.
Measured with /work/runs/edm_quickstart as the teacher (AVX-512 EPYC host, shared, load average 10-17; not
under the timing lock, which other quickstarts held), 300 steps, EMA 0.99, 297 images, the command above with
--workdir=/tmp/quickstart_sct_ecttune: 1-step 79.84, 2-step 13.29 through sigma 0.821 and 3.17 through 4.0 (the
config's value since; ECT with the same recipe: 84.65 / 13.81 / 3.85),
wall 6:39 (user 116 s). Within the issue's target (2-step <= 3.82); see quickstart_ect.py. Earlier, on a
development teacher, SCT was the more stable of the two at lr 2e-3.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quickstart_ect  # noqa: E402


def get_config():
    return quickstart_ect.get_config("sct")
