"""The consistency parametrization and the iCT loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consistency_jax import parametrization, schedules
from consistency_jax.methods import distances, ict
from consistency_jax.models import create_model
from tests.helpers import jit_init, tiny_config

SIGMA_MIN, SIGMA_DATA = 0.002, 0.5


def tiny_fn(c_noise="edm", dropout=0.0):
    model_config = tiny_config().model
    model_config.dropout = dropout
    model = create_model(model_config)
    return parametrization.ConsistencyFunction(model, SIGMA_MIN, SIGMA_DATA, c_noise)


def randomize(params, seed=1):
    # Zero-initialised output layers would hide the network's contribution: perturb every weight.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def test_consistency_scalings_match_spec():
    s = jnp.array([0.002, 0.5, 80.0])
    c_skip, c_out, c_in = parametrization.consistency_scalings(s, SIGMA_MIN, SIGMA_DATA)
    sn, sd = np.asarray(s, np.float64), SIGMA_DATA
    np.testing.assert_allclose(c_skip, sd**2 / ((sn - SIGMA_MIN) ** 2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c_out, (sn - SIGMA_MIN) * sd / np.sqrt(sn**2 + sd**2), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(sn**2 + sd**2), rtol=1e-6)
    e_skip, e_out, _ = parametrization.edm_scalings(s, SIGMA_DATA)
    np.testing.assert_allclose(e_skip, sd**2 / (sn**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(e_out, sn * sd / np.sqrt(sn**2 + sd**2), rtol=1e-6)


@pytest.mark.parametrize("kind,expected", [("edm", np.log(2.0) / 4), ("cm", 1000 * np.log(2.0) / 4),
                                           ("raw", 2.0)])
def test_c_noise_kinds(kind, expected):
    assert float(parametrization.c_noise(jnp.array(2.0), kind)) == pytest.approx(expected, rel=1e-6)


def test_c_noise_rejects_unknown_kind():
    with pytest.raises(ValueError, match="valid: edm, cm, raw"):
        parametrization.c_noise(jnp.array(1.0), "log")


@pytest.mark.parametrize("c_noise", ["edm", "cm", "raw"])
def test_boundary_condition_holds_exactly_for_any_network(c_noise):
    fn = tiny_fn(c_noise)
    params = randomize(jit_init(fn, 0, (8, 8, 1)))
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 8, 8, 1))
    apply = jax.jit(fn)  # as training runs it (and one compile, not one per op)
    np.testing.assert_array_equal(np.asarray(apply(params, x, SIGMA_MIN)), np.asarray(x))
    assert float(jnp.abs(apply(params, x, 1.0) - x).max()) > 1e-3  # the network does act elsewhere


def loss_fn(fn, total_steps=100):
    return lambda p, batch, rng, step: ict.ict_loss(
        p, batch, rng, step, fn=fn, total_steps=total_steps, s0=10, s1=1280, p_mean=-1.1, p_std=2.0,
        huber_c=0.00054 * 8, rho=7.0, sigma_max=80.0)


def test_ict_loss_matches_an_independent_computation():
    fn = tiny_fn(dropout=0.3)
    params = randomize(jit_init(fn, 0, (8, 8, 1)))
    x = jax.random.uniform(jax.random.PRNGKey(3), (4, 8, 8, 1), minval=-1, maxval=1)
    rng, step = jax.random.PRNGKey(5), jnp.int32(30)
    loss, metrics = jax.jit(loss_fn(fn))(params, {"image": x}, rng, step)

    # Recompute by hand with the same random draws: N(30) for K = 100 is 10 * 2^(30 // 12) + 1 = 41.
    pair_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
    assert int(metrics["num_scales"]) == 41
    lo, hi = schedules.sample_ict_sigma_pairs(pair_rng, 4, jnp.int32(41), 1281, -1.1, 2.0, SIGMA_MIN, 80.0, 7.0)
    grid = schedules.karras_sigmas(41)
    assert np.all(np.isin(np.asarray(hi), np.asarray(grid)))  # the pair lies on the current 41-point grid
    z = jax.random.normal(noise_rng, x.shape)
    net = jax.jit(lambda p, x, sigma: fn(p, x, sigma, train=True, dropout_rng=dropout_rng))
    student = net(params, x + hi[:, None, None, None] * z, hi)
    teacher = net(params, x + lo[:, None, None, None] * z, lo)
    diff = np.asarray(student - teacher, np.float64).reshape(4, -1)
    c = 0.00054 * 8
    per_example = (np.sqrt((diff**2).sum(1) + c**2) - c) / (np.asarray(hi) - np.asarray(lo))
    assert float(loss) == pytest.approx(per_example.mean(), rel=1e-4)


def test_teacher_gets_no_gradient():
    """d loss / d params equals the gradient through the student pass alone."""
    fn = tiny_fn(dropout=0.3)
    params = randomize(jit_init(fn, 0, (8, 8, 1)))
    x = jax.random.uniform(jax.random.PRNGKey(3), (4, 8, 8, 1), minval=-1, maxval=1)
    rng, step = jax.random.PRNGKey(7), jnp.int32(0)
    # Under jit, as training runs them: one compile per gradient instead of one per op.
    grads = jax.jit(jax.grad(lambda p: loss_fn(fn)(p, {"image": x}, rng, step)[0]))(params)

    pair_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
    lo, hi = schedules.sample_ict_sigma_pairs(pair_rng, 4, jnp.int32(11), 1281, -1.1, 2.0, SIGMA_MIN, 80.0, 7.0)
    z = jax.random.normal(noise_rng, x.shape)
    net = jax.jit(lambda p, x, sigma: fn(p, x, sigma, train=True, dropout_rng=dropout_rng))
    teacher = net(params, x + lo[:, None, None, None] * z, lo)

    def student_only(p):
        student = fn(p, x + hi[:, None, None, None] * z, hi, train=True, dropout_rng=dropout_rng)
        return jnp.mean(distances.pseudo_huber(student, teacher, 0.00054 * 8) / (hi - lo))

    expected = jax.jit(jax.grad(student_only))(params)
    # Two programs, so float rounding differs (up to ~1e-6 here); the teacher's gradient would add > 1e-4 (below).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-6), grads, expected)

    # And the gradient is not the one we'd get if the teacher were differentiated too.
    def both_differentiated(p):
        student = fn(p, x + hi[:, None, None, None] * z, hi, train=True, dropout_rng=dropout_rng)
        t = fn(p, x + lo[:, None, None, None] * z, lo, train=True, dropout_rng=dropout_rng)
        return jnp.mean(distances.pseudo_huber(student, t, 0.00054 * 8) / (hi - lo))

    wrong = jax.jit(jax.grad(both_differentiated))(params)
    differences = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), grads, wrong))
    assert max(differences) > 1e-4
