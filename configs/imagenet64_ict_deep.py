"""iCT-deep on class-conditional ImageNet 64x64: imagenet64_ict.py with twice the res blocks (6).

Run:
    python -m consistency_jax.main --config=configs/imagenet64_ict_deep.py --workdir=/path/to/workdir

Published FID (50k samples): 1-step 3.25, 2-step 2.77 (2-step through
sigma = 1.526).

Network: ADM with num_res_blocks = 6, 495,358,467 parameters; everything else
as imagenet64_ict.py (see its docstring for the unconfirmed values).

Hardware: not recorded in SPEC (unconfirmed). Cost: 348.8 GFLOP per forward
pass per image, 800k * 4096 * 4 * 348.8e9 = 4.6e21 FLOP: about 53 days at a
sustained 1 PFLOP/s, roughly 7 days on 64 A100s at ~40% of bf16 peak.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import imagenet64_ict  # noqa: E402  (configs are exec'd by path, not imported as a package)

import ml_collections  # noqa: E402


def get_config() -> ml_collections.ConfigDict:
    config = imagenet64_ict.get_config()
    config.model = imagenet64_ict.adm_model(config, num_res_blocks=6)
    return config
