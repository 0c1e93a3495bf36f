"""Shared test fixtures: a tiny model on the digits that compiles in seconds."""

import os
import re
import sys

import jax
import ml_collections

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import default  # noqa: E402


def tiny_config(num_steps: int = 4) -> ml_collections.ConfigDict:
    config = default.get_config()
    # One 8x8 level with attention: the train step compiles in half the time of two levels (the suite's time is
    # mostly compiling); multi-level networks are tested in test_models_paper.py.
    config.model.update(dict(model_channels=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(8,),
                             dropout=0.1, embedding_type="fourier", fourier_scale=1.0))
    config.training.batch_size = 16
    config.training.num_steps = num_steps
    config.training.ema_rates = (0.9,)
    config.training.log_every = 2
    config.training.sample_every = 0
    config.training.checkpoint_every = num_steps
    config.optimizer.learning_rate = 1e-3
    config.eval.at_end = False
    config.eval.num_samples = 16
    return config


def child_xla_flags(num_devices: int) -> str:
    """XLA_FLAGS for a process a test starts: the session's flags (conftest.py) with num_devices CPU devices."""
    flag = "--xla_force_host_platform_device_count"
    return re.sub(flag + r"=\d+", f"{flag}={num_devices}", os.environ["XLA_FLAGS"])


def jit_init(fn, seed: int, image_shape: tuple[int, ...], with_labels: bool = False):
    """fn.init (a ConsistencyFunction's) under jit: one compile, where an eager init compiles the network op by op."""
    return jax.jit(fn.init, static_argnums=(1, 2))(jax.random.PRNGKey(seed), tuple(image_shape), with_labels)
