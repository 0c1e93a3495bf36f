"""ECT on class-conditional ImageNet 64x64 with EDM2's U-Net (Geng et al. 2024; EDM2: Karras et al. 2024).

Size: EDM2-XL by default (model_channels 384, 1,119,277,477 params here = EDM2's 1119M + 768 fixed Fourier
values, models/edm2.py); the other published sizes are `:S`, `:M`, `:L` after the file name, each with ECT's
preset for it (locuslab/ect branch `imgnet` ct_train.py config_presets):

    size  channels  params  lr      dropout   EDM2 starting checkpoint (posthoc-reconstructions/)
    S     192       280M    1.0e-3  0.4       edm2-img64-s-1073741-0.075.pkl  (ECT's run_imgnet_ecm.sh)
    M     256       498M    0.9e-3  0.5       edm2-img64-m-2147483-0.060.pkl  (EDM2's -fid preset; unconfirmed)
    L     320       777M    0.8e-3  0.5       edm2-img64-l-1073741-0.040.pkl  (EDM2's -fid preset; unconfirmed)
    XL    384       1119M   0.7e-3  0.5       edm2-img64-xl-0671088-0.040.pkl (EDM2's -fid preset; unconfirmed)

Run (after converting the EDM2 checkpoint into a workdir, see below):

    python -m consistency_jax.main --config=configs/imagenet64_ect.py:XL --workdir=/path/to/workdir \
        --config.method.teacher_workdir=/path/to/edm2_img64_xl

Published FID (50k samples) for the largest model, ECM-XL: 1-step 2.49, 2-step 1.67 (2-step through
t = 1.526), after 100k iterations at batch 1024 (ECT's README: "ECM-XL checkpoints trained at bs1024 for 100k
iterations"); ECT's script trains S at batch 128 for 12.8 Mimg.

Starting checkpoint: EDM2's pickles (NVlabs/edm2 README, posthoc-reconstructions/) are not convertible yet:
`python -m consistency_jax.convert` reads EDM's SongUNet / DhariwalUNet exports. models/edm2.py keeps EDM2's
module names and was checked against EDM2's own UNet (outside the repo: outputs equal to 7e-6), so an
EDM2 converter is a renaming: `unet.enc.<res>_<name>` -> `enc_<res>_<name>` (likewise dec), MPConv weights
[out, in, kh, kw] -> [kh, kw, in, out] and [out, in] -> [in, out], `emb_fourier.freqs/phases` buffers ->
params of the same names, `logvar_*` (EDM2's training-loss weighting) dropped; config.model = this file's
with the size's channels, method 'edm', c_noise 'edm', sigma_data 0.5.

Recipe (SPEC section 4; ECT `imgnet` branch training/loss.py, ct_training_loop.py, run_imgnet_ecm.sh):
Adam lr / sqrt(max(step / 2000, 1)), betas (0.9, 0.99); ln t ~ N(-0.8, 1.6^2); q = 4, a stage every 25k
iterations (--double 500 ticks of 6.4 kimg at batch 128), k = 8, b = 1; loss (sqrt(D + 0.06^2) - 0.06)
(1/t^2 + 1/0.5^2); EDM scalings always (EDM2's Precond has no boundary; r = 0 gives the target x); dropout
only at resolutions <= 16; forced weight normalisation as a projection after each step (models/edm2.py); no
learned loss weighting (ECT disables EDM2's logvar); EMAs: 0.9999 (ECT's "online" EMA, sampled by default)
and power-function EMAs with sigma_rel 0.010, 0.050, 0.100 (sampling.ema_sigma_rel picks one;
consistency_jax/phema.py rebuilds others from kept checkpoints). Data: EDM2 preprocesses ImageNet with ADM's
centre crop; imagenet_resized/64x64 resizes whole images (use a data source with EDM2's preprocessing for a
faithful run; unconfirmed impact). ECT trained in float32 (TF32 matmuls).

Hardware: not recorded in SPEC. Cost: per step 1024 images x ~4 passes of the network (student forward and
backward, teacher forward) at 64x64; XL is the largest of the four (EDM2 reports its FLOPs per size).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default  # noqa: E402  (configs are exec'd by path, not imported as a package)

import ml_collections  # noqa: E402

from consistency_jax import methods  # noqa: E402

# ECT's presets (ct_train.py): channels, learning rate, dropout.
PRESETS = {"S": (192, 1.0e-3, 0.4), "M": (256, 0.9e-3, 0.5), "L": (320, 0.8e-3, 0.5), "XL": (384, 0.7e-3, 0.5)}


def edm2_model(config: ml_collections.ConfigDict, size: str) -> ml_collections.ConfigDict:
    """EDM2's ImageNet-64 U-Net of `size`; every field of consistency_jax.models.edm2.EDM2UNet."""
    channels, _, dropout = PRESETS[size]
    model = ml_collections.ConfigDict()
    model.name = "edm2"
    model.model_channels = channels
    model.channel_mult = (1, 2, 3, 4)
    model.channel_mult_noise = 0  # 0: channel_mult[0]
    model.channel_mult_emb = 0  # 0: max(channel_mult)
    model.num_blocks = 3
    model.attn_resolutions = (16, 8)
    model.channels_per_head = 64
    model.dropout = dropout
    model.dropout_res = 16
    # Tied to the data: `--config.data.num_classes=...` changes both.
    model.num_classes = config.data.get_ref("num_classes")
    model.dtype = "float32"
    model.remat = False  # True: recompute blocks in the backward pass, for larger per-device batches
    return model


def get_config(size: str = "XL", method_name: str = "ect") -> ml_collections.ConfigDict:
    size = size.upper() or "XL"
    if size not in PRESETS:
        raise ValueError(f"Unknown EDM2 size {size!r} (configs/imagenet64_{method_name}.py:<size>); "
                         f"valid: {', '.join(PRESETS)}.")
    config = default.get_config()

    config.method = methods.method_config(method_name)
    config.method.p_mean = -0.8
    config.method.p_std = 1.6
    config.method.q = 4.0
    config.method.stage_steps = 25_000
    config.method.k = 8.0
    config.method.b = 1.0
    config.method.huber_c = 0.06
    config.method.weighting = "edm"
    config.method.boundary = "none"

    config.parametrization.c_noise = "edm"

    config.data.name = "imagenet_resized/64x64"
    config.data.image_size = 64
    config.data.num_channels = 3
    config.data.num_classes = 1000
    config.data.random_flip = False  # ECT's ImageNet runs: no --xflip

    config.model = edm2_model(config, size)

    config.optimizer.name = "adam"
    config.optimizer.learning_rate = PRESETS[size][1]
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.99
    config.optimizer.lr_schedule = "rsqrt"
    config.optimizer.rsqrt_ref_steps = 2000

    config.training.batch_size = 1024
    config.training.num_steps = 100_000
    config.training.ema_rates = (0.9999,)
    config.training.ema_sigma_rels = (0.010, 0.050, 0.100)
    config.training.log_every = 100
    config.training.sample_every = 10_000
    config.training.checkpoint_every = 5_000
    config.training.keep_every = 25_000  # kept checkpoints are the post-hoc EMA's inputs (phema.posthoc_params)

    config.sampling.mid_sigma = 1.526

    config.eval.feature_extractor = "inception"
    config.eval.num_samples = 50_000
    config.eval.steps = (1, 2)
    return config
