"""Config of the child runs in the fault-tolerance and multi-host tests: the tiny test model.

Used as `--config=tests/ft_config.py` (from the repository root); the tests
set steps, mesh and checkpointing with `--config.<field>=...` overrides.
"""

from tests.helpers import tiny_config


def get_config():
    config = tiny_config(num_steps=8)
    config.model.attn_resolutions = ()  # these runs test processes, signals and checkpoints: compile less
    config.method.curriculum_steps = 8  # fixed, so that runs of different lengths agree step by step
    config.training.log_every = 1  # one metrics line per step: the tests read the losses from it
    config.mesh.fsdp_min_size = 256  # small enough that the tiny model's larger arrays are split under FSDP
    return config
