"""Quickstart: sCT (continuous-time consistency training, Lu & Song 2024) on scikit-learn's 8x8 digits.

Run:
    python -m consistency_jax.main --config=configs/quickstart_scm.py --workdir=/tmp/quickstart_scm

TBD
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default  # noqa: E402

from consistency_jax import methods  # noqa: E402


def get_config():
    config = default.get_config()
    config.method = methods.method_config("scm_ct")
    config.method.p_mean = -1.0
    config.method.p_std = 1.4
    config.method.tangent_warmup_steps = 200
    config.method.tangent_normalization = "l2"
    config.method.tangent_norm_c = 0.1
    config.method.adaptive_weighting = True

    config.data.name = "digits"
    config.data.image_size = 8
    config.data.num_channels = 1

    # The quickstart's small NCSN++ (1.3M parameters) with the paper's TrigFlow changes:
    # positional time embedding of c_noise(t) = t and adaptive double normalisation.
    config.model.model_channels = 32
    config.model.channel_mult = (1, 2, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (2,)
    config.model.dropout = 0.0
    config.model.embedding_type = "positional"
    config.model.adaptive_double_norm = True

    config.optimizer.name = "radam"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.99
    config.optimizer.grad_clip_norm = 1.0

    config.training.batch_size = 128
    config.training.num_steps = 600
    config.training.ema_rates = (0.99,)
    config.training.log_every = 100
    config.training.sample_every = 0
    config.training.checkpoint_every = 600

    config.sampling.num_samples = 256
    config.sampling.num_steps = 1
    config.sampling.mid_sigma = 0.5 * math.tan(1.1)  # the paper's t_mid = 1.1

    config.eval.feature_extractor = "digits"
    config.eval.num_samples = 297  # the size of the held-out real split
    config.eval.steps = (1, 2)
    return config
