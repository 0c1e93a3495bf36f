"""SCT on class-conditional ImageNet 64x64 with EDM2's U-Net (Wang, Geng, Li 2024, "Stable Consistency Tuning").

Size: EDM2-XL by default; `:S`, `:M`, `:L` pick the other sizes with ECT's presets (see imagenet64_ect.py for
the table, the starting checkpoints and why EDM2 pickles are not convertible yet). Run:

    python -m consistency_jax.main --config=configs/imagenet64_sct.py:XL --workdir=/path/to/workdir \
        --config.method.teacher_workdir=/path/to/edm2_img64_xl

Published FID (50k samples): 1-step 2.42, 2-step 1.55 (SPEC section 4; the best consistency-model numbers of
their time). Which size and budget gave them, and whether with guidance, is not in SPEC: unconfirmed.

Recipe: imagenet64_ect.py's (Adam lr / sqrt(max(step / 2000, 1)), betas (0.9, 0.99), q = 4, d = 25k,
ln t ~ N(-0.8, 1.6^2), c = 0.06, weight 1/t^2 + 1/sd^2, batch 1024, 100k iterations, EMAs 0.9999 and sigma_rel
0.010/0.050/0.100) with SCT's variance-reduced target: x0_hat is the softmax-weighted average over the global
batch restricted to the sample's class (methods/sct.py; one all-gather of the 1024 reference images per step).
The SCT code is not public (G-U-N/Stable-Consistency-Tuning has a README only), so SCT's own schedule changes
are not reproduced. Classifier-free guidance is off: EDM2's conditional networks were not trained with label
dropout, so the null class is untrained at the start; to use it, tune with --config.method.label_dropout=0.1
and sample with --config.method.guidance_scale > 1 (values unconfirmed). Edge-skipping multistep sampling:
--config.method.sampler_eta (< 1; our reading of SCT, unconfirmed).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import imagenet64_ect  # noqa: E402  (configs are exec'd by path, not imported as a package)


def get_config(size: str = "XL"):
    return imagenet64_ect.get_config(size, "sct")
