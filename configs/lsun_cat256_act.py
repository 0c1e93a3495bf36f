"""ACT on LSUN Cat 256x256 (Kong et al. 2024).

Run:
    python -m consistency_jax.main --config=configs/lsun_cat256_act.py --workdir=/path/to/workdir

Published FID (1 step, 50k samples): 13.0, with LPIPS as the consistency
distance; this config uses pseudo-Huber (no VGG weights here for LPIPS).

Reference code read (kong13661/ACT): lsun_cat_256.py, models/unet.py,
models/discriminator_imagenet.py. The released script is incomplete: it calls
`self.augment`, which it never defines (nor does it import augmentation.py),
and dataset.py has no LSUN loader; with its R1-EMA threshold of 1e9 the
augmentation would stay off anyway (p = 0), which is what this config does.

Recipe: 800k iterations of a batch of 1280 (80 per device on 8 devices,
doubled: 640 for the generator step, 320 generated + 320 real for the
discriminator step); curriculum N from 2 to 150, EMA target mu0 = 0.95;
l(t) = 0.6 (n / (N - 1))^e, 0.2 at the middle index; R1 gamma = 10 every 16
iterations; RAdam lr 5e-5 for both networks, betas (0, 0.99) and
(0, 0.99 * 16/17); c_noise = sigma; mixed precision (bfloat16 here; fp16
autocast in the reference). LSUN Cat images are resized (shorter side) and
centre-cropped to 256 (data/sources.py, the ADM/CM preprocessing).

Networks: the generator is the reference's UNet2DModel with the DDPM LSUN
layout (channels 128, 128, 256, 256, 512, 512, 2 res blocks, one-head
attention at 16x16), as ADM with resblock_updown=False: 113,673,219
params, the same count as the reference. The reference embeds sigma with
diffusers' DDPM variant of the sinusoids ([sin, cos], frequencies
10000^(-i / (half - 1))); ADM's is [cos, sin] with 10000^(-i / half): the
same features up to order and a slightly different frequency ladder.
Discriminator: channels 128, 128, 256, 256, 512, 512, 3 res blocks per level,
one-head attention at 16x16, no final GroupNorm: 56,983,041 params (the
reference's 56,985,090 include an unused second output layer).

Sampling: from an evaluation EMA of the target's final rate
exp(2 ln 0.95 / 149) = 0.99931 (the reference samples from the target).
Code-vs-paper differences: configs/cifar10_act.py and imagenet64_act.py.

Hardware: the reference runs 8 GPUs (type not recorded; unconfirmed). Cost:
492 GFLOP per generator and 197 per discriminator forward pass per image;
2.2 PFLOP per iteration, 1.7e21 FLOP for 800k iterations: about 42 days at
a sustained 480 TFLOP/s (8 GPUs at 60 TFLOP/s each).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cifar10_act  # noqa: E402  (configs are exec'd by path, not imported as a package)

import ml_collections  # noqa: E402


def get_config() -> ml_collections.ConfigDict:
    config = cifar10_act.get_config()

    config.method.s1 = 150
    config.method.target_ema_mu0 = 0.95
    config.method.huber_c = -1.0  # 0.00054 * sqrt(196608) = 0.239
    config.method.adv_weight = 0.6
    config.method.adv_weight_mid = 0.2
    config.method.ada_r1_threshold = 1e9  # augmentation off (see above)
    config.method.disc_learning_rate = 5e-5
    config.method.discriminator.update(dict(
        channels=(128, 128, 256, 256, 512, 512), num_res_blocks=3, attn_resolutions=(16,), num_head_channels=512,
        output_norm=False, dtype="bfloat16"))

    config.data.name = "lsun/cat"
    config.data.image_size = 256
    config.data.num_channels = 3
    config.data.num_classes = 0
    config.data.random_flip = False  # the reference script has no LSUN loader to say otherwise (unconfirmed)

    config.model = cifar10_act.act_generator(channel_mult=(1, 1, 2, 2, 4, 4), num_head_channels=512, num_classes=0,
                                             dtype="bfloat16")

    config.optimizer.learning_rate = 5e-5

    config.training.batch_size = 1280
    config.training.num_steps = 800_000
    config.training.ema_rates = (0.99931,)  # the EMA target's final rate, exp(2 ln 0.95 / 149)
    config.training.checkpoint_every = 5_000
    return config
