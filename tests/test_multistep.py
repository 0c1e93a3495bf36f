"""Multistep consistency models: the VP bridge, DDIM/invDDIM/aDDIM, the annealing, the loss and the sampler.

Expected values are computed here in float64 numpy from SPEC section 5's formulas (written in the
paper's VP notation), independently of consistency_jax/vp.py.
"""

import importlib.util
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from consistency_jax import checkpointing, experiment, methods, parallel, teachers, train, vp
from consistency_jax import state as state_lib
from consistency_jax.methods import multistep
from consistency_jax.parametrization import ConsistencyFunction
from tests.helpers import jit_init, tiny_config

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
SCHEDULE = vp.CosineSchedule(SIGMA_MIN, SIGMA_MAX)


def np_schedule(t, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX):
    """(alpha, std) of the truncated cosine schedule: sigma(t) = tan(atan(s_min) + t (atan(s_max) - atan(s_min)))."""
    u = np.arctan(sigma_min) + np.asarray(t, np.float64) * (np.arctan(sigma_max) - np.arctan(sigma_min))
    return np.cos(u), np.sin(u)  # alpha^2 + std^2 = 1 and std / alpha = tan(u) = sigma


def col(v):
    return np.asarray(v, np.float64)[:, None, None, None]


def np_ddim(x, z_t, t, s):
    (a_t, std_t), (a_s, std_s) = t, s
    return col(a_s) * x + col(std_s / std_t) * (z_t - col(a_t) * x)


def np_inv_ddim(z_s, z_t, t, s):
    (a_t, std_t), (a_s, std_s) = t, s
    r = col(std_s / std_t)
    return (z_s - r * z_t) / (col(a_s) - col(a_t) * r)


def np_addim(x, z_t, t, s, x_var):
    (a_t, std_t), (a_s, std_s) = t, s
    eps = (z_t - col(a_t) * x) / col(std_t)
    z_var = col((a_s - a_t * std_s / std_t) ** 2 * x_var)
    d = np.prod(x.shape[1:])
    norm_sq = col((eps.reshape(len(x), -1) ** 2).sum(1))
    return col(a_s) * x + np.sqrt(col(std_s) ** 2 + d / norm_sq * z_var) * eps


def level(pair):
    return vp.Level(jnp.asarray(pair[0], jnp.float32), jnp.asarray(pair[1], jnp.float32))


def f32(a):
    return jnp.asarray(a, jnp.float32)


# ----------------------------------------------------------------------------
# The schedule and the sigma <-> VP bridge.
# ----------------------------------------------------------------------------


def test_level_of_sigma_bridges_vp_and_sigma_space():
    sigma = np.array([0.002, 0.3, 1.0, 7.5, 80.0])
    lvl = vp.Level.of_sigma(f32(sigma))
    np.testing.assert_allclose(lvl.alpha, 1 / np.sqrt(1 + sigma**2), rtol=1e-6)
    np.testing.assert_allclose(lvl.std, sigma / np.sqrt(1 + sigma**2), rtol=1e-6)
    np.testing.assert_allclose(np.square(lvl.alpha) + np.square(lvl.std), 1.0, rtol=1e-6)
    np.testing.assert_allclose(lvl.sigma, sigma, rtol=1e-6)
    np.testing.assert_allclose(lvl.snr, 1 / sigma**2, rtol=1e-5)  # log-SNR = -2 ln sigma
    rng = np.random.default_rng(0)
    x, eps = rng.uniform(-1, 1, (5, 4, 4, 1)), rng.normal(size=(5, 4, 4, 1))
    z = col(lvl.alpha) * x + col(lvl.std) * eps  # the VP forward process
    np.testing.assert_allclose(vp.to_sigma_space(f32(z), lvl), x + col(sigma) * eps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(vp.from_sigma_space(f32(x + col(sigma) * eps), lvl), z, rtol=1e-5, atol=1e-6)


def test_cosine_schedule_is_the_truncated_cosine():
    t = np.array([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    np.testing.assert_allclose(SCHEDULE.sigma(t), np.tan(np.arctan(SIGMA_MIN) + t * (np.arctan(SIGMA_MAX)
                                                                                      - np.arctan(SIGMA_MIN))),
                               rtol=1e-5)
    assert float(SCHEDULE.sigma(0.0)) == pytest.approx(SIGMA_MIN, rel=1e-5)
    assert float(SCHEDULE.sigma(1.0)) == pytest.approx(SIGMA_MAX, rel=1e-5)
    np.testing.assert_allclose(SCHEDULE.sigma_values(t), SCHEDULE.sigma(t), rtol=1e-5)
    np.testing.assert_allclose(SCHEDULE.time(SCHEDULE.sigma(t)), t, atol=1e-6)
    # With wide limits it is the textbook cosine: alpha_t = cos(pi t / 2), log-SNR = -2 ln tan(pi t / 2).
    wide = vp.CosineSchedule(1e-6, 1e6).level(t[1:-1])
    np.testing.assert_allclose(wide.alpha, np.cos(np.pi * t[1:-1] / 2), atol=1e-5)
    np.testing.assert_allclose(np.log(wide.snr), -2 * np.log(np.tan(np.pi * t[1:-1] / 2)), atol=1e-4)


def test_shifted_schedule_keeps_the_ends_and_shifts_the_interior():
    shift = 2 * math.log(32 / 64)  # simple diffusion's shift from noise resolution 64 to 32
    shifted = vp.CosineSchedule(SIGMA_MIN, SIGMA_MAX, shift)
    assert float(shifted.sigma(0.0)) == pytest.approx(SIGMA_MIN, rel=1e-5)
    assert float(shifted.sigma(1.0)) == pytest.approx(SIGMA_MAX, rel=1e-5)
    # log-SNR(t) = -2 ln tan(u0 + t (u1 - u0)) + shift, u at the ends from sigma * exp(shift / 2).
    scale = math.exp(shift / 2)
    u0, u1 = math.atan(SIGMA_MIN * scale), math.atan(SIGMA_MAX * scale)
    t = np.array([0.2, 0.5, 0.8])
    np.testing.assert_allclose(-2 * np.log(shifted.sigma(t)), -2 * np.log(np.tan(u0 + t * (u1 - u0))) + shift,
                               rtol=1e-5)
    assert np.all(np.asarray(shifted.sigma(t)) > np.asarray(SCHEDULE.sigma(t)))  # more noise in the middle


# ----------------------------------------------------------------------------
# DDIM, invDDIM, aDDIM.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vp_pair():
    """Per-example t > s levels and images."""
    rng = np.random.default_rng(1)
    t = np.array([0.9, 0.5, 0.2, 1.0])
    s = t - np.array([0.3, 1 / 1280, 0.2, 0.5])
    x_hat, z_t, z_s = (rng.normal(size=(4, 4, 4, 3)) for _ in range(3))
    return np_schedule(t), np_schedule(s), x_hat, z_t, z_s


def test_ddim_matches_spec(vp_pair):
    t, s, x_hat, z_t, _ = vp_pair
    np.testing.assert_allclose(vp.ddim(f32(x_hat), f32(z_t), level(t), level(s)), np_ddim(x_hat, z_t, t, s),
                               rtol=1e-5, atol=1e-5)


def test_inv_ddim_inverts_ddim_both_ways(vp_pair):
    t, s, x_hat, z_t, z_s = vp_pair
    # invDDIM_{t->s}(DDIM_{t->s}(x, z_t), z_t) = x
    z = vp.ddim(f32(x_hat), f32(z_t), level(t), level(s))
    np.testing.assert_allclose(vp.inv_ddim(z, f32(z_t), level(t), level(s)), x_hat, atol=2e-3)
    # DDIM_{t->s}(invDDIM_{t->s}(z_s, z_t), z_t) = z_s, and invDDIM is eq. 5
    x = vp.inv_ddim(f32(z_s), f32(z_t), level(t), level(s))
    np.testing.assert_allclose(x, np_inv_ddim(z_s, z_t, t, s), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(vp.ddim(x, f32(z_t), level(t), level(s)), z_s, atol=1e-4)


def test_ddim_steps_compose_for_a_fixed_prediction(vp_pair):
    """DDIM_{s->u}(x, DDIM_{t->s}(x, z)) = DDIM_{t->u}(x, z): what makes a DDIM path a consistency target."""
    t, s, x_hat, z_t, _ = vp_pair
    u = np_schedule(np.zeros(4))
    two = vp.ddim(f32(x_hat), vp.ddim(f32(x_hat), f32(z_t), level(t), level(s)), level(s), level(u))
    np.testing.assert_allclose(two, vp.ddim(f32(x_hat), f32(z_t), level(t), level(u)), atol=1e-5)


def test_addim_is_ddim_without_variance_and_eq_14_with_it(vp_pair):
    t, s, x_hat, z_t, _ = vp_pair
    np.testing.assert_allclose(vp.addim(f32(x_hat), f32(z_t), level(t), level(s), jnp.zeros(4)),
                               vp.ddim(f32(x_hat), f32(z_t), level(t), level(s)), rtol=1e-6, atol=1e-6)
    x_var = np.array([0.05, 0.3, 0.0, 1.0])
    adjusted = vp.addim(f32(x_hat), f32(z_t), level(t), level(s), f32(x_var))
    np.testing.assert_allclose(adjusted, np_addim(x_hat, z_t, t, s, x_var), rtol=1e-5, atol=1e-5)
    # The inflation grows the noise part (the point of aDDIM), leaves the x_var = 0 example alone, and
    # vanishes as s -> t (example 1: one step of 1/1280), where aDDIM becomes DDIM.
    ddim = np.asarray(vp.ddim(f32(x_hat), f32(z_t), level(t), level(s)))
    grown = np.abs(np.asarray(adjusted) - ddim).reshape(4, -1).max(1)
    assert grown[2] == 0 and grown[1] < 1e-5 and np.all(grown[[0, 3]] > 1e-2)


# ----------------------------------------------------------------------------
# The annealing and the time draw.
# ----------------------------------------------------------------------------


def test_teacher_step_annealing_values():
    # T(i) = exp(ln 64 + clip(i / 100k, 0, 1) (ln 1280 - ln 64)): 64, 64 * 20^(1/4), sqrt(64 * 1280), 1280.
    values = [float(multistep.teacher_steps(i, 64, 1280, 100_000)) for i in (0, 25_000, 50_000, 100_000, 150_000)]
    np.testing.assert_allclose(values, [64, 64 * 20**0.25, math.sqrt(64 * 1280), 1280, 1280], rtol=1e-5)
    per_segment = [int(multistep.steps_per_segment(i, 8, 64, 1280, 100_000)) for i in (0, 50_000, 100_000)]
    assert per_segment == [8, round(286.216 / 8), 160]
    assert int(multistep.steps_per_segment(0, 4096, 64, 1280, 100_000)) == 1  # never 0
    assert float(multistep.teacher_steps(0, 64, 1280, 0)) == pytest.approx(1280)  # no annealing


def test_draw_times_lie_on_the_grid_inside_their_segment():
    segments, per_segment = 4, 5
    t_step, t, s, n = multistep.draw_times(jax.random.PRNGKey(0), 4000, segments, jnp.int32(per_segment))
    t_step, t, s, n = (np.asarray(v, np.float64) for v in (t_step, t, s, n))
    total = segments * per_segment
    np.testing.assert_allclose(t * total, np.round(t * total), atol=1e-4)  # t = k / T
    np.testing.assert_allclose(t - s, 1 / total, atol=1e-6)
    assert np.all((t > t_step) & (t <= t_step + 1 / segments + 1e-6))
    assert np.array_equal(s == t_step, n == 1)  # exactly at the segment start when n = 1
    assert set(np.round(t_step * segments)) == set(range(segments)) and set(n) == set(range(1, per_segment + 1))


# ----------------------------------------------------------------------------
# The loss.
# ----------------------------------------------------------------------------


@jax.jit
def _perturb(params, key):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def randomize(params, seed=1):
    """Every weight perturbed (zero-initialised output layers would hide the network's contribution)."""
    return _perturb(params, jax.random.PRNGKey(seed))


class TinyDenoiser(nn.Module):
    """A few-op network with the model registry's call signature: the loss and sampler maths do not need
    NCSN++, and this one compiles in a fraction of the time."""

    @nn.compact
    def __call__(self, x, noise_label, labels=None, train=False):
        h = nn.Conv(8, (3, 3))(x)
        h = h + nn.Dense(8)(jnp.stack([noise_label, jnp.sin(3 * noise_label)], -1))[:, None, None, :]
        h = nn.Dropout(0.3, deterministic=not train)(nn.silu(h))
        return nn.Conv(x.shape[-1], (3, 3))(h)


@pytest.fixture(scope="module")
def net():
    """The tiny network as an EDM denoiser, jitted, two param sets (student, teacher), and a data batch."""
    fn = ConsistencyFunction(TinyDenoiser(), SIGMA_MIN, 0.5, "edm", boundary=False)
    init = jit_init(fn, 0, (8, 8, 1))
    x = jax.random.uniform(jax.random.PRNGKey(3), (6, 8, 8, 1), minval=-1, maxval=1)
    return fn, jax.jit(fn, static_argnames="train"), randomize(init, 1), randomize(init, 2), x


def loss_kwargs(fn, teacher_fn=None, segments=4, start=8, end=8, xvar_frac=0.0, norm="rms",
                weighting="snr_plus_one"):
    return dict(fn=fn, teacher_fn=teacher_fn, schedule=SCHEDULE, segments=segments, teacher_steps_start=start,
                teacher_steps_end=end, anneal_steps=100, xvar_frac=xvar_frac, huber_eps=1e-4, distance_norm=norm,
                weighting=weighting)


def jit_loss(**kwargs):
    return jax.jit(lambda params, teacher, x, rng, step: multistep.multistep_loss(
        params, teacher, {"image": x}, rng, step, **kwargs))


def test_cd_loss_matches_an_independent_computation(net):
    """Algorithm 1 with an aDDIM teacher step (eta 0.75), recomputed in float64 from SPEC's VP formulas."""
    fn, apply, params, teacher_params, x = net
    rng, step = jax.random.PRNGKey(5), jnp.int32(50)  # T(50) = sqrt(8 * 32) = 16: 4 steps per segment
    loss_fn = jit_loss(**loss_kwargs(fn, teacher_fn=fn, start=8, end=32, xvar_frac=0.75))
    loss, metrics = loss_fn(params, teacher_params, x, rng, step)
    assert float(metrics["teacher_steps"]) == 16

    time_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
    t_step, t, s, n = (np.asarray(v, np.float64) for v in multistep.draw_times(time_rng, 6, 4, jnp.int32(4)))
    assert 1 in n and np.any(n > 1)  # both the edge case and the general case are in the batch
    eps = np.asarray(jax.random.normal(noise_rng, x.shape), np.float64)
    xs = np.asarray(x, np.float64)
    lt, ls, lstep = np_schedule(t), np_schedule(s), np_schedule(t_step)

    def network(p, z, lvl, train=True):  # the VP model through the sigma-space network
        out = apply(p, f32(z / col(lvl[0])), f32(lvl[1] / lvl[0]), None, train=train,
                    dropout_rng=dropout_rng if train else None)
        return np.asarray(out, np.float64)

    z_t = col(lt[0]) * xs + col(lt[1]) * eps
    x_teacher = network(teacher_params, z_t, lt, train=False)
    x_var = 0.75 * ((x_teacher - xs) ** 2).reshape(6, -1).mean(1)
    z_s = np_addim(x_teacher, z_t, lt, ls, x_var)
    z_ref = np.where(col(n) == 1, z_s, np_ddim(network(params, z_s, ls), z_s, ls, lstep))
    target = np_inv_ddim(z_ref, z_t, lt, lstep)
    diff = (network(params, z_t, lt) - target).reshape(6, -1)
    per_example = (np.sqrt((diff**2).mean(1) + 1e-8) - 1e-4) * (1 + (lt[0] / lt[1]) ** 2)  # (SNR + 1) weight
    assert float(loss) == pytest.approx(per_example.mean(), rel=2e-3)
    assert float(metrics["x_var"]) == pytest.approx(x_var.mean(), rel=1e-3)


def test_with_one_step_per_segment_ct_is_weighted_diffusion_training(net):
    """S = T (the many-step limit, the paper's eq. 9): every target is x, and multistep CT is (SNR + 1)-weighted
    pseudo-Huber x-prediction diffusion training on the grid t = k / T."""
    fn, apply, params, _, x = net
    rng = jax.random.PRNGKey(11)
    loss, metrics = jit_loss(**loss_kwargs(fn, segments=16, start=16, end=16))(params, None, x, rng, jnp.int32(0))
    assert float(metrics["teacher_steps"]) == 16
    # The diffusion loss, in sigma space, at the same draws: t = (segment + 1) / S.
    time_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
    t = np.asarray(multistep.draw_times(time_rng, 6, 16, jnp.int32(1))[1], np.float64)
    sigma = np.tan(np.arctan(SIGMA_MIN) + t * (np.arctan(SIGMA_MAX) - np.arctan(SIGMA_MIN)))
    noisy = np.asarray(x, np.float64) + col(sigma) * np.asarray(jax.random.normal(noise_rng, x.shape))
    denoised = apply(params, f32(noisy), f32(sigma), None, train=True, dropout_rng=dropout_rng)
    diff = np.asarray(denoised - x, np.float64).reshape(6, -1)
    expected = np.mean((1 + 1 / sigma**2) * (np.sqrt((diff**2).mean(1) + 1e-8) - 1e-4))
    assert float(loss) == pytest.approx(expected, rel=2e-3)


def constant_fn(params, x_sigma, sigma, labels=None, **_):
    """A stand-in network that predicts its params (an image) whatever it sees."""
    return jnp.broadcast_to(params, x_sigma.shape)


def test_a_perfect_model_of_a_point_mass_has_zero_loss():
    """Data = one image x0: the ODE path has x_hat = x0 everywhere; the model that says so is consistent for any S, T."""
    x0 = jax.random.uniform(jax.random.PRNGKey(0), (1, 8, 8, 1), minval=-1, maxval=1)
    x = jnp.repeat(x0, 8, axis=0)
    for teacher_fn in (None, constant_fn):  # CT, and CD with a perfect teacher (x_var = 0)
        loss_fn = jit_loss(**loss_kwargs(constant_fn, teacher_fn=teacher_fn, segments=2, start=16, end=16,
                                         xvar_frac=0.75, norm="sum"))
        perfect, _ = loss_fn(x0, x0, x, jax.random.PRNGKey(1), 0)
        off, _ = loss_fn(x0 + 0.01, x0, x, jax.random.PRNGKey(1), 0)
        assert float(perfect) < 1e-3 * float(off), (float(perfect), float(off))


def test_reference_pass_gets_no_gradient():
    """With a one-parameter network x_hat = w x_sigma, d loss / dw is the student term's derivative alone."""
    x = jax.random.uniform(jax.random.PRNGKey(0), (8, 8, 8, 1), minval=-1, maxval=1)
    linear = lambda params, x_sigma, sigma, labels=None, **_: params * x_sigma  # noqa: E731
    rng, w = jax.random.PRNGKey(2), jnp.float32(0.7)
    loss_fn = jit_loss(**loss_kwargs(linear, segments=2, start=16, end=16))
    grad = float(jax.grad(lambda p: loss_fn(p, None, x, rng, 0)[0])(w))

    time_rng, noise_rng, _ = jax.random.split(rng, 3)
    t_step, t, s, n = (np.asarray(v, np.float64) for v in multistep.draw_times(time_rng, 8, 2, jnp.int32(8)))
    lt, ls, lstep = np_schedule(t), np_schedule(s), np_schedule(t_step)
    xs, eps = np.asarray(x, np.float64), np.asarray(jax.random.normal(noise_rng, x.shape), np.float64)
    z_t = col(lt[0]) * xs + col(lt[1]) * eps
    z_s = np_ddim(xs, z_t, lt, ls)
    z_ref = np.where(col(n) == 1, z_s, np_ddim(0.7 * z_s / col(ls[0]), z_s, ls, lstep))
    target = np_inv_ddim(z_ref, z_t, lt, lstep)  # a constant for the gradient
    x_sigma_t = z_t / col(lt[0])
    r = (0.7 * x_sigma_t - target).reshape(8, -1)
    d_distance = (r * x_sigma_t.reshape(8, -1)).mean(1) / np.sqrt((r**2).mean(1) + 1e-8)
    assert grad == pytest.approx(np.mean((1 + (lt[0] / lt[1]) ** 2) * d_distance), rel=1e-3)


# ----------------------------------------------------------------------------
# The sampler.
# ----------------------------------------------------------------------------


def ct_config(num_steps=3, segments=2):
    config = tiny_config(num_steps)
    config.method = methods.method_config("multistep_ct")
    config.method.update(dict(segments=segments, teacher_steps_start=4, teacher_steps_end=8, anneal_steps=2))
    config.sampling.num_steps = segments
    config.eval.steps = (1, segments)
    return config


@pytest.fixture(scope="module")
def ct_method(net):
    """multistep_ct around the tiny network."""
    return multistep.MultistepCT(ct_config(), net[0], (8, 8, 1), 0)


@pytest.fixture(scope="module")
def four_step_sampler(ct_method):
    spec = ct_method.sampler(4)
    return spec, jax.jit(lambda params, rng: spec.sample(params, rng, (6, 8, 8, 1), None))


def test_sampler_is_ddim_between_segment_boundaries(ct_method, four_step_sampler, net):
    _, apply, params, _, _ = net
    spec, sample = four_step_sampler
    expected_sigmas = np.tan(np.arctan(SIGMA_MIN) + np.array([1, 0.75, 0.5, 0.25])
                             * (np.arctan(SIGMA_MAX) - np.arctan(SIGMA_MIN)))
    np.testing.assert_allclose(spec.sigmas[:-1], expected_sigmas, rtol=1e-5)
    assert spec.sigmas[-1] == 0.0 and spec.network_evaluations == 4
    assert spec.key == ct_method.sampler(4).key != ct_method.sampler(2).key

    rng = jax.random.PRNGKey(4)
    images = sample(params, rng)
    assert images.shape == (6, 8, 8, 1)
    # By hand (Algorithm 2): z_1 ~ N(0, I); z <- DDIM_{t -> t - 1/4}(f(z, t), z); the last step returns f.
    z = np.asarray(jax.random.normal(rng, images.shape), np.float64)
    times = [1.0, 0.75, 0.5, 0.25]
    for k, t in enumerate(times):
        lt = np_schedule(np.full(6, t))
        x_hat = np.asarray(apply(params, f32(z / col(lt[0])), f32(lt[1] / lt[0]), None), np.float64)
        z = np_ddim(x_hat, z, lt, np_schedule(np.full(6, times[k + 1]))) if k < 3 else x_hat
    np.testing.assert_allclose(images, z, rtol=1e-3, atol=1e-3)


def test_sampler_is_deterministic_for_a_key(ct_method, four_step_sampler, net):
    _, apply, params, _, _ = net
    sample = four_step_sampler[1]
    a, b = sample(params, jax.random.PRNGKey(0)), sample(params, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - sample(params, jax.random.PRNGKey(1))).max()) > 1e-2
    # One step is f(z_1 / alpha_1, sigma_max) with z_1 ~ N(0, I).
    one = jax.jit(lambda p, r: ct_method.sampler(1).sample(p, r, (6, 8, 8, 1), None))(
        params, jax.random.PRNGKey(0))
    z = jax.random.normal(jax.random.PRNGKey(0), (6, 8, 8, 1))
    np.testing.assert_allclose(one, apply(params, z / vp.Level.of_sigma(jnp.float32(SIGMA_MAX)).alpha,
                                          jnp.float32(SIGMA_MAX), None), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# The methods: config, state, training.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,message", [
    ("segments", 0, "segments=0 is invalid: must be an integer >= 1"),
    ("teacher_steps_start", 2000, "1 <= start <= end"),
    ("huber_eps", 0.0, "huber_eps=0.0 is invalid: must be a finite number > 0"),
    ("distance_norm", "l1", "must be one of 'rms', 'sum'"),
    ("weighting", "v", "must be one of 'snr_plus_one', 'sqrt_snr_plus_one'"),
    ("anneal_steps", -1, "anneal_steps=-1 is invalid: must be an integer >= 0"),
])
def test_bad_fields_stop_at_start(field, value, message):
    config = ct_config()
    config.method[field] = value
    with pytest.raises(experiment.ConfigError, match=message):
        experiment.validate_config(config)


def test_ct_teacher_without_initialisation_and_cd_without_teacher_are_errors():
    config = ct_config()
    config.method.teacher_workdir, config.method.init_from_teacher = "/somewhere", False
    with pytest.raises(experiment.ConfigError, match="uses a teacher only as its initialisation"):
        experiment.validate_config(config)
    config = ct_config()
    config.method = methods.method_config("multistep_cd")
    with pytest.raises(teachers.TeacherError, match="needs a teacher"):
        experiment.create_experiment(config, jax.devices()[:1])
    config.method.xvar_frac = -0.5
    with pytest.raises(experiment.ConfigError, match="xvar_frac=-0.5 is invalid: must be a finite number >= 0"):
        experiment.validate_config(config)


def test_ct_state_and_initialisation(ct_method, net):
    assert ct_method.init_state(None, None) == {}  # CT keeps nothing beside the params
    params = net[2]
    fresh = jax.tree.map(jnp.zeros_like, params)
    assert ct_method.init_params(fresh, None) is fresh
    assert ct_method.init_params(fresh, params) is params  # a teacher_workdir initialises CT


def write_teacher_workdir(workdir):
    """A diffusion (EDM) run's workdir as the teacher loader reads it: config.json and a checkpoint.

    The params are random arrays of the network's shapes (eval_shape: nothing is compiled).
    """
    config = tiny_config()
    config.method = methods.method_config("edm")
    exp = experiment.create_experiment(config, jax.devices()[:1])
    shapes = jax.eval_shape(exp.init_params, jax.random.PRNGKey(0))
    leaves, tree = jax.tree.flatten(shapes)
    rng = np.random.default_rng(0)
    params, ema = (jax.tree.unflatten(tree, [rng.normal(size=v.shape).astype(v.dtype) for v in leaves])
                   for _ in range(2))
    state = state_lib.create_train_state(params, optax.sgd(0.1), 1, jax.random.PRNGKey(0), {})
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort())
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    checkpointer.save(10, state.replace(ema_params=(ema,)), {})
    checkpointer.close()
    return ema


def cd_config(teacher_workdir):
    config = ct_config()
    config.method = methods.method_config("multistep_cd")
    config.method.update(dict(segments=2, teacher_steps_start=4, teacher_steps_end=8, anneal_steps=2,
                              teacher_workdir=teacher_workdir))
    return config


def same(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cd_loads_its_teacher_keeps_it_and_starts_from_it(tmp_path):
    teacher_params = write_teacher_workdir(str(tmp_path / "teacher"))
    exp = experiment.create_experiment(cd_config(str(tmp_path / "teacher")), jax.devices()[:1],
                                       workdir=str(tmp_path / "student"))
    assert exp.method.teacher_fn is not None
    loaded = teachers.load_params(exp.config, exp.teacher_config, exp.teacher_shapes, exp.mesh)
    jax.tree.map(same, loaded, teacher_params)  # teacher_ema_rate -1: the teacher's first EMA
    fresh = jax.tree.map(jnp.zeros_like, loaded)
    jax.tree.map(same, exp.method.init_params(fresh, loaded), teacher_params)  # init_from_teacher
    jax.tree.map(same, exp.method.init_state(fresh, loaded)["teacher"], teacher_params)
    exp.config.method.init_from_teacher = False
    assert exp.method.init_params(fresh, loaded) is fresh


@pytest.mark.slow
def test_cd_trains_through_the_loop_with_a_frozen_teacher(tmp_path):
    teacher_params = write_teacher_workdir(str(tmp_path / "teacher"))
    exp = experiment.create_experiment(cd_config(str(tmp_path / "teacher")), jax.devices()[:1],
                                       workdir=str(tmp_path / "student"))
    state = exp.create_state()
    jax.tree.map(same, state.params, teacher_params)
    jax.tree.map(same, state.method_state["teacher"], teacher_params)
    step_fn = train.jit_train_step(exp)
    images = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (16, 8, 8, 1), minval=-1, maxval=1))
    teacher_steps = []
    for _ in range(3):
        state, metrics = step_fn(state, parallel.global_batch({"image": images}, exp.mesh))
        assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0 and float(metrics["x_var"]) > 0
        teacher_steps.append(float(metrics["teacher_steps"]))
    assert teacher_steps == [4.0, 6.0, 8.0]  # T: 4 -> sqrt(32) -> 8, rounded to 2 segments of whole steps
    jax.tree.map(same, jax.device_get(state.method_state["teacher"]), teacher_params)  # the teacher stays frozen
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), teacher_params,
                                         jax.device_get(state.params)))
    assert max(moved) > 1e-5


# ----------------------------------------------------------------------------
# Configs.
# ----------------------------------------------------------------------------


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config(name, *args):
    """A config file loaded by path, as config_flags does (`--config=configs/<name>.py:<arg>`)."""
    path = os.path.join(CONFIG_DIR, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


@pytest.mark.parametrize("name,published", [
    ("imagenet64_multistep_ct", {1: 7.2, 2: 2.7, 4: 1.8, 8: 1.5, 16: 1.5}),
    ("imagenet64_multistep_cd", {1: 4.3, 2: 2.0, 4: 1.7, 8: 1.6, 16: 1.5}),
])
def test_imagenet_configs_follow_the_paper(name, published):
    for segments in (1, 2, 4, 8, 16):
        config = load_config(name, str(segments))
        methods.check_method_config(config)  # (validate_config would also look for the ImageNet data)
        for steps in config.eval.steps:
            multistep.MultistepConsistency.check_sampler(config, steps)
        assert config.method.segments == config.sampling.num_steps == segments and tuple(config.eval.steps) == (
            segments,)
    fields = config.method
    assert (fields.teacher_steps_start, fields.teacher_steps_end, fields.anneal_steps) == (64, 1280, 100_000)
    assert fields.huber_eps == 1e-4 and fields.weighting == "snr_plus_one" and fields.init_from_teacher
    assert (config.training.batch_size, config.training.num_steps) == (2048, 200_000)
    assert fields.get("xvar_frac", 0.75) == 0.75
    assert load_config(name).method.segments == 8  # no argument: the 8-step model
    doc = open(os.path.join(CONFIG_DIR, f"{name}.py")).read()
    listing = ", ".join(f"{s}: {fid}" for s, fid in published.items())
    assert f"--config=configs/{name}.py:8" in doc and listing.replace("1: ", "S = 1: ", 1) in doc


def test_quickstart_configs_are_valid_and_share_the_edm_teachers_network():
    ct, cd = load_config("quickstart_multistep"), load_config("quickstart_multistep_cd")
    experiment.validate_config(ct)
    experiment.validate_config(cd)
    assert (ct.method.name, cd.method.name) == ("multistep_ct", "multistep_cd")
    assert tuple(ct.eval.steps) == tuple(cd.eval.steps) == (1, 2, 4, 8)
    assert ct.model.to_dict() == load_config("quickstart").model.to_dict()
    edm = load_config("quickstart_edm")  # the CD student starts from the EDM quickstart's params
    assert cd.model.to_dict() == edm.model.to_dict()
    assert cd.parametrization.to_dict() == edm.parametrization.to_dict()
