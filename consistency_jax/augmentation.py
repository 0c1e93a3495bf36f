"""ADA-style differentiable augmentation of discriminator inputs (Karras et al. 2020, 'bgc' pipeline).

ACT augments every image its discriminator sees (real images, generated
images in the discriminator step, and generated images in the generator step,
where the generator's gradient flows through the augmentation) with the
probability `p` that its method state adapts (methods/act.py). The pipeline is
the one ACT's reference uses (kong13661/ACT augmentation.py, from rosinality's
stylegan2-pytorch): each transformation is applied to an image with
probability p, independently per image and per transformation.

  geometric: x-flip, rotation by 0 or 270 degrees (the reference draws from
             {0, 3} quarter turns, not ADA's {0, 1, 2, 3}), integer translation
             (up to 1/8 of the size), isotropic scale (lognormal, 0.2 ln 2),
             rotation (probability 1 - sqrt(1 - p)), anisotropic scale,
             rotation again, fractional translation (normal, 0.125 of the size)
  colour:    brightness (normal 0.2), contrast (lognormal 0.5 ln 2), luma
             flip, hue rotation, saturation (lognormal ln 2); on 1-channel
             images the colour matrix is averaged over RGB as ADA does

The geometric transformations compose into one affine map per image, applied
by bilinear resampling with mirrored borders. Unlike the reference it samples
at the image's own resolution, without ADA's 2x wavelet-filtered
supersampling (an anti-aliasing refinement). With p = 0 the images come back
unchanged (the resampling is skipped).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

# NumPy, not jnp: a module-level jnp array would start the XLA backend at import, before a multi-host job's
# jax.distributed.initialize().
_LUMA_AXIS = np.full((3,), 1 / math.sqrt(3.0), np.float32)


def augment(rng: jax.Array, images: jax.Array, p: jax.Array) -> jax.Array:
    """Augments NHWC images (any range) with probability `p` per transformation; differentiable in `images`."""
    if images.shape[-1] not in (1, 3):
        raise ValueError(f"augment handles 1- or 3-channel images; got {images.shape[-1]} channels.")
    batch, height, width, _ = images.shape

    def apply(x):
        draws = _Draws(rng, batch)
        x = _apply_geometric(x, geometric_matrices(draws, height, width, p))
        return _apply_colour(x, colour_matrices(draws, p))

    return jax.lax.cond(p > 0, apply, lambda x: x, images)


class _Draws:
    """All the random numbers of one augmentation, drawn in two calls and handed out row by row.

    (Dozens of separate jax.random calls each compile their own hash; this keeps compilation short.)
    """

    _ROWS = 32

    def __init__(self, rng: jax.Array, batch: int):
        uniform_rng, normal_rng = jax.random.split(rng)
        self._uniform = iter(jax.random.uniform(uniform_rng, (self._ROWS, batch)))
        self._normal = iter(jax.random.normal(normal_rng, (self._ROWS, batch)))

    def uniform(self, low: float = 0.0, high: float = 1.0) -> jax.Array:
        return low + (high - low) * next(self._uniform)

    def normal(self, std: float = 1.0) -> jax.Array:
        return std * next(self._normal)

    def bernoulli(self, p: jax.Array) -> jax.Array:
        return self.uniform() < p


def _select(draws: _Draws, p: jax.Array, transform: jax.Array) -> jax.Array:
    """Per image: `transform` with probability p, else the identity."""
    keep = draws.bernoulli(p)[:, None, None]
    return jnp.where(keep, transform, jnp.eye(transform.shape[-1], dtype=transform.dtype))


def _affine(a: jax.Array, b: jax.Array, c: jax.Array, d: jax.Array, tx: jax.Array, ty: jax.Array) -> jax.Array:
    zero, one = jnp.zeros_like(a), jnp.ones_like(a)
    return jnp.stack([jnp.stack([a, b, tx], -1), jnp.stack([c, d, ty], -1), jnp.stack([zero, zero, one], -1)], -2)


def _rotation(theta: jax.Array) -> jax.Array:
    zero = jnp.zeros_like(theta)
    return _affine(jnp.cos(theta), -jnp.sin(theta), jnp.sin(theta), jnp.cos(theta), zero, zero)


def _scaling(sx: jax.Array, sy: jax.Array) -> jax.Array:
    zero = jnp.zeros_like(sx)
    return _affine(sx, zero, zero, sy, zero, zero)


def _translation(tx: jax.Array, ty: jax.Array) -> jax.Array:
    one, zero = jnp.ones_like(tx), jnp.zeros_like(tx)
    return _affine(one, zero, zero, one, tx, ty)


def geometric_matrices(draws: _Draws, height: int, width: int, p: jax.Array) -> jax.Array:
    """[B, 3, 3] affine maps on pixel coordinates centred on the image (each step applied with probability p)."""
    p_rotation = 1 - jnp.sqrt(1 - p)
    coin = lambda: draws.bernoulli(0.5).astype(jnp.float32)  # noqa: E731
    lognormal = lambda std: jnp.exp(draws.normal(std))  # noqa: E731
    angle = lambda: draws.uniform(-math.pi, math.pi)  # noqa: E731
    flip = coin()
    scale, aniso = lognormal(0.2 * math.log(2)), lognormal(0.2 * math.log(2))
    steps = [
        (p, _scaling(1 - 2 * flip, jnp.ones_like(flip))),  # x-flip
        (p, _rotation(-math.pi / 2 * 3 * coin())),  # 0 or 270 degrees
        (p, _translation(jnp.round(draws.uniform(-0.125, 0.125) * width),
                         jnp.round(draws.uniform(-0.125, 0.125) * height))),
        (p, _scaling(scale, scale)),
        (p_rotation, _rotation(-angle())),
        (p, _scaling(aniso, 1 / aniso)),
        (p_rotation, _rotation(-angle())),
        (p, _translation(draws.normal(0.125 * width), draws.normal(0.125 * height))),
    ]
    matrix = jnp.broadcast_to(jnp.eye(3), flip.shape + (3, 3))
    for prob, transform in steps:
        matrix = _select(draws, prob, transform) @ matrix
    return matrix


def _colour_affine(linear: jax.Array, shift: jax.Array) -> jax.Array:
    """[B, 4, 4] from a [B, 3, 3] linear part and a [B, 3] shift."""
    top = jnp.concatenate([linear, shift[:, :, None]], axis=-1)
    bottom = jnp.broadcast_to(jnp.array([0.0, 0.0, 0.0, 1.0]), (linear.shape[0], 1, 4))
    return jnp.concatenate([top, bottom], axis=1)


def colour_matrices(draws: _Draws, p: jax.Array) -> jax.Array:
    """[B, 4, 4] affine colour maps on RGB (each step applied with probability p)."""
    brightness = draws.normal(0.2)
    contrast = jnp.exp(draws.normal(0.5 * math.log(2)))
    flip = draws.bernoulli(0.5).astype(jnp.float32)
    hue = draws.uniform(-math.pi, math.pi)
    saturation = jnp.exp(draws.normal(math.log(2)))
    batch = brightness.shape[0]
    eye = jnp.broadcast_to(jnp.eye(3), (batch, 3, 3))
    outer = jnp.outer(_LUMA_AXIS, _LUMA_AXIS)
    a = _LUMA_AXIS
    cross = jnp.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    b = lambda v: v[:, None, None]  # noqa: E731
    no_shift = jnp.zeros((batch, 3))
    steps = [
        _colour_affine(eye, brightness[:, None] * jnp.ones((1, 3))),
        _colour_affine(b(contrast) * eye, no_shift),
        _colour_affine(eye - 2 * b(flip) * outer, no_shift),  # reflect across the plane normal to luma
        _colour_affine(b(jnp.cos(hue)) * eye + b(jnp.sin(hue)) * cross + b(1 - jnp.cos(hue)) * outer, no_shift),
        _colour_affine(outer + b(saturation) * (eye - outer), no_shift),
    ]
    matrix = jnp.broadcast_to(jnp.eye(4), (batch, 4, 4))
    for transform in steps:
        matrix = _select(draws, p, transform) @ matrix
    return matrix


def _mirror(index: jax.Array, size: int) -> jax.Array:
    """Reflects integer indices about the first and last pixel (d c b | a b c d | c b a), into [0, size)."""
    period = max(2 * (size - 1), 1)
    index = jnp.mod(index, period)
    return jnp.where(index >= size, period - index, index)


def _apply_geometric(images: jax.Array, matrices: jax.Array) -> jax.Array:
    """Output pixel (y, x) takes the input at matrices^-1 (x, y) (centred coordinates), bilinearly, mirrored."""
    batch, height, width, channels = images.shape
    ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) - (height - 1) / 2,
                          jnp.arange(width, dtype=jnp.float32) - (width - 1) / 2, indexing="ij")
    grid = jnp.stack([xs.ravel(), ys.ravel(), jnp.ones(height * width)])  # [3, HW]
    source = _affine_inverse(matrices) @ grid  # [B, 3, HW]
    x, y = source[:, 0] + (width - 1) / 2, source[:, 1] + (height - 1) / 2
    x0, y0 = jnp.floor(x), jnp.floor(y)
    wx, wy = (x - x0)[..., None], (y - y0)[..., None]
    flat = images.reshape(batch, height * width, channels)

    def pixels(yi, xi):
        index = _mirror(yi.astype(jnp.int32), height) * width + _mirror(xi.astype(jnp.int32), width)
        return jnp.take_along_axis(flat, index[..., None], axis=1)

    top = (1 - wx) * pixels(y0, x0) + wx * pixels(y0, x0 + 1)
    bottom = (1 - wx) * pixels(y0 + 1, x0) + wx * pixels(y0 + 1, x0 + 1)
    return ((1 - wy) * top + wy * bottom).reshape(images.shape)


def _affine_inverse(matrices: jax.Array) -> jax.Array:
    """Inverse of [B, 3, 3] affine maps [[A, t], [0, 1]]: [[A^-1, -A^-1 t], [0, 1]]."""
    a, b, c, d = matrices[:, 0, 0], matrices[:, 0, 1], matrices[:, 1, 0], matrices[:, 1, 1]
    det = a * d - b * c
    inverse = jnp.stack([jnp.stack([d, -b], -1), jnp.stack([-c, a], -1)], -2) / det[:, None, None]
    shift = -jnp.einsum("bij,bj->bi", inverse, matrices[:, :2, 2])
    zero, one = jnp.zeros_like(a), jnp.ones_like(a)
    return jnp.concatenate([jnp.concatenate([inverse, shift[:, :, None]], -1),
                            jnp.stack([zero, zero, one], -1)[:, None, :]], 1)


def _apply_colour(images: jax.Array, matrices: jax.Array) -> jax.Array:
    linear, shift = matrices[:, :3, :3], matrices[:, :3, 3]
    if images.shape[-1] == 3:
        return jnp.einsum("bhwc,bdc->bhwd", images, linear) + shift[:, None, None, :]
    # Grayscale (ADA): the mean over RGB rows of the colour map, acting on a gray value.
    gain = linear.mean(axis=1).sum(axis=-1)
    return images * gain[:, None, None, None] + shift.mean(axis=1)[:, None, None, None]
