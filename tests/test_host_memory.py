"""host_memory.keep_freed_memory: a step's freed buffers are reused, not faulted in again on the next step."""

import subprocess
import sys

import pytest

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
