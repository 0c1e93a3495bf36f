"""Distances between a student output and its target, one value per example."""

import math

import jax
import jax.numpy as jnp


def default_huber_c(image_shape: tuple[int, ...]) -> float:
    """iCT's c = 0.00054 sqrt(d), d = H * W * C (CIFAR-10: 0.0299, ImageNet-64: 0.0599)."""
    return 0.00054 * math.sqrt(math.prod(image_shape))


def pseudo_huber(a: jax.Array, b: jax.Array, c: float) -> jax.Array:
    """sqrt(||a - b||^2 + c^2) - c with the norm over the whole image (not element-wise)."""
    squared = jnp.sum(jnp.square(a - b).reshape(a.shape[0], -1), axis=-1)
    return jnp.sqrt(squared + c * c) - c


def squared_l2(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(a - b).reshape(a.shape[0], -1), axis=-1)


def l2(a: jax.Array, b: jax.Array) -> jax.Array:
    """||a - b||_2 over the whole image (ACT's 'l2', not squared); gradient 0 where a == b."""
    return jnp.sqrt(jnp.maximum(squared_l2(a, b), 1e-30))
