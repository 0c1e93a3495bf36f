"""Quickstart: ACT on scikit-learn's 8x8 digits, at a quarter of the iCT quickstart's batch.

Run:
    python -m consistency_jax.main --config=configs/quickstart_act.py --workdir=/tmp/quickstart_act

What it is: ACT (methods/act.py) with the iCT quickstart's 1.3M-parameter
NCSN++ generator, data and quality report (configs/quickstart.py), a small
discriminator (32 and 64 channels, one res block per level, 0.3M params),
batch 32 per step (16 for the generator, 8 generated + 8 real images for the
discriminator) against the iCT quickstart's 128, 1,500 steps.

Measured with this exact command in a fresh workdir (AVX-512 EPYC host, 2
cores shared with other jobs: load average 28 at the start, 21 at the end, so
the wall time, 18 min 54 s, is not representative; the process used 4 min 12 s
of user CPU time; an estimate for an idle 2-core host is 2.5-3 min). Report
(digits features, 297 images each): Frechet distance 12.67 for 1-step and
10.79 for 2-step samples (precision 0.40 / 0.39, recall 0.64 / 0.72); held-out
real digits 1.89; untrained network 257.2. The iCT quickstart
(configs/quickstart.py, batch 128, 2,000 steps) reaches 3.8 / 4.4: at a
quarter of the batch and 1,500 steps ACT does not match it here.
The discriminator: accuracy 0.76 at step 100, 0.62-0.66 over steps 300-700,
0.69-0.76 after; mean logits real +0.2 / generated -0.2 from step 400 on;
the augmentation probability stayed 0 (the R1 EMA falls from the reference's
threshold of 1e4 towards the R1 term, ~16 at the end).

Settings changed from the paper's CIFAR-10 recipe for a 1,500-step run
(tuned on this data; a first run with s0 = 2, mu0 = 0.9, betas (0, 0.99) and a
discriminator lr of 2e-3 still made gray blobs after 1,000 steps): the
curriculum starts at s0 = 10 grid points, the EMA target at mu0 = 0.5 (a
target equal to the student, mu0 ~ 0, gave 15.2), the quickstart's RAdam (lr
2e-3, betas 0.9, 0.999, clipping at 1), a discriminator lr of 1e-3, and
c_noise = ln(sigma)/4 with the quickstart's Fourier embedding (the paper feeds
the raw sigma).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quickstart  # noqa: E402  (configs are exec'd by path, not imported as a package)

import ml_collections  # noqa: E402

from consistency_jax import methods  # noqa: E402


def get_config() -> ml_collections.ConfigDict:
    config = quickstart.get_config()  # the iCT quickstart's data, generator network, optimizer and report

    config.method = methods.method_config("act")
    config.method.s0 = 10
    config.method.s1 = 150
    config.method.target_ema_mu0 = 0.5
    config.method.distance = "pseudo_huber"  # c = 0.00054 * sqrt(64)
    config.method.adv_weight = 0.3
    config.method.r1_gamma = 10.0
    config.method.r1_interval = 16
    config.method.disc_learning_rate = 1e-3
    config.method.discriminator.update(dict(channels=(32, 64), num_res_blocks=1, attn_resolutions=(),
                                            num_head_channels=32, output_norm=True))

    config.training.batch_size = 32  # a quarter of the iCT quickstart's 128
    config.training.num_steps = 1500
    return config
