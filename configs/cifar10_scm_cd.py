"""sCD on CIFAR-10: continuous-time consistency distillation (Lu & Song 2024) of a TrigFlow diffusion model.

Run (two stages):
    python -m consistency_jax.main --config=configs/cifar10_trigflow.py --workdir=/path/to/trigflow_cifar10
    python -m consistency_jax.main --config=configs/cifar10_scm_cd.py --workdir=/path/to/scd_cifar10 \\
        --config.method.teacher_workdir=/path/to/trigflow_cifar10

Published FID (50k samples, table 1): 1-step 3.66, 2-step 2.52 (t_mid = 1.1). FastGen's
sCD from the EDM checkpoint: 1-step 3.22.

Recipe: cifar10_scm_ct.py's (appendix G.2: RAdam 1e-4, betas (0.9, 0.99), batch 512,
ln(sd tan t) ~ N(-1.0, 1.4^2), c = 0.1, 10k warm-up, adaptive weighting, EMA half-life
0.5 Mimg) with dropout disabled; the PF-ODE dx_t/dt = sd F_teacher(x_t / sd, t) comes from
the frozen teacher's EMA params, kept in the train state, and the student starts from them.

Unconfirmed: iterations (not in the paper for CIFAR-10; FastGen's sCD config: 500k at
batch 512); flips. FastGen's alternative (the converted EDM checkpoint as teacher): see
cifar10_scm_ct.py. References: as cifar10_scm_ct.py, plus FastGen's
fastgen/configs/experiments/EDM/config_scd_cifar10.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cifar10_scm_ct  # noqa: E402  (configs are exec'd by path, not imported as a package)

import ml_collections  # noqa: E402


def get_config() -> ml_collections.ConfigDict:
    return cifar10_scm_ct.get_config(method="scm_cd", dropout=0.0)
