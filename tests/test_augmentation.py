"""ADA-style augmentation (augmentation.py): identity at p = 0, exact geometric and colour maps, gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consistency_jax import augmentation

IMAGES = jax.random.uniform(jax.random.key(0), (3, 6, 6, 3), minval=-1, maxval=1)


def affine(a, b, c, d, tx, ty):
    return jnp.broadcast_to(jnp.array([[a, b, tx], [c, d, ty], [0.0, 0.0, 1.0]]), (3, 3, 3))


@pytest.fixture(scope="module")
def augment():
    return jax.jit(augmentation.augment)


def test_zero_probability_is_the_identity(augment):
    np.testing.assert_array_equal(augment(jax.random.key(1), IMAGES, jnp.float32(0.0)), IMAGES)


def test_full_probability_changes_every_image_differentiably(augment):
    out = augment(jax.random.key(1), IMAGES, jnp.float32(1.0))
    assert out.shape == IMAGES.shape
    assert float(jnp.abs(out - IMAGES).reshape(3, -1).max(axis=1).min()) > 0.1
    grads = jax.jit(jax.grad(lambda x: jnp.sum(augmentation.augment(jax.random.key(1), x, jnp.float32(1.0)) ** 2)))(
        IMAGES)
    assert bool(jnp.all(jnp.isfinite(grads))) and float(jnp.abs(grads).max()) > 0


def test_geometric_maps_move_pixels_as_stated():
    apply = jax.jit(augmentation._apply_geometric)
    np.testing.assert_allclose(apply(IMAGES, affine(-1, 0, 0, 1, 0, 0)), IMAGES[:, :, ::-1], atol=1e-6)  # x-flip
    quarter = affine(0, -1, 1, 0, 0, 0)  # (x, y) -> (-y, x): output(y, x) = input at (y', x') = (-x, y)
    np.testing.assert_allclose(apply(IMAGES, quarter), np.rot90(np.asarray(IMAGES), k=-1, axes=(1, 2)), atol=1e-5)
    shifted = apply(IMAGES, affine(1, 0, 0, 1, 2, 0))  # content moves right by 2; the border is mirrored
    np.testing.assert_allclose(shifted[:, :, 2:], IMAGES[:, :, :-2], atol=1e-6)
    np.testing.assert_allclose(shifted[:, :, :2], IMAGES[:, :, 2:0:-1], atol=1e-6)
    half = apply(IMAGES, affine(1, 0, 0, 1, 0.5, 0))  # half a pixel: bilinear means of neighbours
    np.testing.assert_allclose(half[:, :, 1:], 0.5 * (IMAGES[:, :, 1:] + IMAGES[:, :, :-1]), atol=1e-6)


def test_colour_maps_act_on_rgb_and_gray():
    apply = jax.jit(augmentation._apply_colour)
    brightness = jnp.broadcast_to(jnp.eye(4).at[:3, 3].set(0.25), (3, 4, 4))
    np.testing.assert_allclose(apply(IMAGES, brightness), IMAGES + 0.25, atol=1e-6)
    luma = 1 / math.sqrt(3)
    flip = jnp.broadcast_to(jnp.eye(4).at[:3, :3].add(-2 * luma * luma), (3, 4, 4))  # luma flip
    flipped = apply(IMAGES, flip)
    np.testing.assert_allclose(flipped.mean(-1), -IMAGES.mean(-1), atol=1e-6)  # the gray level changes sign
    contrast = jnp.broadcast_to(jnp.diag(jnp.array([2.0, 2.0, 2.0, 1.0])), (3, 4, 4))
    gray = IMAGES[..., :1]
    np.testing.assert_allclose(apply(gray, contrast), 2 * gray, atol=1e-6)


def test_rejects_other_channel_counts():
    with pytest.raises(ValueError, match="1- or 3-channel"):
        augmentation.augment(jax.random.key(0), jnp.zeros((1, 4, 4, 2)), jnp.float32(0.5))
