"""Test setup: CPU only, 8 fake devices so that mesh code runs as on a pod slice."""

import os

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

# Tiny test models compile much faster without XLA's optimisation passes.
jax.config.update("jax_disable_most_optimizations", True)
