"""`python -m consistency_jax.main` for the child processes of the fault-tolerance and multi-host tests.

Run from the repository root as `python -m tests.ft_driver <main.py flags>`.
Test-only knobs, read from the environment:

  FT_STEP_DELAY_S   sleep this long before every train step, so that a test can
                    signal a run in the middle rather than after it finished
"""

import os
import time

from absl import app

from consistency_jax import main, parallel


def _with_delay(global_batch, delay_s: float):
    def delayed(local_batch, mesh):
        time.sleep(delay_s)
        return global_batch(local_batch, mesh)

    return delayed


if __name__ == "__main__":
    if os.environ.get("FT_STEP_DELAY_S"):
        parallel.global_batch = _with_delay(parallel.global_batch, float(os.environ["FT_STEP_DELAY_S"]))
    app.run(main.main, flags_parser=main.parse_flags)
