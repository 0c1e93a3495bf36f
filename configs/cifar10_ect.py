"""ECT on CIFAR-10 (Geng et al. 2024, "Consistency Models Made Easy"): tune EDM's DDPM++ into a consistency model.

Starting checkpoint: EDM's unconditional VP network, edm-cifar10-32x32-uncond-vp.pkl (NVlabs/edm's released
models; DDPM++, 55.7M params). Export it to .npz in EDM's own environment (README "EDM checkpoints") and
convert it into a workdir of this framework, then tune:

    python -m consistency_jax.convert --edm=edm-cifar10-32x32-uncond-vp.npz --workdir=/path/to/edm_vp \
        --config=configs/cifar10_ect.py
    python -m consistency_jax.main --config=configs/cifar10_ect.py --workdir=/path/to/workdir \
        --config.method.teacher_workdir=/path/to/edm_vp

config.model must be the converted network (the converter prints the overrides if it differs); the student
starts from the teacher's EMA weights (teacher_ema_rate -1), as ECT's code does (data['ema']).

Published FID (50k samples, EMA 0.9999, 2-step through t = 0.821): 1-step 4.54 / 2-step 2.20 after 100k
iterations (this config), 3.86 / 2.15 after 200k, 3.60 / 2.11 after 400k (--config.training.num_steps).

Recipe (SPEC section 4; locuslab/ect run_ecm.sh, ct_train.py, training/loss.py, training/ct_training_loop.py,
training/networks.py): batch 128, RAdam lr 1e-4 (betas 0.9, 0.999), dropout 0.2, no augmentation, EMA 0.9999
from the teacher's weights; ln t ~ N(-1.1, 2.0^2); r(t) with k = 8, b = 1, q = 2, a stage every 25k
iterations (--double=250 ticks of 12.8 kimg = 25k iterations of 128); loss sqrt(||f(x_t, t) - sg f(x_r, r)||^2)
/ (t - r) (c = 0: the L2 norm); EDM's c_skip / c_out in training and the boundary condition with sigma_min =
0.003 at sampling (ECMPrecond). ECT's code zeroes non-finite gradients; here they stop the run (train.py).
The 1-hour variant of run_ecm_1hour.sh is --config.method.q=256 --config.method.stage_steps=1000000000
--config.training.ema_rates='(0.9993,)'.

Hardware: not recorded in SPEC. Cost: 100k iterations x 128 images x ~4 network passes (student forward and
backward, teacher forward) of DDPM++ at 32x32.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default  # noqa: E402  (configs are exec'd by path, not imported as a package)

import ml_collections  # noqa: E402

from consistency_jax import methods  # noqa: E402


def ddpmpp_model() -> ml_collections.ConfigDict:
    """EDM's DDPM++ (SongUNet, VP): NCSN++ with positional embedding, no progressive input, (1, 1) resampling."""
    model = ml_collections.ConfigDict()
    model.name = "ncsnpp"
    model.model_channels = 128
    model.channel_mult = (2, 2, 2)
    model.num_res_blocks = 4
    model.attn_resolutions = (16,)
    model.dropout = 0.2  # ECT's tuning dropout (EDM trained it with 0.13)
    model.embedding_type = "positional"
    model.resample_filter = (1, 1)
    model.progressive_input = "none"
    model.skip_rescale = True
    model.num_classes = 0
    return model


def get_config(method_name: str = "ect") -> ml_collections.ConfigDict:
    config = default.get_config()

    config.method = methods.method_config(method_name)
    config.method.p_mean = -1.1
    config.method.p_std = 2.0
    config.method.q = 2.0
    config.method.stage_steps = 25_000
    config.method.k = 8.0
    config.method.b = 1.0
    config.method.huber_c = 0.0
    config.method.weighting = "inverse_gap"
    config.method.boundary = "sampling"

    config.parametrization.c_noise = "edm"  # EDMPrecond's ln(sigma) / 4
    config.parametrization.sigma_min = 0.003  # ECMPrecond's boundary at sampling (training uses EDM's scalings)

    config.model = ddpmpp_model()

    config.data.name = "cifar10"
    config.data.image_size = 32
    config.data.num_channels = 3
    config.data.num_classes = 0
    config.data.random_flip = False  # run_ecm.sh: no --xflip, --augment=0

    config.optimizer.name = "radam"
    config.optimizer.learning_rate = 1e-4
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.lr_schedule = "constant"

    config.training.batch_size = 128
    config.training.num_steps = 100_000
    config.training.ema_rates = (0.9999,)
    config.training.log_every = 100
    config.training.sample_every = 10_000
    config.training.checkpoint_every = 10_000
    config.training.keep_every = 25_000

    config.sampling.mid_sigma = 0.821

    config.eval.feature_extractor = "inception"
    config.eval.num_samples = 50_000
    config.eval.steps = (1, 2)
    return config
