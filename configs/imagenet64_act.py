"""ACT on class-conditional ImageNet 64x64 (Kong et al. 2024).

Run:
    python -m consistency_jax.main --config=configs/imagenet64_act.py --workdir=/path/to/workdir

Published FID (1 step, 50k samples, ADM reference batch): 10.6, with LPIPS
as the consistency distance; this config uses pseudo-Huber (no VGG weights
here for LPIPS), so expect a different number.

Reference code read (kong13661/ACT): train_imagenet64.py, models/unet.py,
models/discriminator_imagenet.py, models/consistency_wrapper.py, dataset.py
(ImageNet 64x64 from the downsampled-ImageNet .npz files with random flips:
TFDS imagenet_resized/64x64 is the same data).

Recipe: 400k iterations of a batch of 640 (the reference's batch_size=320
doubled: 320 for the generator step, 160 generated + 160 real for the
discriminator step); curriculum N from 2 to 200, EMA target mu0 = 0.95;
l(t) = 0.6 (n / (N - 1))^e with e = log_0.5(0.2 / 0.6) = 1.585 (0.2 at the
middle index), which also weighs each discriminator term and R1 per example;
R1 gamma = 10 every 16 iterations; R1-EMA threshold 1e7, which keeps the
augmentation off in practice; RAdam lr 5e-5 for both networks, betas (0, 0.99)
and (0, 0.99 * 16/17); c_noise = sigma; mixed precision (the reference runs
fp16 autocast; here bfloat16 activations with float32 params).

Networks: the generator is the reference's class-conditional UNet2DModel
(channels 128, 256, 256, 512, 512, 2 res blocks, attention at 16x16 with
16-channel heads) as ADM with resblock_updown=False: 107,602,179 params (the
reference's 107,601,667 plus the null-class row of the label embedding).
Discriminator: channels 128, 256, 256, 512, 512, 3 res blocks per level,
attention at 16x16 with 16-channel heads, class embedding, no final
GroupNorm: 53,899,521 params (the reference's 53,901,570 include an unused
second output layer).

Sampling: the reference samples from its EMA target (final rate
exp(2 ln 0.95 / 199) = 0.999485); this config keeps an evaluation EMA of that
rate. Code-vs-paper differences: see configs/cifar10_act.py; in addition the
ImageNet code weighs the R1 term per example by (n' / (N - 1))^e.

Hardware: the reference's default is 1 GPU (type not recorded; unconfirmed).
Cost: 49.8 GFLOP per generator and 18.6 per discriminator forward pass per
image; ~2.25 generator and ~3 discriminator passes per batch image give
107 TFLOP per iteration, 4.3e19 FLOP for 400k iterations: about 8 days at a
sustained 60 TFLOP/s, i.e. one day on 8 such GPUs.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cifar10_act  # noqa: E402  (configs are exec'd by path, not imported as a package)

import ml_collections  # noqa: E402


def get_config() -> ml_collections.ConfigDict:
    config = cifar10_act.get_config()

    config.method.s1 = 200
    config.method.target_ema_mu0 = 0.95
    config.method.huber_c = -1.0  # 0.00054 * sqrt(12288) = 0.0599
    config.method.adv_weight = 0.6
    config.method.adv_weight_mid = 0.2
    config.method.ada_r1_threshold = 1e7  # the reference: "a very large number to disable augmentation"
    config.method.disc_learning_rate = 5e-5
    config.method.discriminator.update(dict(
        channels=(128, 256, 256, 512, 512), num_res_blocks=3, attn_resolutions=(16,), num_head_channels=16,
        output_norm=False, dtype="bfloat16"))

    config.data.name = "imagenet_resized/64x64"
    config.data.image_size = 64
    config.data.num_channels = 3
    config.data.num_classes = 1000
    config.data.random_flip = True

    config.model = cifar10_act.act_generator(channel_mult=(1, 2, 2, 4, 4), num_head_channels=16,
                                             num_classes=config.data.get_ref("num_classes"), dtype="bfloat16")

    config.optimizer.learning_rate = 5e-5

    config.training.batch_size = 640
    config.training.num_steps = 400_000
    config.training.ema_rates = (0.999485,)  # the EMA target's final rate, exp(2 ln 0.95 / 199)
    config.training.checkpoint_every = 5_000
    return config
