"""Variance-preserving diffusion in the framework's sigma terms: the cosine schedule, DDIM, inverse DDIM, aDDIM.

Multistep consistency models (Heek, Hoogeboom & Salimans 2024; SPEC section 5) are written in the
variance-preserving (VP) notation z_t = alpha_t x + std_t eps, alpha_t^2 + std_t^2 = 1, t in [0, 1]
(the paper's sigma_t is `std` here, to keep `sigma` for the framework's noise level). The framework's
networks take (x_sigma, sigma) with x_sigma = x + sigma eps (variance exploding, EDM). The two describe
the same process:

    sigma = std / alpha,   x_sigma = z / alpha,   log-SNR = ln(alpha^2 / std^2) = -2 ln(sigma),
    alpha = 1 / sqrt(1 + sigma^2),   std = sigma / sqrt(1 + sigma^2),

so a VP model is a sigma-space network called at (z_t / alpha_t, sigma_t), and the EDM teachers and a
multistep student share one network (`Level.of_sigma`, `to_sigma_space`, `from_sigma_space`).

The cosine schedule: alpha_t = cos(pi t / 2), i.e. sigma(t) = tan(pi t / 2) and log-SNR(t) =
-2 ln tan(pi t / 2). It is truncated as in Google's diffusion code (logsnr_schedule_cosine of simple
diffusion / progressive distillation, which clip the log-SNR to [logsnr_min, logsnr_max]): here the
limits are noise levels, t = 0 at sigma_min and t = 1 at sigma_max,

    sigma(t) = tan(u0 + t (u1 - u0)),   u0 = atan(sigma_min),   u1 = atan(sigma_max),

so every DDIM coefficient stays finite (alpha_1 > 0, std_0 > 0) and t needs no clipping. With
sigma_min = 0.002 and sigma_max = 80 (EDM's range, log-SNR in [-8.8, 12.4]) it differs from the
untruncated cosine by less than 0.002 in u. An optional log-SNR shift (simple diffusion's
"shifted cosine", 2 ln(noise_resolution / image_resolution)) moves the interior and keeps the ends.

DDIM, invDDIM and aDDIM are the paper's equations (4), (5) and Algorithm 3 / eq. (14), as pure
functions of VP arrays and per-example Levels.
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Level(NamedTuple):
    """The VP coefficients of one noise level per example ([B] arrays, or scalars)."""

    alpha: jax.Array  # alpha_t
    std: jax.Array  # the paper's sigma_t (VP noise standard deviation)

    @classmethod
    def of_sigma(cls, sigma: jax.Array) -> "Level":
        """The VP coefficients of the framework's noise level sigma = std / alpha."""
        alpha = jax.lax.rsqrt(1.0 + jnp.square(sigma))
        return cls(alpha=alpha, std=sigma * alpha)

    @property
    def sigma(self) -> jax.Array:
        return self.std / self.alpha

    @property
    def snr(self) -> jax.Array:
        """alpha^2 / std^2 = 1 / sigma^2."""
        return jnp.square(self.alpha / self.std)


def to_sigma_space(z: jax.Array, level: Level) -> jax.Array:
    """x_sigma = z_t / alpha_t: what a sigma-space network takes."""
    return z / _image(level.alpha, z)


def from_sigma_space(x_sigma: jax.Array, level: Level) -> jax.Array:
    """z_t = alpha_t x_sigma."""
    return x_sigma * _image(level.alpha, x_sigma)


# ----------------------------------------------------------------------------
# The cosine schedule.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CosineSchedule:
    """The truncated (and optionally shifted) cosine schedule; sigma(0) = sigma_min, sigma(1) = sigma_max.

    log-SNR(t) = -2 ln tan(u0 + t (u1 - u0)) + logsnr_shift, with u0, u1 chosen so that the ends stay at
    sigma_min and sigma_max (k-diffusion's form of simple diffusion's shifted schedule). A negative shift
    (high resolutions) puts more of [0, 1] at high noise.
    """

    sigma_min: float
    sigma_max: float
    logsnr_shift: float = 0.0

    def _ends(self) -> tuple[float, float, float]:
        scale = math.exp(self.logsnr_shift / 2)  # sigma = tan(u) / scale
        return scale, math.atan(self.sigma_min * scale), math.atan(self.sigma_max * scale)

    def sigma(self, t: jax.Array) -> jax.Array:
        scale, u0, u1 = self._ends()
        return jnp.tan(u0 + jnp.asarray(t, jnp.float32) * (u1 - u0)) / scale

    def sigma_values(self, times) -> tuple[float, ...]:
        """sigma(t) as Python floats (numpy, float64): for sampler grids, fixed before anything is traced."""
        scale, u0, u1 = self._ends()
        return tuple(float(v) for v in np.tan(u0 + np.asarray(times, np.float64) * (u1 - u0)) / scale)

    def time(self, sigma: jax.Array) -> jax.Array:
        """The inverse of `sigma`: the t in [0, 1] of a noise level in [sigma_min, sigma_max]."""
        scale, u0, u1 = self._ends()
        return (jnp.arctan(jnp.asarray(sigma, jnp.float32) * scale) - u0) / (u1 - u0)

    def level(self, t: jax.Array) -> Level:
        return Level.of_sigma(self.sigma(t))


# ----------------------------------------------------------------------------
# DDIM and its relatives (VP arrays [B, H, W, C]; Levels per example [B]).
# ----------------------------------------------------------------------------


def ddim(x_hat: jax.Array, z_t: jax.Array, t: Level, s: Level) -> jax.Array:
    """DDIM_{t->s}(x_hat, z_t) = alpha_s x_hat + (std_s / std_t)(z_t - alpha_t x_hat)  (paper eq. 4)."""
    a_t, std_t, a_s, std_s = (_image(v, z_t) for v in (t.alpha, t.std, s.alpha, s.std))
    return a_s * x_hat + (std_s / std_t) * (z_t - a_t * x_hat)


def inv_ddim(z_s: jax.Array, z_t: jax.Array, t: Level, s: Level) -> jax.Array:
    """The x for which DDIM_{t->s}(x, z_t) = z_s: (z_s - (std_s/std_t) z_t) / (alpha_s - alpha_t std_s/std_t)  (eq. 5).

    Defined for s != t (the denominator is alpha_s (1 - sigma_s / sigma_t)).
    """
    a_t, std_t, a_s, std_s = (_image(v, z_t) for v in (t.alpha, t.std, s.alpha, s.std))
    ratio = std_s / std_t
    return (z_s - ratio * z_t) / (a_s - a_t * ratio)


def addim(x_hat: jax.Array, z_t: jax.Array, t: Level, s: Level, x_var: jax.Array) -> jax.Array:
    """Adjusted DDIM (Algorithm 3, eq. 14): DDIM with the noise estimate inflated by the prediction's variance.

    eps_hat = (z_t - alpha_t x_hat) / std_t,  z_var = (alpha_s - alpha_t std_s / std_t)^2 x_var,
    z_s = alpha_s x_hat + sqrt(std_s^2 + (d / ||eps_hat||^2) z_var) eps_hat,
    with x_var = tr(Var[x | z_t]) / d per example ([B] or scalar; d = H W C). x_var = 0 is DDIM exactly.
    """
    a_t, std_t, a_s, std_s = (_image(v, z_t) for v in (t.alpha, t.std, s.alpha, s.std))
    eps_hat = (z_t - a_t * x_hat) / std_t
    z_var = jnp.square(a_s - a_t * std_s / std_t) * _image(jnp.asarray(x_var, z_t.dtype), z_t)
    d = math.prod(z_t.shape[1:])
    eps_norm_sq = _image(jnp.sum(jnp.square(eps_hat).reshape(z_t.shape[0], -1), axis=-1), z_t)
    # A prediction equal to z_t / alpha_t has eps_hat = 0; the inflation then has nothing to scale.
    inflation = jnp.where(eps_norm_sq > 0, d * z_var / jnp.maximum(eps_norm_sq, 1e-30), 0.0)
    return a_s * x_hat + jnp.sqrt(jnp.square(std_s) + inflation) * eps_hat


def ddim_sample(denoiser, params, rng: jax.Array, shape: tuple[int, ...], sigmas, labels: jax.Array | None = None
                ) -> jax.Array:
    """Deterministic DDIM through the noise levels `sigmas` (descending), from z ~ N(0, I) at sigmas[0].

    At each level the network predicts x_hat = denoiser(params, z / alpha_t, sigma_t, labels) and
    z <- DDIM_{t->s}(x_hat, z) (multistep consistency sampling, the paper's Algorithm 2, when `denoiser` is a
    multistep consistency model and `sigmas` its segment boundaries). A last level of 0 (alpha = 1, std = 0)
    makes the last step return x_hat itself. Returns z / alpha at the last level: x in sigma space.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)

    def step(z, pair):
        sigma_t, sigma_s = pair
        t = Level.of_sigma(sigma_t)
        x_hat = denoiser(params, to_sigma_space(z, t), sigma_t, labels)
        return ddim(x_hat, z, t, Level.of_sigma(sigma_s)), None

    z, _ = jax.lax.scan(step, jax.random.normal(rng, shape), (sigmas[:-1], sigmas[1:]))
    return to_sigma_space(z, Level.of_sigma(sigmas[-1]))


def _image(v: jax.Array, like: jax.Array) -> jax.Array:
    """A per-example [B] value (or a scalar) broadcast against [B, ...] images."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim)) if v.ndim else v
