"""EDM diffusion training and EDM's Heun sampler, against hand computations (SPEC section 1)."""

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from consistency_jax import experiment, methods, samplers
from consistency_jax.evaluation import generate
from tests.helpers import tiny_config

SIGMA_DATA = 0.5


def edm_config(num_steps=4):
    config = tiny_config(num_steps)
    config.method = methods.method_config("edm")
    config.sampling.num_steps = 3
    config.eval.steps = (3,)
    return config


@pytest.fixture(scope="module")
def edm():
    """An EDM experiment on one device with randomised params (a zero-initialised output layer hides F)."""
    exp = experiment.create_experiment(edm_config(), jax.devices()[:1])
    params = jax.jit(exp.init_params)(jax.random.PRNGKey(0))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    return exp, params


def raw_network(exp, params, x, c_in, c_noise, dropout_rng):
    """F(c_in x, c_noise) straight from the Flax module, without the framework's parametrization."""
    @jax.jit
    def apply(params, x, c_in, c_noise, dropout_rng):
        return exp.fn.model.apply({"params": params}, c_in[:, None, None, None] * x, c_noise, None, train=True,
                                  rngs={"dropout": dropout_rng})

    return apply(params, x, jnp.asarray(c_in, jnp.float32), jnp.asarray(c_noise, jnp.float32), dropout_rng)


def test_edm_loss_matches_a_hand_computation(edm):
    exp, params = edm
    x = jax.random.uniform(jax.random.PRNGKey(3), (4, 8, 8, 1), minval=-1, maxval=1)
    rng = jax.random.PRNGKey(5)
    loss, metrics = jax.jit(exp.method.loss)(params, {}, {"image": x}, rng, jnp.int32(0))

    # The same draws: ln(sigma) ~ N(-1.2, 1.2^2), then the noise, then dropout.
    sigma_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
    sigma = np.exp(-1.2 + 1.2 * np.asarray(jax.random.normal(sigma_rng, (4,)), np.float64))
    noisy = np.asarray(x, np.float64) + sigma[:, None, None, None] * np.asarray(jax.random.normal(noise_rng, x.shape))
    # SPEC section 1: D = c_skip x + c_out F(c_in x, ln(sigma) / 4).
    c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
    c_out = sigma * SIGMA_DATA / np.sqrt(sigma**2 + SIGMA_DATA**2)
    c_in = 1 / np.sqrt(sigma**2 + SIGMA_DATA**2)
    out = np.asarray(raw_network(exp, params, jnp.asarray(noisy, jnp.float32), c_in, np.log(sigma) / 4,
                                 dropout_rng), np.float64)
    denoised = c_skip[:, None, None, None] * noisy + c_out[:, None, None, None] * out
    weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    squared = ((denoised - np.asarray(x, np.float64)) ** 2).reshape(4, -1).sum(1)
    assert float(loss) == pytest.approx(np.mean(weight * squared), rel=1e-4)
    assert float(metrics["squared_error"]) == pytest.approx(np.mean(squared), rel=1e-4)


def gaussian_denoiser(x, sigma):
    """The exact denoiser of data ~ N(0, SIGMA_DATA^2): D(x, s) = sd^2 / (s^2 + sd^2) x."""
    sigma = jnp.reshape(sigma, (-1,) + (1,) * (x.ndim - 1))
    return SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2) * x


def test_heun_step_matches_a_hand_computation():
    x = np.array([[1.5], [-0.3]])
    sigma, sigma_next = np.array([2.0, 0.7]), np.array([1.2, 0.4])
    got = np.asarray(samplers.heun_step(gaussian_denoiser, jnp.asarray(x), jnp.asarray(sigma),
                                        jnp.asarray(sigma_next)))
    # EDM Algorithm 1: d = (x - D(x, s)) / s; Euler; d' at the Euler point; average.
    d = (x - 0.25 / (sigma[:, None] ** 2 + 0.25) * x) / sigma[:, None]
    euler = x + (sigma_next - sigma)[:, None] * d
    d_next = (euler - 0.25 / (sigma_next[:, None] ** 2 + 0.25) * euler) / sigma_next[:, None]
    np.testing.assert_allclose(got, x + (sigma_next - sigma)[:, None] * (d + d_next) / 2, rtol=1e-6)
    euler_only = samplers.heun_step(gaussian_denoiser, jnp.asarray(x), jnp.asarray(sigma), jnp.asarray(sigma_next),
                                    second_order=False)
    np.testing.assert_allclose(np.asarray(euler_only), euler, rtol=1e-6)
    # For this denoiser the ODE's solution is x(s) = x sqrt(s^2 + sd^2) / sqrt(s0^2 + sd^2). Over a short
    # step Heun (2nd order) is an order of magnitude closer to it than Euler.
    x, sigma, sigma_next = np.array([[1.5]]), 1.0, 0.9
    exact = x * math.sqrt(sigma_next**2 + 0.25) / math.sqrt(sigma**2 + 0.25)
    step = lambda second_order: np.asarray(samplers.heun_step(  # noqa: E731
        gaussian_denoiser, jnp.asarray(x), jnp.asarray(sigma), jnp.asarray(sigma_next), second_order))
    assert np.abs(step(True) - exact).max() < 0.1 * np.abs(step(False) - exact).max()


def test_edm_sigmas_are_the_karras_grid_then_zero():
    sigmas = samplers.edm_sigmas(18, 0.002, 80.0, 7.0)
    i = np.arange(18)
    expected = (80.0 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    np.testing.assert_allclose(sigmas[:-1], expected, rtol=1e-12)
    assert sigmas[-1] == 0.0 and len(sigmas) == 19


def edm_sampler_by_hand(denoise, latents, sigmas):
    """EDM's deterministic sampler (generate.py edm_sampler, S_churn = 0) in float64 NumPy."""
    x = latents * sigmas[0]
    for i, (t, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        d = (x - denoise(x, t)) / t
        x_next = x + (t_next - t) * d
        if i < len(sigmas) - 2:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x + (t_next - t) * (0.5 * d + 0.5 * d_prime)
        x = x_next
    return x


class GaussianDenoiser:
    sigma_min, sigma_data = 0.002, SIGMA_DATA

    def __call__(self, params, x, sigma, labels=None, **kwargs):
        return gaussian_denoiser(x, jnp.broadcast_to(sigma, x.shape[:1]))


class CountingDenoiser(GaussianDenoiser):
    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return super().__call__(*args, **kwargs)


def test_deterministic_heun_sampler_follows_edm_and_solves_the_ode():
    sigmas = samplers.edm_sigmas(18, 0.002, 80.0, 7.0)
    rng = jax.random.PRNGKey(0)
    got = np.asarray(samplers.heun_sample(GaussianDenoiser(), None, rng, (64, 2, 2, 1), sigmas), np.float64)
    latents = np.asarray(jax.random.normal(jax.random.split(rng)[0], (64, 2, 2, 1)), np.float64)
    by_hand = edm_sampler_by_hand(lambda x, s: SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2) * x, latents, sigmas)
    np.testing.assert_allclose(got, by_hand, rtol=1e-4, atol=1e-5)
    # The ODE maps 80 z to sd * 80 z / sqrt(80^2 + sd^2) at sigma = 0; the sampler converges to that at 2nd order.
    exact = latents * 80.0 * SIGMA_DATA / math.sqrt(80.0**2 + SIGMA_DATA**2)
    errors = {}
    for n in (18, 40, 80):
        grid = samplers.edm_sigmas(n, 0.002, 80.0, 7.0)
        out = samplers.heun_sample(GaussianDenoiser(), None, rng, (64, 2, 2, 1), grid)
        errors[n] = float(np.abs(np.asarray(out, np.float64) / exact - 1).max())
    assert errors[80] < 3e-3 and errors[40] < errors[18] / 4 and errors[80] < errors[40] / 3


def test_churn_only_acts_inside_its_sigma_range():
    sigmas = samplers.edm_sigmas(6, 0.002, 80.0, 7.0)
    rng, shape = jax.random.PRNGKey(0), (8, 2, 2, 1)
    plain = samplers.heun_sample(GaussianDenoiser(), None, rng, shape, sigmas)
    outside = samplers.heun_sample(GaussianDenoiser(), None, rng, shape, sigmas, s_churn=10.0, s_tmin=100.0,
                                   s_tmax=200.0)
    churned = samplers.heun_sample(GaussianDenoiser(), None, rng, shape, sigmas, s_churn=10.0)
    np.testing.assert_allclose(np.asarray(outside), np.asarray(plain), rtol=1e-6)
    assert float(jnp.abs(churned - plain).max()) > 1e-3


@pytest.mark.parametrize("num_steps", [1, 4])
def test_sampler_reports_the_network_evaluations_it_makes(edm, num_steps):
    exp, params = edm
    spec = exp.method.sampler(num_steps)
    assert spec.network_evaluations == 2 * num_steps - 1
    assert spec.sigmas == samplers.edm_sigmas(num_steps, 0.002, 80.0, 7.0)
    counting = CountingDenoiser()
    with jax.disable_jit():  # lax.scan runs its body once per step
        samplers.heun_sample(counting, None, jax.random.PRNGKey(0), (2, 2, 2, 1), spec.sigmas)
    assert counting.calls == spec.network_evaluations


def test_eval_of_a_diffusion_run_reports_its_network_evaluations(edm_teacher_workdir, tmp_path, capsys):
    import shutil

    workdir = tmp_path / "edm"
    shutil.copytree(edm_teacher_workdir, workdir)
    config = edm_config()
    config.eval.num_samples = 16
    config.eval.steps = (2,)
    generate.run_eval(config, str(workdir))
    result = json.load(open(workdir / "eval" / "step_00000002.json"))
    assert result["network_evaluations"] == {"2": 3}
    assert result["sigmas"]["2"] == [80.0, pytest.approx(0.002), 0.0]
    assert "Network evaluations per sample: 2 steps: 3" in capsys.readouterr().out
