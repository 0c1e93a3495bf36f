"""Building blocks shared by the networks."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


class FourierEmbedding(nn.Module):
    """Random Fourier features of the noise label (NCSN++ / iCT).

    The frequencies are fixed, not trained: they are drawn from a fixed key at
    trace time, so they are a compile-time constant and not part of the params.
    iCT uses scale 0.02 on CIFAR-10 instead of the original 16: lower
    sensitivity to the exact noise level.
    """

    features: int
    scale: float = 16.0

    @nn.compact
    def __call__(self, noise_labels: jax.Array) -> jax.Array:
        freqs = self.scale * jax.random.normal(jax.random.PRNGKey(0), (self.features // 2,), jnp.float32)
        angles = 2 * math.pi * noise_labels[:, None].astype(jnp.float32) * freqs[None, :]
        return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class PositionalEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of the noise label (DDPM++ / ADM)."""

    features: int
    max_positions: int = 10000

    @nn.compact
    def __call__(self, noise_labels: jax.Array) -> jax.Array:
        half = self.features // 2
        freqs = jnp.exp(-math.log(self.max_positions) * jnp.arange(half, dtype=jnp.float32) / half)
        angles = noise_labels[:, None].astype(jnp.float32) * freqs[None, :]
        return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def noise_embedding(kind: str, features: int, fourier_scale: float) -> nn.Module:
    if kind == "fourier":
        return FourierEmbedding(features, scale=fourier_scale)
    if kind == "positional":
        return PositionalEmbedding(features)
    raise ValueError(f"Unknown noise embedding {kind!r}; valid: 'fourier', 'positional'.")
