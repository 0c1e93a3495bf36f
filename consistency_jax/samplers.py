"""Samplers: what a method draws images with, for grids, --mode=sample and --mode=eval.

A method returns a `Sampler` for a step count (methods/base.py); the
evaluation code jits its `sample` function once per `key` and reports its
sigmas and number of network evaluations.

Multistep consistency sampling (CM paper, Algorithm 1): start at sigma_0 =
sigma_max, jump to the data with f, re-noise to the next sigma, and repeat.
One step is the special case of a single sigma. As in the CM PyTorch code
(openai/consistency_models, cm/karras_diffusion.py: karras_sample with
clip_denoised=True), every denoised output is clamped to the data range
[-1, 1] before it is re-noised, and so are the returned images
(`sampling.clip_denoised`).
"""

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from consistency_jax.parametrization import NetworkFunction

# (params, rng, shape, labels or None) -> images in [-1, 1]
SampleFn = Callable[[Any, jax.Array, tuple[int, ...], jax.Array | None], jax.Array]


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A sampling procedure for one step count."""

    key: tuple  # identifies the computation: samplers with equal keys share one compiled function
    sample: SampleFn = dataclasses.field(compare=False)
    sigmas: tuple[float, ...]  # the noise levels it visits, for the report
    network_evaluations: int


def clip_to_data_range(x: jax.Array) -> jax.Array:
    """Clamps images to the data range [-1, 1] (the samplers' clip_denoised)."""
    return jnp.clip(x, -1.0, 1.0)


def consistency_sample(fn: NetworkFunction, params: Any, rng: jax.Array, shape: tuple[int, ...],
                       sigmas: jax.Array, labels: jax.Array | None = None, *,
                       clip_denoised: bool = True) -> jax.Array:
    """x_0 from sigmas[0] * z, then x <- f(x + sqrt(s^2 - s_min^2) z, s) for the later sigmas.

    `sigmas` is a decreasing 1-D array, sigmas[0] usually sigma_max. With
    `clip_denoised` each f(...) is clamped to [-1, 1] before it is re-noised
    or returned (CM's karras_sample).
    """
    def denoise(x, sigma):
        denoised = fn(params, x, sigma, labels)
        return clip_to_data_range(denoised) if clip_denoised else denoised

    init_rng, step_rng = jax.random.split(rng)
    x = denoise(sigmas[0] * jax.random.normal(init_rng, shape), sigmas[0])

    def renoise_and_denoise(x, inputs):
        sigma, key = inputs
        noise_scale = jnp.sqrt(jnp.maximum(sigma**2 - fn.sigma_min**2, 0.0))
        return denoise(x + noise_scale * jax.random.normal(key, shape), sigma), None

    keys = jax.random.split(step_rng, sigmas.shape[0] - 1)
    x, _ = jax.lax.scan(renoise_and_denoise, x, (sigmas[1:], keys))
    return x


def sampling_sigmas(config: ml_collections.ConfigDict, num_steps: int) -> tuple[float, ...]:
    """The sigmas of an n-step sampler: sigma_max, then the config's intermediate sigmas.

    Each step count reads only its own setting: 1 step (sigma_max,); 2 steps
    (sigma_max, sampling.mid_sigma); n >= 3 steps (sigma_max, *sampling.sigmas)
    with n - 1 sigmas in sampling.sigmas. So a 3-step sampler never disturbs
    the 2-step one that the evaluation runs beside it.
    """
    sigma_max = config.parametrization.sigma_max
    if num_steps < 1:
        raise ValueError(f"A sampler needs at least 1 step, got {num_steps}.")
    if num_steps == 1:
        return (sigma_max,)
    if num_steps == 2:
        return (sigma_max, config.sampling.mid_sigma)
    mids = tuple(config.sampling.sigmas)
    if len(mids) != num_steps - 1:
        raise ValueError(f"A {num_steps}-step sampler takes its {num_steps - 1} intermediate sigmas from "
                         f"config.sampling.sigmas, which holds {len(mids)}: {mids}. Set "
                         f"--config.sampling.sigmas='({', '.join(['s'] * (num_steps - 1))})' (descending, between "
                         f"parametrization.sigma_min and sigma_max).")
    return (sigma_max, *mids)


def consistency_sampler(fn: NetworkFunction, config: ml_collections.ConfigDict, num_steps: int) -> Sampler:
    """The multistep consistency sampler through `sampling_sigmas(config, num_steps)`.

    Clamps the denoised outputs when `config.sampling.clip_denoised`.
    """
    sigmas = sampling_sigmas(config, num_steps)
    clip_denoised = bool(config.sampling.clip_denoised)

    def sample(params, rng, shape, labels):
        return consistency_sample(fn, params, rng, shape, jnp.asarray(sigmas, jnp.float32), labels,
                                  clip_denoised=clip_denoised)

    return Sampler(key=("consistency", sigmas, clip_denoised), sample=sample, sigmas=sigmas,
                   network_evaluations=len(sigmas))


def edm_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> tuple[float, ...]:
    """EDM's sampling noise levels: the num_steps-point Karras grid from sigma_max down, then 0."""
    ramp = np.linspace(0.0, 1.0, num_steps) if num_steps > 1 else np.zeros(1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (*(float(s) for s in (hi + ramp * (lo - hi)) ** rho), 0.0)


def heun_step(denoise: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, sigma: jax.Array,
              sigma_next: jax.Array, second_order: bool = True) -> jax.Array:
    """One step of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma from sigma to sigma_next.

    Heun's 2nd-order method (EDM Algorithm 1), or an Euler step without
    `second_order` (EDM's last step, to sigma_next = 0). `sigma` and
    `sigma_next` are per-example [B] or scalars; sigma_next > 0 for Heun.
    """
    b = lambda v: jnp.reshape(v, (-1,) + (1,) * (x.ndim - 1))  # noqa: E731 -- broadcast over the image
    d = (x - denoise(x, sigma)) / b(sigma)
    x_next = x + b(sigma_next - sigma) * d
    if not second_order:
        return x_next
    d_next = (x_next - denoise(x_next, sigma_next)) / b(sigma_next)
    return x + b(sigma_next - sigma) * (d + d_next) / 2


def heun_sample(denoiser: NetworkFunction, params: Any, rng: jax.Array, shape: tuple[int, ...],
                sigmas: Sequence[float], labels: jax.Array | None = None, *, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0) -> jax.Array:
    """EDM's sampler (Algorithm 2): Heun steps through `sigmas` (descending, ending at 0).

    With s_churn = 0 it is the deterministic sampler (2N - 1 network
    evaluations for N noise levels); s_churn > 0 first raises each level in
    [s_tmin, s_tmax] by gamma = min(s_churn / N, sqrt(2) - 1), adding noise.
    """
    num_levels = len(sigmas) - 1
    gammas = [min(s_churn / num_levels, math.sqrt(2) - 1) if s_tmin <= sig <= s_tmax else 0.0
              for sig in sigmas[:-1]]
    init_rng, churn_rng = jax.random.split(rng)
    denoise = lambda x, sigma: denoiser(params, x, sigma, labels)  # noqa: E731

    def churn(x, sigma, gamma, key):
        # sqrt(sigma_hat^2 - sigma^2) written so that it cannot round below 0 (a NaN under XLA's fusion).
        noise_std = sigma * jnp.sqrt(gamma * (2 + gamma))
        return x + noise_std * s_noise * jax.random.normal(key, shape), sigma * (1 + gamma)

    def step(x, inputs):
        sigma, sigma_next, gamma, key = inputs
        x, sigma_hat = churn(x, sigma, gamma, key)
        return heun_step(denoise, x, sigma_hat, sigma_next), None

    keys = jax.random.split(churn_rng, num_levels)
    levels = jnp.asarray(sigmas, jnp.float32)
    x = sigmas[0] * jax.random.normal(init_rng, shape)
    # Every step but the last is a Heun step (one compiled body); the last, to sigma = 0, is Euler.
    if num_levels > 1:
        x, _ = jax.lax.scan(step, x, (levels[:-2], levels[1:-1], jnp.asarray(gammas[:-1], jnp.float32), keys[:-1]))
    x, sigma_hat = churn(x, levels[-2], gammas[-1], keys[-1])
    return heun_step(denoise, x, sigma_hat, levels[-1], second_order=False)


def to_uint8(images: jax.Array | Sequence) -> jax.Array:
    """[-1, 1] floats to uint8 0..255."""
    return jnp.clip(jnp.round((jnp.asarray(images) + 1) * 127.5), 0, 255).astype(jnp.uint8)


@dataclasses.dataclass(frozen=True)
class GuidedFunction:
    """Classifier-free guidance of a class-conditional network function: f_null + scale (f_cond - f_null).

    `null_label` is the class the network reserves for "no label" (num_classes, see models/__init__.py),
    which training feeds with probability label_dropout. Scale 1 is the plain conditional function; each
    guided call evaluates the network twice (one batch of 2B).
    """

    fn: NetworkFunction
    scale: float
    null_label: int

    @property
    def sigma_min(self) -> float:
        return self.fn.sigma_min

    @property
    def sigma_data(self) -> float:
        return self.fn.sigma_data

    def __call__(self, params: Any, x: jax.Array, sigma: jax.Array, labels: jax.Array | None = None, *,
                 train: bool = False, dropout_rng: jax.Array | None = None) -> jax.Array:
        if labels is None or self.scale == 1:
            return self.fn(params, x, sigma, labels, train=train, dropout_rng=dropout_rng)
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
        both = self.fn(params, jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]),
                       jnp.concatenate([labels, jnp.full_like(labels, self.null_label)]), train=train,
                       dropout_rng=dropout_rng)
        cond, uncond = jnp.split(both, 2)
        return guide(cond, uncond, self.scale)

    def init(self, rng: jax.Array, image_shape: tuple[int, ...], with_labels: bool) -> Any:
        return self.fn.init(rng, image_shape, with_labels)


def guide(cond: jax.Array, uncond: jax.Array, scale: float) -> jax.Array:
    """Classifier-free guidance: uncond + scale (cond - uncond); 0 = unconditional, 1 = conditional."""
    return uncond + scale * (cond - uncond)


def edge_skipping_sample(fn: NetworkFunction, params: Any, rng: jax.Array, shape: tuple[int, ...],
                         sigmas: jax.Array, labels: jax.Array | None = None, eta: float = 1.0) -> jax.Array:
    """Multistep consistency sampling that keeps part of the model's own noise direction at each re-noising.

    x_0 = f(sigmas[0] z). At each later sigma s, with x_hat = f of the last step, its input x_in at
    s_prev and eps_hat = (x_in - x_hat) / s_prev:
        x_in <- x_hat + sqrt(1 - eta^2) s eps_hat + eta sqrt(s^2 - s_min^2) z,     x_hat <- f(x_in, s).
    The deterministic part is the ODE step of the consistency estimate from s_prev to
    sqrt(1 - eta^2) s, past the edge s (towards the data); fresh noise of std eta s brings it back to s.
    eta = 1 is the usual consistency sampler (consistency_sample, fresh noise only); eta = 0 follows
    the deterministic trajectory. SCT's "edge-skipping multistep sampling (eta)" read this way
    (CTM's gamma-sampling); SCT's code is not public, so this reading is unconfirmed (SPEC section 4).
    """
    if eta == 1:
        return consistency_sample(fn, params, rng, shape, sigmas, labels)
    init_rng, step_rng = jax.random.split(rng)
    x_in = sigmas[0] * jax.random.normal(init_rng, shape)
    x_hat = fn(params, x_in, sigmas[0], labels)

    def step(carry, inputs):
        x_in, x_hat, sigma_prev = carry
        sigma, key = inputs
        eps_hat = (x_in - x_hat) / sigma_prev
        fresh = jnp.sqrt(jnp.maximum(sigma**2 - fn.sigma_min**2, 0.0)) * jax.random.normal(key, shape)
        x_in = x_hat + math.sqrt(1 - eta**2) * sigma * eps_hat + eta * fresh
        return (x_in, fn(params, x_in, sigma, labels), sigma), None

    keys = jax.random.split(step_rng, sigmas.shape[0] - 1)
    (_, x_hat, _), _ = jax.lax.scan(step, (x_in, x_hat, sigmas[0]), (sigmas[1:], keys))
    return x_hat
