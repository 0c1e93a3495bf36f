"""Quickstart: ACT on scikit-learn's 8x8 digits, on a laptop CPU in a few minutes.

Run:
    python -m consistency_jax.main --config=configs/quickstart_act.py --workdir=/tmp/quickstart_act

TODO(measured numbers): filled in after the tuning runs.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quickstart  # noqa: E402  (configs are exec'd by path, not imported as a package)

import ml_collections  # noqa: E402

from consistency_jax import methods  # noqa: E402


def get_config() -> ml_collections.ConfigDict:
    config = quickstart.get_config()  # the iCT quickstart's data, generator network and quality report

    config.method = methods.method_config("act")
    config.method.s0 = 2
    config.method.s1 = 150
    config.method.target_ema_mu0 = 0.9
    config.method.distance = "pseudo_huber"
    config.method.adv_weight = 0.3
    config.method.r1_gamma = 10.0
    config.method.r1_interval = 16
    config.method.disc_learning_rate = 2e-3
    config.method.discriminator.update(dict(channels=(32, 64), num_res_blocks=1, attn_resolutions=(), 
                                            num_head_channels=32, output_norm=True))

    config.optimizer.b1 = 0.0
    config.optimizer.b2 = 0.99

    config.training.batch_size = 32
    config.training.num_steps = 4000
    config.training.ema_rates = (0.99,)
    return config
