"""sCT on CIFAR-10: continuous-time consistency training (Lu & Song 2024), from a TrigFlow diffusion model.

Run (two stages; the paper initialises the CM from its teacher's EMA, appendix G.2):
    python -m consistency_jax.main --config=configs/cifar10_trigflow.py --workdir=/path/to/trigflow_cifar10
    python -m consistency_jax.main --config=configs/cifar10_scm_ct.py --workdir=/path/to/sct_cifar10 \\
        --config.method.teacher_workdir=/path/to/trigflow_cifar10

Published FID (50k samples, table 1): 1-step 2.85, 2-step 2.06 (2-step through t_mid = 1.1,
i.e. sigma = 0.5 tan(1.1) = 0.982). The first arXiv version reported 1-step 2.97. FastGen's
sCT from the EDM checkpoint (not the paper's TrigFlow teacher): 1-step 3.23.

Recipe (section 4, appendix G.2): the teacher's network, TrigFlow DDPM++ with c_noise(t) = t,
positional embedding and adaptive double normalisation (configs/cifar10_trigflow.py),
dropout 0.20; RAdam lr 1e-4, betas (0.9, 0.99), eps 1e-8, no schedule; batch 512 (the
teacher's); ln(sd tan t) ~ N(-1.0, 1.4^2); tangent normalisation c = 0.1; tangent warm-up
10k iterations; learned adaptive weighting; EMA half-life 0.5 Mimg (0.999291 per step at
batch 512); sampling from t_max = arctan(80 / 0.5). The paper's attention is EDM's (plain
softmax attention, which PyTorch's forward AD goes through): here attention_impl='xla',
and jax.jvp needs no custom rule.

Unconfirmed: the number of iterations (not in the paper for CIFAR-10; FastGen's sCT
config runs 350k at batch 512, the paper's ECT comparison 400k at batch 128), random
flips (the teacher's EDM setting). Alternatively (FastGen's recipe) fine-tune NVIDIA's EDM
DDPM++ VP checkpoint converted with `python -m consistency_jax.convert`: set
--config.method.time_conditioning=edm, config.model to that network (no adaptive double
normalisation; its teacher_config.json says which) and --config.method.p_std=1.8
(FastGen's note for sCT from the EDM checkpoint).

References read: the paper (Algorithm 1, tables 1 and 3, appendices D, G); NVlabs/FastGen
fastgen/methods/consistency_model/sCM.py, fastgen/configs/methods/config_scm.py,
fastgen/configs/experiments/EDM/config_sct_cifar10.py (differences: methods/scm.py).

Hardware: not recorded in the paper. Cost: a step is a forward, a JVP (about two forward
passes) and a backward pass of the 60.1M-parameter TrigFlow DDPM++ (about 5 forward passes per
image, benchmarks/jvp_cost.py measures the ratio), 400k steps at batch 512.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cifar10_trigflow  # noqa: E402  (configs are exec'd by path, not imported as a package)
import default  # noqa: E402

import ml_collections  # noqa: E402

from consistency_jax import methods  # noqa: E402


def get_config(method: str = "scm_ct", dropout: float = 0.2) -> ml_collections.ConfigDict:
    config = default.get_config()
    config.method = methods.method_config(method)
    config.method.p_mean = -1.0
    config.method.p_std = 1.4
    config.method.tangent_warmup_steps = 10_000
    config.method.tangent_normalization = "l2"
    config.method.tangent_norm_c = 0.1
    config.method.adaptive_weighting = True
    config.method.time_conditioning = "trigflow"
    config.method.time_scale = 1.0
    config.method.teacher_ema_rate = -1.0  # the teacher's EMA (its first)

    config.model = cifar10_trigflow.trigflow_ddpmpp_model(dropout=dropout)

    config.data.name = "cifar10"
    config.data.image_size = 32
    config.data.num_channels = 3
    config.data.num_classes = 0
    config.data.random_flip = True

    config.optimizer.name = "radam"
    config.optimizer.learning_rate = 1e-4
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.99
    config.optimizer.eps = 1e-8
    config.optimizer.lr_schedule = "constant"

    config.training.batch_size = 512
    config.training.num_steps = 400_000
    config.training.ema_rates = (0.999291,)  # EMA half-life 0.5 Mimg at batch 512
    config.training.log_every = 100
    config.training.sample_every = 10_000
    config.training.checkpoint_every = 10_000
    config.training.keep_every = 50_000

    config.sampling.mid_sigma = 0.5 * 1.9647596572486523  # sd tan(t_mid), t_mid = 1.1

    config.eval.feature_extractor = "inception"
    config.eval.num_samples = 50_000
    config.eval.steps = (1, 2)
    return config
