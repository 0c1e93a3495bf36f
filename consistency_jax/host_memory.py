"""Keeps glibc's malloc from handing XLA's per-step buffers back to the kernel (CPU backend only)."""

import ctypes
import ctypes.util
import functools

import jax
from absl import logging

# mallopt() parameters of glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_TOP_PAD_BYTES = 64 << 20  # glibc's per-thread heaps are 64 MiB: a free heap of that size stays mapped
_NEVER_TRIM_BYTES = 2**31 - 1  # mallopt takes an int
# The jax.monitoring event JAX records when XLA has compiled (or loaded from the cache) a program, before it runs.
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# Compiles shorter than this leave little behind; trimming after each of the test suite's thousands of small
# compiles cost more in page faults (system time 44-52 -> 62 s, 1007 tests) than it returned.
_TRIM_AFTER_COMPILE_SECS = 1.0

_keeping = False


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def keep_freed_memory() -> bool:
    """Makes malloc reuse freed memory instead of unmapping it; returns whether the C library took the settings.

    XLA's CPU runtime allocates the buffers of a program on every call and frees
    them at its end. With glibc's defaults, large blocks are mmap'd and unmapped
    each time and the per-thread heaps shrink whenever their top is free, so every
    train step faults all its buffers in again: ~30,000 page faults per quickstart
    step, a fifth of the run's CPU time spent in the kernel. No mmap for
    allocations, no trimming and a top pad of one thread heap keep the pages: the
    quickstart step took 0.208 instead of 0.254 CPU-seconds (benchmarks/README.md,
    "Page faults"). The setting is process-wide and lasts, so entry points call it
    (main.py, the benchmark, the tests), not library code; release_free_memory()
    hands the kept pages back at moments the caller chooses, and after every XLA
    compile (trim_after_compile). A C library other than glibc (macOS, musl) is left
    as it is.
    """
    global _keeping
    libc = _glibc()
    if libc is None:
        return False
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM_BYTES), (_M_TOP_PAD, _TOP_PAD_BYTES))
    was_keeping = _keeping
    _keeping = all([libc.mallopt(param, value) == 1 for param, value in settings])
    if _keeping and not was_keeping:
        jax.monitoring.register_event_duration_secs_listener(trim_after_compile)
    return _keeping


def keep_freed_memory_on_cpu() -> None:
    """keep_freed_memory() when JAX runs on the CPU; accelerators keep their buffers in their own memory.

    Elsewhere the host's malloc serves the input pipeline (TensorFlow's among it),
    whose memory should go back to the system as usual.
    """
    if jax.default_backend() == "cpu" and keep_freed_memory():
        logging.info("CPU backend: malloc keeps freed memory for reuse (no per-step page faults).")


def release_free_memory() -> None:
    """Hands the free pages that keep_freed_memory() kept back to the kernel (glibc's malloc_trim).

    The training loop calls it at every log step: each thread's heap keeps its own
    peak otherwise (orbax's and the evaluation's threads included), which raised the
    quickstart's peak RSS from 2.0 to 2.4 GB; trimmed every 100 steps it peaked at
    1.9 GB, and faulting a step's buffers in once per 100 steps costs nothing
    measurable. A no-op unless keep_freed_memory() took effect.
    """
    if _keeping:
        _glibc().malloc_trim(0)


def trim_after_compile(event: str, duration_secs: float, **kwargs) -> None:
    """A jax.monitoring listener: release_free_memory() once XLA has compiled a program, before the program runs.

    Kept by malloc, the compiler's freed working memory would stay in the process
    beside the program's buffers, which XLA's worker threads allocate from other
    heaps: the small NCSN++ train step peaked at 2.36 GB that way, 1.62 GB trimmed
    after its compile (benchmarks/README.md). Every compile, not only the train
    step's: the samplers and the evaluation compile in the middle of a run too.
    Compiles under a second are left alone.
    """
    if event == _BACKEND_COMPILE_EVENT and duration_secs >= _TRIM_AFTER_COMPILE_SECS:
        release_free_memory()
