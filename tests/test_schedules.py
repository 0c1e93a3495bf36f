"""Schedules, weights and distances against values computed from SPEC.md's formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consistency_jax import schedules
from consistency_jax.methods import distances


def spec_karras(n, s_min=0.002, s_max=80.0, rho=7.0):
    # SPEC: sigma_i = (s_min^(1/rho) + (i-1)/(N-1) (s_max^(1/rho) - s_min^(1/rho)))^rho, i = 1..N
    return [(s_min ** (1 / rho) + (i - 1) / (n - 1) * (s_max ** (1 / rho) - s_min ** (1 / rho))) ** rho
            for i in range(1, n + 1)]


@pytest.mark.parametrize("n", [2, 11, 1281])
def test_karras_grid_matches_formula_and_endpoints(n):
    sigmas = np.asarray(schedules.karras_sigmas(n))
    np.testing.assert_allclose(sigmas, spec_karras(n), rtol=1e-5)
    assert sigmas[0] == pytest.approx(0.002, rel=1e-5) and sigmas[-1] == pytest.approx(80.0, rel=1e-5)
    assert np.all(np.diff(sigmas) > 0)


def test_ict_curriculum_for_400k_steps():
    # SPEC: K' = floor(400000 / (log2(floor(1280/10)) + 1)) = 50,000; N = 11, 21, 41, ..., 1281.
    total = 400_000
    expected_stage_len = 50_000
    for stage, n_expected in enumerate([11, 21, 41, 81, 161, 321, 641, 1281]):
        first, last = stage * expected_stage_len, (stage + 1) * expected_stage_len - 1
        for k in (first, last):
            assert int(schedules.ict_num_scales(k, total)) == n_expected, (k, n_expected)
    assert int(schedules.ict_num_scales(399_999, total)) == 1281
    assert int(schedules.ict_num_scales(10**9, total)) == 1281  # capped at s1 + 1, no overflow


def test_ict_curriculum_with_a_ratio_that_is_not_a_power_of_two():
    # SPEC: K' = floor(K / (log2(floor(s1/s0)) + 1)); s1/s0 = 100 gives K' = floor(1000 / 7.644) = 130.
    total, s0, s1 = 1000, 10, 1000
    stage_len = math.floor(total / (math.log2(s1 // s0) + 1))
    assert stage_len == 130
    for k in range(0, total, 7):
        assert int(schedules.ict_num_scales(k, total, s0, s1)) == min(s0 * 2 ** (k // stage_len), s1) + 1, k


def test_ict_curriculum_traced_under_jit():
    steps = jnp.arange(0, 400_000, 25_000)
    got = jax.jit(lambda k: schedules.ict_num_scales(k, 400_000))(steps)
    expected = [min(10 * 2 ** (k // 50_000), 1280) + 1 for k in range(0, 400_000, 25_000)]
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_original_ct_curriculum_and_target_ema():
    total, s0, s1, mu0 = 1000, 2, 150, 0.9
    for k in (0, 1, 10, 250, 500, 999, 1000):
        n = math.ceil(math.sqrt(k / total * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1
        got = int(schedules.ct_num_scales(k, total, s0, s1))
        assert got == n, k
        assert float(schedules.ct_target_ema_decay(got, s0, mu0)) == pytest.approx(
            math.exp(s0 * math.log(mu0) / n), rel=1e-6)
    assert int(schedules.ct_num_scales(0, total, s0, s1)) == 2
    assert int(schedules.ct_num_scales(total, total, s0, s1)) == 151
    assert float(schedules.ct_target_ema_decay(2, s0, mu0)) == pytest.approx(0.9, rel=1e-6)


def spec_lognormal_probs(n, p_mean=-1.1, p_std=2.0):
    sig = spec_karras(n)
    cdf = [math.erf((math.log(s) - p_mean) / (math.sqrt(2) * p_std)) for s in sig]
    mass = [cdf[i + 1] - cdf[i] for i in range(n - 1)]
    return np.asarray(mass) / sum(mass)


@pytest.mark.parametrize("n", [11, 41, 1281])
def test_lognormal_index_probabilities(n):
    logits = schedules.lognormal_interval_logits(schedules.karras_sigmas(n), n, -1.1, 2.0)
    probs = np.asarray(jax.nn.softmax(logits))
    assert probs.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(probs, spec_lognormal_probs(n), rtol=1e-3, atol=1e-7)


def test_padded_grid_masks_intervals_past_n():
    n, padded = 11, 1281
    grid = schedules.karras_sigma(jnp.arange(padded, dtype=jnp.float32), n, 0.002, 80.0, 7.0)
    probs = np.asarray(jax.nn.softmax(schedules.lognormal_interval_logits(grid, n, -1.1, 2.0)))
    assert np.all(probs[n - 1:] == 0)
    np.testing.assert_allclose(probs[: n - 1], spec_lognormal_probs(n), rtol=1e-3, atol=1e-7)


def test_sampled_sigma_pairs_are_adjacent_grid_points_with_spec_frequencies():
    n = 11
    grid = np.asarray(spec_karras(n))
    # The draw costs batch x max_scales random numbers: the frequencies come from 200,000 draws on the unpadded
    # grid (max_scales = n), and 20,000 draws at the training runs' padding (1281) never land past the grid.
    for max_scales, count, atol in ((n, 200_000, 4e-3), (1281, 20_000, 1.5e-2)):
        lo, hi = schedules.sample_ict_sigma_pairs(jax.random.PRNGKey(0), count, jnp.int32(n), max_scales,
                                                  -1.1, 2.0, 0.002, 80.0, 7.0)
        index = np.abs(np.asarray(lo)[:, None] - grid[None]).argmin(1)
        assert index.max() < n - 1
        np.testing.assert_allclose(np.asarray(lo), grid[index], rtol=1e-5)
        np.testing.assert_allclose(np.asarray(hi), grid[index + 1], rtol=1e-5)
        freqs = np.bincount(index, minlength=n - 1)[: n - 1] / len(index)
        np.testing.assert_allclose(freqs, spec_lognormal_probs(n), atol=atol)


def test_ict_weight():
    lo, hi = jnp.array([0.002, 1.0]), jnp.array([0.01, 3.0])
    np.testing.assert_allclose(np.asarray(schedules.ict_loss_weight(lo, hi)), [1 / 0.008, 0.5], rtol=1e-5)


def test_pseudo_huber_is_over_the_whole_image():
    a = np.zeros((2, 2, 2, 1), np.float32)
    b = np.array([[[[3.0], [0.0]], [[0.0], [4.0]]], [[[1.0], [1.0]], [[1.0], [1.0]]]], np.float32)
    c = 0.5
    # Hand computation: ||a-b|| = 5 and 2; sqrt(25 + 0.25) - 0.5, sqrt(4 + 0.25) - 0.5.
    expected = [math.sqrt(25.25) - 0.5, math.sqrt(4.25) - 0.5]
    np.testing.assert_allclose(np.asarray(distances.pseudo_huber(a, b, c)), expected, rtol=1e-6)
    # An element-wise Huber would give a different number: sum(sqrt(d_j^2 + c^2) - c).
    elementwise = math.sqrt(9.25) - 0.5 + math.sqrt(16.25) - 0.5 + 2 * 0.0
    assert expected[0] != pytest.approx(elementwise)


def test_default_huber_c_matches_spec_values():
    assert distances.default_huber_c((32, 32, 3)) == pytest.approx(0.0299, abs=1e-4)
    assert distances.default_huber_c((64, 64, 3)) == pytest.approx(0.0599, abs=1e-4)
