"""host_memory: freed buffers are reused, not faulted in again; each XLA compile hands the compiler's back."""

import os
import subprocess
import sys

import pytest

from tests.helpers import child_xla_flags

_STEPS = 5
_CHILD = """
import resource, sys
import numpy as np
from consistency_jax import host_memory
if sys.argv[1] != "default":
    assert host_memory.keep_freed_memory()
def minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # like a train step's buffers: 32 blocks of 1 MiB allocated, every page written, all freed
    buffers = [np.ones(1 << 20, np.uint8) for _ in range(32)]
    del buffers
    if sys.argv[1] == "keep_and_release":
        host_memory.release_free_memory()
step()  # the first step faults its pages in either way
before = minor_faults()
for _ in range(int(sys.argv[2])):
    step()
print(minor_faults() - before)
"""


def _faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, str(_STEPS)], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1]) / _STEPS


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_buffers_are_reused_without_page_faults():
    pages = 32 * (1 << 20) // 4096
    # glibc's default returns the freed blocks to the kernel: the next step faults them in again (~8,160 of 8,192).
    assert _faults_per_step("default") > 0.5 * pages
    assert _faults_per_step("keep") < 0.01 * pages
    # What release_free_memory hands back to the kernel, the next step faults in again.
    assert _faults_per_step("keep_and_release") > 0.5 * pages


_COMPILE_CHILD = """
import sys
import jax
from consistency_jax import host_memory, train
from consistency_jax.experiment import create_experiment
from benchmarks.train_step import synthetic_batch
from tests.helpers import tiny_config
assert host_memory.keep_freed_memory()
if sys.argv[1] == "without_trim_after_compile":
    jax.monitoring.unregister_event_duration_listener(host_memory.trim_after_compile)
def status_mib(field):  # VmRSS: now; VmHWM: this process's peak (getrusage's also counts its parent's at the fork)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))
experiment = create_experiment(tiny_config(), jax.devices()[:1])
state = experiment.create_state()
batch = synthetic_batch(experiment, experiment.config.training.batch_size)
before = status_mib("VmRSS")
compiled = train.jit_train_step(experiment).lower(state, batch).compile()
after = status_mib("VmRSS")
peak = status_mib("VmHWM")
print(before, after, peak)
"""


def _rss_around_compile(how: str) -> tuple[float, float, float]:
    """(RSS before, RSS after, peak RSS) in MiB around compiling the tiny train step in a fresh process (`how`)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # a real compile, not a load
    env["XLA_FLAGS"] = child_xla_flags(1)
    out = subprocess.run([sys.executable, "-c", _COMPILE_CHILD, how], capture_output=True, text=True, check=True,
                         env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    before, after, peak = map(float, out.stdout.split()[-3:])
    return before, after, peak


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_each_compile_hands_the_compilers_memory_back():
    # Kept by malloc, the compiler's freed working memory stays in the process: its RSS ends at the compile's peak.
    before, after, peak = _rss_around_compile("without_trim_after_compile")
    assert after > peak - 8
    # trim_after_compile hands it back (the tiny step: ~50 of the compile's ~120 MiB; the small NCSN++: 0.8 GB).
    before, after, peak = _rss_around_compile("keep_freed_memory")
    assert after < peak - 0.25 * (peak - before)
