"""Zero-shot image editing with a consistency model (Song et al. 2023, "Consistency Models", Algorithm 4).

Given a reference image y, an orthogonal linear map A and a mask Omega over
the components of A y (1 = unknown, to be generated; 0 = known, kept):

    y <- A^T[(A y) * (1 - Omega)]                 (unknown components zeroed)
    x <- f(y + t_1 z, t_1)
    x <- A^T[(A y) * (1 - Omega) + (A x) * Omega]  (put the known components back)
    for t_n = t_2, ..., t_N:
        x <- f(x + sqrt(t_n^2 - sigma_min^2) z, t_n);  x <- the same replacement

Tasks (the maps A, all orthogonal so that A^-1 = A^T):
  inpaint    A = identity, Omega = the mask of pixels to fill.
  colorize   A mixes the channels of each pixel into luma (0.2989, 0.587,
             0.114, normalised) and two orthogonal chroma directions; the luma
             of the grayscale input is kept, the chroma generated.
  superres   A maps each p x p patch (per channel) to its mean (scaled) and an
             orthogonal complement; the patch means of the low-resolution
             input are kept, the rest generated.
Stroke-guided editing (SDEdit with a consistency model, CM paper section 6)
is not Algorithm 4: it starts from the stroke painting itself,
x <- f(y + t_1 z, t_1) with t_1 < sigma_max, then continues as multistep
consistency sampling (`stroke_guided`).

Every denoised image is clipped to [-1, 1] (the CM code's clip_denoised).
Inpainting keeps the known pixels exactly (a select, not arithmetic); the
other tasks keep the known components up to float rounding.
"""

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from consistency_jax import schedules
from consistency_jax.parametrization import NetworkFunction

TASKS = ("inpaint", "colorize", "superres", "stroke")
LUMA = (0.2989, 0.5870, 0.1140)


@dataclasses.dataclass(frozen=True)
class Transform:
    """An orthogonal linear map on NHWC images: forward (A) and inverse (A^T)."""

    forward: Callable[[jax.Array], jax.Array]
    inverse: Callable[[jax.Array], jax.Array]


IDENTITY = Transform(lambda x: x, lambda x: x)


def orthogonal_basis(first: np.ndarray) -> np.ndarray:
    """An orthogonal matrix whose first column is `first` normalised (with a positive sum)."""
    first = np.asarray(first, np.float64)
    matrix = np.eye(len(first))
    matrix[:, 0] = first / np.linalg.norm(first)
    q, _ = np.linalg.qr(matrix)
    return q if q[:, 0].sum() > 0 else -q


def colour_transform() -> Transform:
    """Per pixel: RGB -> (luma, chroma 1, chroma 2) coordinates in an orthonormal basis."""
    q = jnp.asarray(orthogonal_basis(np.asarray(LUMA)), jnp.float32)
    return Transform(lambda x: jnp.einsum("bhwc,cd->bhwd", x, q), lambda x: jnp.einsum("bhwd,cd->bhwc", x, q))


def patch_transform(patch: int) -> Transform:
    """Per p x p patch and channel: pixels -> (scaled mean, orthogonal complement) coordinates."""
    q = jnp.asarray(orthogonal_basis(np.ones(patch * patch)), jnp.float32)

    def to_patches(x):
        b, h, w, c = x.shape
        x = x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 5, 2, 4)
        return x.reshape(b, h // patch, w // patch, c, patch * patch)

    def from_patches(x):
        b, hp, wp, c, _ = x.shape
        x = x.reshape(b, hp, wp, c, patch, patch).transpose(0, 1, 4, 2, 5, 3)
        return x.reshape(b, hp * patch, wp * patch, c)

    return Transform(lambda x: to_patches(x) @ q, lambda a: from_patches(a @ q.T))


def editing_sigmas(num_steps: int, sigma_start: float, sigma_min: float, rho: float) -> tuple[float, ...]:
    """num_steps noise levels from sigma_start down: the first num_steps of a (num_steps + 1)-point Karras grid."""
    grid = np.asarray(schedules.karras_sigmas(num_steps + 1, sigma_min, sigma_start, rho))[::-1]
    return tuple(float(s) for s in grid[:num_steps])


def edit(fn: NetworkFunction, params: Any, rng: jax.Array, y: jax.Array, unknown: jax.Array,
         sigmas: tuple[float, ...], transform: Transform = IDENTITY, labels: jax.Array | None = None) -> jax.Array:
    """Algorithm 4: images that keep A y where `unknown` is 0 and are generated where it is 1.

    `y` [B, H, W, C] in [-1, 1]; `unknown` broadcastable to A(y) (bool or 0/1).
    """
    unknown = jnp.asarray(unknown).astype(bool)
    known_part = transform.forward(y)

    def replace(x):
        return transform.inverse(jnp.where(unknown, transform.forward(x), known_part))

    def denoise(x, sigma):
        return jnp.clip(fn(params, x, sigma, labels), -1.0, 1.0)

    keys = jax.random.split(rng, len(sigmas))
    start = transform.inverse(jnp.where(unknown, 0.0, known_part))
    x = replace(denoise(start + sigmas[0] * jax.random.normal(keys[0], y.shape), sigmas[0]))
    for sigma, key in zip(sigmas[1:], keys[1:]):
        noise_scale = math.sqrt(max(sigma**2 - fn.sigma_min**2, 0.0))
        x = replace(denoise(x + noise_scale * jax.random.normal(key, y.shape), sigma))
    if transform is IDENTITY:
        x = jnp.where(unknown, x, y)  # the known pixels exactly, whatever the rounding above
    return x


def stroke_guided(fn: NetworkFunction, params: Any, rng: jax.Array, y: jax.Array, sigmas: tuple[float, ...],
                  labels: jax.Array | None = None) -> jax.Array:
    """SDEdit with a consistency model: f(y + t_1 z, t_1), then multistep consistency sampling."""
    start_rng, rest_rng = jax.random.split(rng)
    x = jnp.clip(fn(params, y + sigmas[0] * jax.random.normal(start_rng, y.shape), sigmas[0], labels), -1.0, 1.0)
    for sigma, key in zip(sigmas[1:], jax.random.split(rest_rng, max(len(sigmas) - 1, 1))):
        noise_scale = math.sqrt(max(sigma**2 - fn.sigma_min**2, 0.0))
        x = jnp.clip(fn(params, x + noise_scale * jax.random.normal(key, y.shape), sigma, labels), -1.0, 1.0)
    return x


def task_problem(task: str, y: jax.Array, mask: jax.Array | None = None,
                 patch: int = 1) -> tuple[Transform, jax.Array]:
    """(A, Omega) of a task for images y [B, H, W, C]; `mask` [B, H, W, 1] (1 = fill) for 'inpaint'."""
    if task == "inpaint":
        return IDENTITY, mask
    if task == "colorize":
        if y.shape[-1] != 3:
            raise ValueError(f"Colourisation needs a 3-channel model; this one makes {y.shape[-1]}-channel images.")
        return colour_transform(), jnp.asarray([0.0, 1.0, 1.0]).reshape(1, 1, 1, 3)
    if task == "superres":
        unknown = jnp.ones((patch * patch,)).at[0].set(0.0)
        return patch_transform(patch), unknown.reshape(1, 1, 1, 1, -1)
    raise ValueError(f"Unknown editing task {task!r}; valid: {', '.join(TASKS)}.")


def check_editable(method) -> None:
    """Editing calls the network as a consistency function f(x, sigma); other samplers cannot edit."""
    kind = method.sampler(1).key[0]
    if kind != "consistency":  # the key of samplers.consistency_sampler
        raise ValueError(
            f"Zero-shot editing (--mode=edit) needs a consistency model, sampled by the consistency sampler; "
            f"method {method.name!r} samples with its {kind!r} sampler (a diffusion model's ODE solver or "
            f"another scheme), so its network is not a one-step map f(x, sigma) to the data. Edit with a "
            f"consistency method's checkpoint (ict, act, ...).")
