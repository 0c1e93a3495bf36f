"""The CPU-fast GroupNorm and conv (models/layers.py) compute what flax's nn.GroupNorm and lax's conv do.

Same params and names, same values to float rounding, forward and input/kernel
gradients, including the convs on maps smaller than the kernel that take the
matmul path. Eager, tiny shapes: no compiles worth counting.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consistency_jax.models import layers


@pytest.mark.parametrize("shape,groups", [((2, 4, 4, 8), 2), ((3, 2, 2, 12), 3), ((2, 5, 3, 4), 1)])
def test_group_norm_matches_flax(shape, groups):
    x = jnp.asarray(np.random.default_rng(0).normal(1.5, 2.0, shape), jnp.float32)
    ours = layers.GroupNorm(num_groups=groups, epsilon=1e-6)
    ref = nn.GroupNorm(num_groups=groups, epsilon=1e-6)
    params = ref.init(jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    assert jax.tree.structure(ours.init(jax.random.PRNGKey(0), x)) == jax.tree.structure(params)
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
    g_ours = jax.grad(lambda p, x: jnp.sum(jnp.sin(ours.apply(p, x))), argnums=(0, 1))(params, x)
    g_ref = jax.grad(lambda p, x: jnp.sum(jnp.sin(ref.apply(p, x))), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_group_norm_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="do not divide"):
        layers.GroupNorm(num_groups=3).init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 4)))


@pytest.mark.parametrize("hw,kernel,padding", [((2, 2), (3, 3), "SAME"), ((1, 1), (3, 3), "SAME"),
                                               ((2, 3), (3, 3), ((1, 1), (1, 1))), ((4, 4), (3, 3), "SAME"),
                                               ((2, 2), (1, 1), "SAME")])
def test_conv_matches_flax(hw, kernel, padding):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *hw, 5)), jnp.float32)
    ours = layers.Conv(7, kernel, padding=padding)
    ref = nn.Conv(7, kernel, padding=padding)
    params = ref.init(jax.random.PRNGKey(0), x)
    assert jax.tree.structure(ours.init(jax.random.PRNGKey(0), x)) == jax.tree.structure(params)
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
    g_ours = jax.grad(lambda p, x: jnp.sum(jnp.sin(ours.apply(p, x))), argnums=(0, 1))(params, x)
    g_ref = jax.grad(lambda p, x: jnp.sum(jnp.sin(ref.apply(p, x))), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
