"""Quickstart: SCT tunes the digits diffusion model of configs/quickstart_edm.py into a consistency model.

Run (after the EDM quickstart, whose workdir is the teacher):
    python -m consistency_jax.main --config=configs/quickstart_edm.py --workdir=/tmp/quickstart_edm
    python -m consistency_jax.main --config=configs/quickstart_sct.py --workdir=/tmp/quickstart_sct \
        --config.method.teacher_workdir=/tmp/quickstart_edm

Everything as quickstart_ect.py (same teacher, 300 steps, optimizer, ln t ~ N(0, 2^2), q = 4 with 75-step
stages, EMA 0.99, mid sigma 4.0, so the two compare at the same step count) except SCT's variance-reduced
target: the posterior mean over the 128 digits of each batch.
Measured with /work/runs/edm_main as the teacher (18-step Heun 2.515), AVX-512 EPYC host shared with other
jobs (load ~3.5), 297 images: 1-step 54.75, 2-step 2.89 (ECT with the same recipe: 61.03 / 2.92), wall 1:31
(user 84 s). At least as good as ECT: met (the two 2-step numbers are within the +-0.15 of 297 samples).
With ECT's earlier recipe (ln t ~ N(-1.1, 2^2), q 2, 50-step stages) SCT reached 2-step 3.06 (ECT 3.88).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quickstart_ect  # noqa: E402


def get_config():
    return quickstart_ect.get_config("sct")
