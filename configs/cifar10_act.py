"""ACT on CIFAR-10 (Kong et al. 2024, "ACT-Diffusion: Efficient Adversarial Consistency Training for One-step
Diffusion Models").

Run:
    python -m consistency_jax.main --config=configs/cifar10_act.py --workdir=/path/to/workdir

Published FID (1 step, 50k samples): 6.0, with LPIPS as the consistency
distance. This config uses the pseudo-Huber distance instead (LPIPS needs VGG
weights that cannot be downloaded here), so expect a different number.

Reference code read (kong13661/ACT): train_cifar10.py (recipe, losses, R1,
augmentation rule, optimizers, EMA target), models/consistency_wrapper.py
(parametrization, time grid), models/unet.py (generator), models/
discriminator_cifar10.py (discriminator), models/loss.py (distances),
augmentation.py, dataset.py.

Recipe: 300k iterations; each iteration takes a batch of 160 (the
reference's batch_size=80 doubled): 80 images for the generator step, 40
generated and 40 real images for the discriminator step. Curriculum N(k) =
round(sqrt(k/K (150^2 - 2^2) + 2^2)), EMA target mu(k) = exp(2 ln 0.9 /
(N(k) - 1)); l = 0.3 constant; R1 gamma = 10 every 16 iterations; adaptive
augmentation with threshold 1e4 on the R1 EMA; RAdam lr 1e-4, betas (0, 0.99)
for the generator and (0, 0.99 * 16/17) for the discriminator; c_noise = sigma
(the reference feeds the raw sigma to both networks); random flips.

Networks: the generator is the reference's diffusers UNet2DModel (DDPM-style
U-Net: channels 128, 128, 256, 256, 2 res blocks, attention at 16x16 with
8-channel heads, strided-conv down / nearest+conv up), here ADM with
resblock_updown=False: 27,495,427 params (the reference's 27,498,886 count a
6-channel output convolution of which it uses 3 channels). Discriminator:
the encoder half of the same kind of U-Net, channels 128, 256, 256, 256, 3
res blocks per level, attention at 16x16, final GroupNorm: 17,975,809 params
(the reference's 17,976,834 include an unused second output layer).

Sampling: the reference samples (and reports FID) from its EMA target, whose
rate ends at mu = 0.99859; this config keeps an evaluation EMA of that rate.

Where the reference code and the paper (SPEC section 3) differ:
- The discriminator loss is l [softplus(D(fake)) + softplus(-D(real)) + R1]:
  the code scales R1 by l as well.
- Lazy R1 every 16 steps is not multiplied by 16 (StyleGAN2 multiplies), and
  its gradient is taken w.r.t. the augmented real image.
- Discriminator Adam beta2 is 0.99 * 16/17 = 0.9318 in the code, 0.99^(16/17)
  = 0.9906 in the paper / SPEC; this config uses the code's value.
- The augmentation probability follows an EMA (decay 0.93) of the R1 term
  against a threshold, stepped by +-batch * 16 / 500k every R1 step, not
  ADA's sign statistic of D(real) (that class is in augmentation.py, unused);
  p and the EMA are not saved in the reference's checkpoints (here they are
  part of the train state). The rotation draws 0 or 270 degrees only.
- The curriculum is rounded, N = round(sqrt(...)) from 2 to s1, and mu uses
  N - 1 (CT: N = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1, mu with N).
- The batch is split in two halves (generator / discriminator) and the
  discriminator half again in two (generated / real): the per-device batch of
  80 is the generator's; the loader draws 160.
- The generator step runs first; the discriminator then judges images of the
  updated generator, drawn with their own noise and noise levels.
- Samples come from the EMA target (no separate evaluation EMA), clipped to
  [-1, 1].
- The code's LR warm-up of 1 step makes the first update of both networks a
  zero-learning-rate step.

Hardware: the reference trains CIFAR-10 on 1 GPU by default (GPU type not
recorded; unconfirmed). Cost: 7.2 GFLOP per generator and 4.6 per
discriminator forward pass per image; ~2.25 generator and ~3 discriminator
passes per image of the batch per iteration give 4.8 TFLOP per iteration,
1.4e18 FLOP for 300k iterations: about 7 hours at a sustained 60 TFLOP/s
(LPIPS at 224x224 would add more than that again).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default  # noqa: E402  (configs are exec'd by path, not imported as a package)

import ml_collections  # noqa: E402

from consistency_jax import methods  # noqa: E402


def act_generator(channel_mult: tuple[int, ...], num_head_channels: int, num_classes,
                  dtype: str = "float32") -> ml_collections.ConfigDict:
    """The reference's diffusers UNet2DModel as ADM with conv resampling; every field of models.adm.ADM."""
    model = ml_collections.ConfigDict()
    model.name = "adm"
    model.model_channels = 128
    model.channel_mult = channel_mult
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.num_head_channels = num_head_channels
    model.dropout = 0.0
    model.embedding_type = "positional"
    model.fourier_scale = 16.0  # unused with the positional embedding
    model.scale_shift_norm = False
    model.resblock_updown = False
    model.num_classes = num_classes
    model.dtype = dtype
    model.remat = False
    model.attention_impl = "xla"
    return model


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()

    config.method = methods.method_config("act")
    config.method.s0 = 2
    config.method.s1 = 150
    config.method.curriculum_steps = -1  # K = training.num_steps
    config.method.target_ema_mu0 = 0.9
    config.method.distance = "pseudo_huber"  # the paper: LPIPS
    config.method.huber_c = -1.0  # 0.00054 * sqrt(3072) = 0.0299
    config.method.adv_weight = 0.3
    config.method.adv_weight_mid = 0.0  # constant l
    config.method.r1_gamma = 10.0
    config.method.r1_interval = 16
    config.method.ada_r1_threshold = 1e4
    config.method.ada_r1_ema_decay = 0.93
    config.method.ada_length = 500_000.0
    config.method.disc_optimizer = "radam"
    config.method.disc_learning_rate = 1e-4
    config.method.disc_b1 = 0.0
    config.method.disc_b2 = 0.99 * 16 / 17
    config.method.discriminator.update(dict(
        channels=(128, 256, 256, 256), num_res_blocks=3, attn_resolutions=(16,), num_head_channels=8,
        output_norm=True, dropout=0.0, dtype="float32"))

    config.parametrization.c_noise = "raw"

    config.model = act_generator(channel_mult=(1, 1, 2, 2), num_head_channels=8, num_classes=0)

    config.data.name = "cifar10"
    config.data.image_size = 32
    config.data.num_channels = 3
    config.data.num_classes = 0
    config.data.random_flip = True

    config.optimizer.name = "radam"
    config.optimizer.learning_rate = 1e-4
    config.optimizer.b1 = 0.0
    config.optimizer.b2 = 0.99
    config.optimizer.lr_schedule = "constant"

    config.training.batch_size = 160
    config.training.num_steps = 300_000
    config.training.ema_rates = (0.99859,)  # the EMA target's final rate, exp(2 ln 0.9 / 149)
    config.training.log_every = 100
    config.training.sample_every = 10_000
    config.training.checkpoint_every = 10_000
    config.training.keep_every = 50_000

    config.eval.feature_extractor = "inception"
    config.eval.num_samples = 50_000
    config.eval.steps = (1,)
    return config
