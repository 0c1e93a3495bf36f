"""Samplers for consistency models.

Multistep consistency sampling (CM paper, Algorithm 1): start at sigma_0 =
sigma_max, jump to the data with f, re-noise to the next sigma, and repeat.
One step is the special case of a single sigma.
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from consistency_jax.parametrization import ConsistencyFunction


def consistency_sample(fn: ConsistencyFunction, params: Any, rng: jax.Array, shape: tuple[int, ...],
                       sigmas: jax.Array, labels: jax.Array | None = None) -> jax.Array:
    """x_0 from sigmas[0] * z, then x <- f(x + sqrt(s^2 - s_min^2) z, s) for the later sigmas.

    `sigmas` is a decreasing 1-D array, sigmas[0] usually sigma_max.
    """
    init_rng, step_rng = jax.random.split(rng)
    x = fn(params, sigmas[0] * jax.random.normal(init_rng, shape), sigmas[0], labels)

    def renoise_and_denoise(x, inputs):
        sigma, key = inputs
        noise_scale = jnp.sqrt(jnp.maximum(sigma**2 - fn.sigma_min**2, 0.0))
        return fn(params, x + noise_scale * jax.random.normal(key, shape), sigma, labels), None

    keys = jax.random.split(step_rng, sigmas.shape[0] - 1)
    x, _ = jax.lax.scan(renoise_and_denoise, x, (sigmas[1:], keys))
    return x


def sampling_sigmas(config: ml_collections.ConfigDict, num_steps: int) -> tuple[float, ...]:
    """The sigmas of an n-step sampler: sigma_max, then the config's intermediate sigmas.

    1 step: (sigma_max,). 2 steps: (sigma_max, sampling.mid_sigma). More steps
    take their intermediate sigmas from `sampling.sigmas` (descending).
    """
    sigma_max = config.parametrization.sigma_max
    if num_steps == 1:
        return (sigma_max,)
    if num_steps == 2 and not config.sampling.sigmas:
        return (sigma_max, config.sampling.mid_sigma)
    mids = tuple(config.sampling.sigmas)
    if len(mids) != num_steps - 1:
        raise ValueError(f"A {num_steps}-step sampler needs {num_steps - 1} intermediate sigmas in "
                         f"config.sampling.sigmas, got {mids}.")
    return (sigma_max, *mids)


def to_uint8(images: jax.Array | Sequence) -> jax.Array:
    """[-1, 1] floats to uint8 0..255."""
    return jnp.clip(jnp.round((jnp.asarray(images) + 1) * 127.5), 0, 255).astype(jnp.uint8)
