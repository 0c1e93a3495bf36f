"""Test setup: CPU only, 8 fake devices so that mesh code runs as on a pod slice."""

import os
import shutil
import subprocess
import sys
import tempfile

# Must happen before jax is imported anywhere in the test session. The environment, not jax.config, so that the
# processes the tests start (main.py runs, two-process and fault-tolerance children) inherit it too.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tiny test models compile much faster without XLA's optimisation passes.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags = (_flags + " --xla_force_host_platform_device_count=8").strip()
# XLA CPU's loop emitters compile these unoptimised programs ~40% faster than its default fusion emitters (the
# tiny iCT train step: 9.3 -> 5.7 s, the same loss): the suite spends most of its time compiling. Only where
# this jaxlib has the flag (XLA aborts on an unknown one); the workers inherit the result in XLA_FLAGS.
_FAST_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"
if "xla_cpu_use_fusion_emitters" not in _flags:
    _probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": _FAST_COMPILE_FLAG})
    if _probe.returncode == 0:
        _flags += " " + _FAST_COMPILE_FLAG
os.environ["XLA_FLAGS"] = _flags

# One persistent compilation cache per test session, shared by the xdist workers and by the processes the tests
# start (main.py runs, two-process and fault-tolerance tests inherit the environment): a program that several tests
# compile (the same tiny train step, sampler or digest function) compiles once. The controller, which loads this
# file first, makes the directory; the workers inherit the variable; the controller removes it at the end.
_CACHE_OWNER = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _CACHE_OWNER:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="consistency_jax_test_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import pytest  # noqa: E402

from consistency_jax import host_memory  # noqa: E402

host_memory.keep_freed_memory()  # as main.py does on CPU: programs reuse their buffers' pages from call to call


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
