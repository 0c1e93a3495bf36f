"""iCT on class-conditional ImageNet 64x64 (Song & Dhariwal 2023).

Data (once): ILSVRC2012's training images (one folder per class), converted
with ADM's centre crop (box-halving, bicubic, centre crop: CM's
cm/image_datasets.py center_crop_arr, the paper's data) into array shards:
    python -m consistency_jax.data.ilsvrc --train_dir=/data/ILSVRC2012/train \
        --output_dir=/data/imagenet64_adm --image_size=64

Run:
    python -m consistency_jax.main --config=configs/imagenet64_ict.py --workdir=/path/to/workdir \
        --config.data.path=/data/imagenet64_adm \
        --config.eval.reference=/data/VIRTUAL_imagenet64_labeled.npz

TFDS's `imagenet_resized/64x64` also works (--config.data.name=imagenet_resized/64x64
--config.data.data_dir=...), but it is not the paper's preprocessing: it
squashes whole images to 64x64 instead of cropping their centre.

Published FID (50k samples): 1-step 4.02, 2-step 3.20 (2-step through
sigma = 1.526), against ADM's ImageNet 64x64 reference batch
(VIRTUAL_imagenet64_labeled.npz from openai/guided-diffusion's evaluations/,
as CM's scripts/launch.sh uses ref_batches/imagenet64.npz); with the default
eval.reference='train' the FID is against this run's own training images.

Network: the ADM U-Net as EDM and CM configure it for ImageNet 64 (192
channels, multipliers 1, 2, 3, 4, 3 res blocks, attention at 32/16/8 with
64-channel heads, scale-shift norm, positional embedding, N(0, 1) label
embedding), class-conditional with a null class: 295,900,035 parameters
(published: 295.9M). Dropout 0.2 in every res block (model.dropout_max_resolution
= 0: all resolutions).

Dropout placement (issue 9 item 9): whether iCT applies ImageNet's dropout only
to feature maps of 16x16 and below (as Hoogeboom et al. 2023's simple
diffusion, and as sCM's EDM2 configs do: NVlabs/FastGen
fastgen/configs/experiments/EDM2/config_scm_xl.py, dropout_resolutions
[16, 8]) could not be confirmed: the iCT paper's text beyond its abstract was
not readable from this project's sources, and iCT's code is not public.
Unconfirmed; `--config.model.dropout_max_resolution=16` gives the
16x16-and-below variant, the default keeps dropout everywhere (as ECT's
ImageNet-64 ADM setting in NVlabs/FastGen
fastgen/configs/experiments/EDM/config_cm_in64.py, dropout 0.2 throughout).

Unconfirmed (SPEC marks the ImageNet numbers so; override on the command
line when better values are known): batch 4096, 800k iterations, dropout
0.2, EMA 0.99997, RAdam lr 1e-4, c_noise = 1000 ln(sigma) / 4 (the CM
ImageNet code's convention for ADM's positional embedding:
cm/karras_diffusion.py, rescaled_t), random flips.
Training otherwise as cifar10_ict.py: curriculum 10 to 1280, lognormal index
distribution (-1.1, 2.0), pseudo-Huber c = 0.00054 sqrt(12288) = 0.0599.

Precision (issue 9 item 7): float32 compute (model.dtype='float32'), not
bfloat16. The loss is the difference of two forward passes at adjacent sigmas
(0.4-1.5% apart at N = 1281) and bfloat16 rounds at 0.4% per op; CM's PyTorch
code trains in fp16 (0.05%). Measured with benchmarks/bf16_consistency.py
(digits quickstart NCSN++, 1.28M params, 200 float32 iCT steps, batch 32,
XLA CPU, XLA_FLAGS=--xla_allow_excess_precision=false so every op rounds to
bf16; same params, images, noise and dropout in both precisions):
    pairs near sigma    0.01   0.1    0.33   1.0    5.0    20     80   iCT mix
    |D16-D32|/|D32|     0.22   0.80   1.08   1.01   3.95   6.61   1.75   1.26
    grad rel. error     0.11   0.21   0.21   0.55   0.87   0.99   0.69   0.43
    grad cosine         .997   .987   .986   .859   .513   .263   .924   .905
    batch noise @4096   .030   .024   .035   .084   .112   .042   .013   .102
(D = student - teacher; batch noise = relative gradient difference of two
disjoint float32 batches, scaled by 1/sqrt(batch) to 4096). bfloat16 gets the
student-teacher difference wrong by about its own size from sigma ~0.1 up, and
its gradient error for iCT's sigma mix is 4x the minibatch noise at the
paper's batch (whether that rounding error shrinks with the batch, as
minibatch noise does, was not measured; it is not random noise).
Hence float32 here (imagenet64_ict_deep too; cifar10_ict was float32 already).
Not yet measured: the same on a GPU with the ADM network (a GPU session:
`python -m benchmarks.bf16_consistency --config=configs/imagenet64_ict.py
--config.data.path=/data/imagenet64_adm --config.training.batch_size=64
--batch=64 --train_steps=...`, i.e. on a partly trained ADM);
until then `--config.model.dtype=bfloat16` is at your own risk (faster on
accelerators and half the activation memory, but not measured safe).

Hardware: not recorded in SPEC (unconfirmed). Cost: 210.7 GFLOP per forward
pass per image, 800k * 4096 * 4 * 210.7e9 = 2.8e21 FLOP: about 32 days at a
sustained 1 PFLOP/s, i.e. roughly 4 days on 64 A100s at ~40% of bf16
peak (float32 compute, the default here, is slower: TF32 matmuls at best).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default  # noqa: E402  (configs are exec'd by path, not imported as a package)

import ml_collections  # noqa: E402

from consistency_jax import methods  # noqa: E402


def adm_model(config: ml_collections.ConfigDict, num_res_blocks: int) -> ml_collections.ConfigDict:
    """ADM for ImageNet 64; every field of consistency_jax.models.adm.ADM."""
    model = ml_collections.ConfigDict()
    model.name = "adm"
    model.model_channels = 192
    model.channel_mult = (1, 2, 3, 4)
    model.num_res_blocks = num_res_blocks
    model.attn_resolutions = (32, 16, 8)
    model.num_head_channels = 64
    model.dropout = 0.2
    model.dropout_max_resolution = 0  # 0: every res block; 16: 16x16 and below (unconfirmed, see above)
    model.embedding_type = "positional"
    model.fourier_scale = 16.0  # unused with the positional embedding
    model.scale_shift_norm = True
    # Tied to the data: `--config.data.num_classes=...` changes both.
    model.num_classes = config.data.get_ref("num_classes")
    model.dtype = "float32"  # bfloat16 breaks the adjacent-sigma loss: see "Precision" above
    model.remat = False  # True: recompute blocks in the backward pass, for larger per-device batches
    model.attention_impl = "xla"  # 'dot_product_attention' may use a fused kernel on GPU
    return model


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()

    config.method = methods.method_config("ict")
    config.method.s0 = 10
    config.method.s1 = 1280
    config.method.curriculum_steps = -1  # K = training.num_steps
    config.method.p_mean = -1.1
    config.method.p_std = 2.0
    config.method.huber_c = -1.0  # 0.00054 * sqrt(64 * 64 * 3) = 0.0599

    config.parametrization.c_noise = "cm"

    # ILSVRC2012 with ADM's centre crop (see the docstring); set data.path.
    config.data.name = "array_shards"
    config.data.image_size = 64
    config.data.num_channels = 3
    config.data.num_classes = 1000
    config.data.random_flip = True

    config.model = adm_model(config, num_res_blocks=3)

    config.optimizer.name = "radam"
    config.optimizer.learning_rate = 1e-4
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.lr_schedule = "constant"

    config.training.batch_size = 4096
    config.training.num_steps = 800_000
    config.training.ema_rates = (0.99997,)
    config.training.log_every = 100
    config.training.sample_every = 10_000
    config.training.checkpoint_every = 5_000
    config.training.keep_every = 50_000

    config.sampling.mid_sigma = 1.526

    config.eval.feature_extractor = "inception"
    config.eval.num_samples = 50_000
    config.eval.steps = (1, 2)
    return config
