"""SCT on CIFAR-10 (Wang, Geng, Li 2024, "Stable Consistency Tuning"): ECT with the variance-reduced target.

Starting checkpoint and conversion: as configs/cifar10_ect.py (EDM's edm-cifar10-32x32-uncond-vp.pkl, exported
and converted with `python -m consistency_jax.convert`). Run:

    python -m consistency_jax.main --config=configs/cifar10_sct.py --workdir=/path/to/workdir \
        --config.method.teacher_workdir=/path/to/edm_vp

Everything as cifar10_ect.py (batch 128, RAdam 1e-4, dropout 0.2, EMA 0.9999, q = 2, d = 25k, mid t = 0.821,
100k iterations) except the teacher's input: x_r = x_t - (t - r)(x_t - x0_hat)/t with x0_hat the
softmax-weighted average of the global batch (methods/sct.py; the reference batch is the 128 images of the
step). SPEC section 4 records no CIFAR-10 number for SCT (its ImageNet-64 result is in imagenet64_sct.py);
compare against ECT's 4.54 / 2.20 at 100k iterations. The SCT authors' code is not public
(G-U-N/Stable-Consistency-Tuning holds a README only), so SCT's own CIFAR-10 schedule and batch are
unconfirmed: this is ECT's recipe with SCT's estimator.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cifar10_ect  # noqa: E402  (configs are exec'd by path, not imported as a package)


def get_config():
    return cifar10_ect.get_config("sct")
