"""Consistency distillation (CD) on CIFAR-10 (Song et al. 2023, "Consistency models") from an EDM teacher.

Run (the teacher: a trained EDM NCSN++, see below):
    python -m consistency_jax.main --config=configs/cifar10_cd.py --workdir=/path/to/workdir \\
        --config.method.teacher_workdir=/path/to/edm_ncsnpp_workdir

Teacher: an EDM-trained NCSN++ (EDM's "VE" network), the network the student
starts from. Either train it here with configs/cifar10_edm.py:ncsnpp (the CM
JAX code trains its own teacher the same way: configs/cifar10_k_ve.py, EDM
loss, batch 512, Adam 1e-3 with a 10 Mimg warm-up, dropout 0.13, EMA
half-life 0.5 Mimg, 400k iterations), or convert NVIDIA's
edm-cifar10-32x32-uncond-ve.pkl (python -m consistency_jax.convert, see the
README). The teacher's first EMA is distilled (method.teacher_ema_rate = -1;
CM-JAX distils the teacher's params_ema).

Recipe: the CM JAX code's CIFAR-10 CD run (openai/consistency_models_cifar10:
configs/cifar10_ve_cd.py, launch.sh), which matches the paper's table:
- N = 18 fixed, one Heun step of the teacher's probability-flow ODE from
  sigma_{i+1} to sigma_i, interval index uniform, weighting uniform;
- target = the student itself under stop-gradient (mu = 0: the CM-JAX
  'consistency' loss has no target EMA, get_ema_scales_fn returns None);
- the student and its evaluation EMA start from the teacher's params
  (finetune=True); dropout 0 in the student, none in the teacher;
- RAdam lr 4e-4 (launch.sh, for both l2 and LPIPS), betas 0.9/0.999, eps 1e-8,
  no warm-up (CM-JAX's RAdam ignores optim.warmup), no gradient clipping;
  batch 512; 800k iterations; evaluation EMA 0.9999; random horizontal flips.
Distance: the paper's best CD uses LPIPS, which needs VGG weights that cannot
be fetched here; this config uses 'l2' (CM code: mean squared difference over
the image), the paper's L_CD with l2.

Published FID (CM paper Table 1, LPIPS): 1-step 3.55, 2-step 2.93. The l2
variant's FID appears only in the paper's ablation figures (higher than
LPIPS; no number: unconfirmed). The 2-step intermediate sigma of the paper was
found by a search and is not published for CIFAR-10; sampling.mid_sigma = 0.821
is iCT's (unconfirmed).

Hardware: not stated in the CM paper for this row (unconfirmed). Cost per
iteration ~5 forward-pass equivalents of 40.4 GFLOP per image (student forward
+ backward, target forward, 2 teacher evaluations of the Heun step) x 512 x
800k = 8.3e19 FLOP: about a day at a sustained 1 PFLOP/s.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default  # noqa: E402  (configs are exec'd by path, not imported as a package)
from cifar10_ct import cm_cifar10_training  # noqa: E402

import ml_collections  # noqa: E402

from consistency_jax import methods  # noqa: E402


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.method = methods.method_config("cd")
    config.method.num_scales = 18
    config.method.target_ema = 0.0
    config.method.solver = "heun"
    config.method.distance = "l2"  # the paper's best: LPIPS (not available)
    config.method.weighting = "uniform"
    config.method.init_from_teacher = True
    config.method.teacher_step = -1  # the teacher's latest checkpoint
    config.method.teacher_ema_rate = -1.0  # its first EMA
    cm_cifar10_training(config, learning_rate=4e-4)
    return config
