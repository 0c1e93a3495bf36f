"""Test setup: CPU only, 8 fake devices so that mesh code runs as on a pod slice."""

import os
import shutil
import tempfile

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

# One persistent compilation cache per test session, shared by the xdist workers and by the processes the tests
# start (main.py runs, two-process and fault-tolerance tests inherit the environment): a program that several tests
# compile (the same tiny train step, sampler or digest function) compiles once. The controller, which loads this
# file first, makes the directory; the workers inherit the variable; the controller removes it at the end.
_CACHE_OWNER = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _CACHE_OWNER:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="consistency_jax_test_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import jax  # noqa: E402

# Tiny test models compile much faster without XLA's optimisation passes.
jax.config.update("jax_disable_most_optimizations", True)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def edm_teacher_workdir(tmp_path_factory):
    """A workdir of a tiny EDM diffusion run (2 steps, checkpoint at 2, EMA 0.9): a teacher for CD/ECT tests.

    Read-only for the tests that use it: copy it before changing anything in it.
    """
    from consistency_jax import methods, train
    from tests.helpers import tiny_config

    config = tiny_config(num_steps=2)
    config.method = methods.method_config("edm")
    config.sampling.num_steps = 3
    config.eval.steps = (3,)
    workdir = str(tmp_path_factory.mktemp("edm_teacher"))
    train.train_and_evaluate(config, workdir)
    return workdir


def pytest_unconfigure(config):
    if _CACHE_OWNER:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
