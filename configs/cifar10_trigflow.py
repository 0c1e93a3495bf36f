"""TrigFlow diffusion on CIFAR-10: the teacher and initialisation of sCT / sCD (Lu & Song 2024, appendix G.1).

Run:
    python -m consistency_jax.main --config=configs/cifar10_trigflow.py --workdir=/path/to/trigflow_cifar10

Published FID (50k samples, EDM's Heun sampler with 18 noise levels, 35 NFE): 2.15
(EDM's own DDPM++ VP: 2.01).

Recipe (G.1): "the Score SDE architecture (DDPM++)" with the paper's changes (section 4.1):
TrigFlow parametrization, the identity time transformation c_noise(t) = t with a
positional time embedding, adaptive double normalisation; and "the same settings of
EDM": dropout 0.13, batch 512, 400k iterations, Adam lr 1e-3 (EDM: 10 Mimg linear
ramp-up, i.e. ~19.5k steps at batch 512), eps 1e-8, betas (0.9, 0.999), EMA half-life
0.5 Mimg (per step 0.5^(512/500000) = 0.999291), ln(sd tan t) ~ N(-1.2, 1.2^2), random
flips (EDM's CIFAR-10 runs flip; its non-leaking augmentation pipeline is not here).
The loss is EDM's in TrigFlow coordinates (methods/trigflow.py).

Unconfirmed: the learning-rate ramp-up and the flips (the paper only says "same settings
of EDM"); the exact width of sCM's TrigFlow DDPM++ (assumed DDPM++'s 128 channels,
multipliers (2, 2, 2), 4 blocks, attention at 16). Parameters: 60,066,563
(DDPM++'s 55,732,739 plus the scale half that adaptive double normalisation adds to every
block's embedding projection).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default  # noqa: E402  (configs are exec'd by path, not imported as a package)

import ml_collections  # noqa: E402

from consistency_jax import methods  # noqa: E402


def trigflow_ddpmpp_model(dropout: float) -> ml_collections.ConfigDict:
    """DDPM++ (score_sde / EDM SongUNet) with sCM's positional time embedding and adaptive double normalisation."""
    model = ml_collections.ConfigDict()
    model.name = "ncsnpp"
    model.model_channels = 128
    model.channel_mult = (2, 2, 2)
    model.num_res_blocks = 4
    model.attn_resolutions = (16,)
    model.dropout = dropout
    model.embedding_type = "positional"  # of c_noise(t) = t (config.method.time_conditioning = 'trigflow')
    model.fourier_scale = 16.0  # unused with the positional embedding
    model.resample_filter = (1, 1)
    model.progressive_input = "none"
    model.skip_rescale = True
    model.adaptive_double_norm = True
    model.num_classes = 0
    model.dtype = "float32"
    model.remat = False
    # The plain XLA attention (einsum-softmax-einsum) that jax.jvp goes through, as EDM's
    # attention op is for the paper's PyTorch JVPs (appendix G.2).
    model.attention_impl = "xla"
    return model


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.method = methods.method_config("trigflow")
    config.method.p_mean = -1.2
    config.method.p_std = 1.2
    config.method.time_conditioning = "trigflow"
    config.method.time_scale = 1.0

    config.model = trigflow_ddpmpp_model(dropout=0.13)

    config.data.name = "cifar10"
    config.data.image_size = 32
    config.data.num_channels = 3
    config.data.num_classes = 0
    config.data.random_flip = True

    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    config.optimizer.warmup_steps = 19_531  # EDM's 10 Mimg ramp-up at batch 512
    config.optimizer.lr_schedule = "constant"

    config.training.batch_size = 512
    config.training.num_steps = 400_000
    config.training.ema_rates = (0.999291,)  # EDM's EMA half-life of 0.5 Mimg at batch 512
    config.training.log_every = 100
    config.training.sample_every = 10_000
    config.training.checkpoint_every = 10_000
    config.training.keep_every = 50_000

    config.sampling.num_steps = 18  # Heun: 18 noise levels, 35 network evaluations

    config.eval.feature_extractor = "inception"
    config.eval.num_samples = 50_000
    config.eval.steps = (18,)
    return config
