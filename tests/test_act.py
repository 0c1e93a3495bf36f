"""ACT (methods/act.py): l(t), the objectives, R1, the augmentation rule, the two-network step, exact resume.

Expected values are computed here from the formulas of SPEC section 3 and
the reference code (kong13661/ACT train_cifar10.py / train_imagenet64.py),
not by calling the functions under test. One jitted train step (module
fixture) serves the step, augmentation-rule and resume tests.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consistency_jax import checkpointing, experiment, methods, parallel, train
from consistency_jax.methods import act
from consistency_jax.models.discriminator import Discriminator
from tests.helpers import tiny_config
from tests.test_train import take_batches

TINY_DISC = dict(channels=(8, 16), num_res_blocks=1, attn_resolutions=(4,), num_head_channels=8)


def act_config(num_steps: int = 4):
    config = tiny_config(num_steps)
    config.method = methods.method_config("act")
    config.method.discriminator.update(TINY_DISC)
    config.method.curriculum_steps = 40  # N grows over the test's few steps
    config.method.r1_interval = 2
    # p moves on every R1 step (the R1 EMA starts at the threshold 0 and goes above it), by 16 * 2 / 128.
    config.method.ada_r1_threshold = 0.0
    config.method.ada_length = 128.0
    config.method.disc_learning_rate = 1e-3
    return config


# ----------------------------------------------------------------------------- schedules and weights


def test_adversarial_weight_l_of_t():
    # ImageNet-64 / LSUN: l(n) = 0.6 (n / (N - 1))^e, e = log_0.5(0.2 / 0.6), so l = 0.2 at n / (N - 1) = 1/2.
    e = act.adv_exponent(0.6, 0.2)
    assert e == pytest.approx(math.log(3) / math.log(2), rel=1e-12)  # 1.58496...
    n, num_scales = np.array([0, 1, 50, 100, 200]), 201
    sigma = (0.002 ** (1 / 7) + n / 200 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7  # s_n of the 201-point grid
    l_of_n = 0.6 * act.time_weight(jnp.asarray(sigma, jnp.float32), e, 0.002, 80.0, 7.0)
    expected = [0.0, 0.6 * (1 / 200) ** 1.5849625007, 0.6 * 0.25**1.5849625007, 0.2, 0.6]
    np.testing.assert_allclose(l_of_n, expected, rtol=1e-3, atol=1e-7)
    # CIFAR-10: a constant 0.3.
    assert act.adv_exponent(0.3, 0.0) == 0.0
    np.testing.assert_array_equal(0.3 * act.time_weight(jnp.asarray(sigma), 0.0, 0.002, 80.0, 7.0),
                                  np.full(5, 0.3, np.float32))


def test_curriculum_and_target_rate_follow_the_reference():
    # N(k) = round(sqrt(k/K (150^2 - 2^2) + 2^2)), held at 150 past K; mu = exp(2 ln 0.9 / (N - 1)).
    config = act_config()
    config.method.curriculum_steps = 300_000
    method = experiment.create_experiment(config, jax.devices()[:1]).method
    ks = (0, 1, 50_000, 150_000, 300_000, 400_000)
    expected_n = [min(round(math.sqrt(k / 300_000 * (150**2 - 4) + 4)), 150) for k in ks]
    assert expected_n[0] == 2 and expected_n[-2:] == [150, 150] and expected_n[2] == 61
    np.testing.assert_array_equal(method.num_scales(jnp.array(ks)), expected_n)
    mu = method.target_decay(jnp.array([0, 300_000]))
    np.testing.assert_allclose(mu, [0.81, math.exp(2 * math.log(0.9) / 149)], rtol=1e-6)


def test_ict_base_curriculum_draw_and_weight():
    """base='ict': iCT's doubling curriculum, lognormal intervals, 1/(s_n - s_{n-1}) on d, no EMA target."""
    config = act_config()
    config.method.update(base="ict", s0=10, s1=80, curriculum_steps=400)  # 4 stages of 100 steps: 10, 20, 40, 80
    method = experiment.create_experiment(config, jax.devices()[:1]).method
    np.testing.assert_array_equal(method.num_scales(jnp.array([0, 99, 100, 250, 399, 10_000])),
                                  [11, 11, 21, 41, 81, 81])
    assert not method.keeps_target()
    lo, hi = method.draw_intervals(jax.random.key(0), 20_000, jnp.int32(41))
    grid = (0.002 ** (1 / 7) + np.arange(41) / 40 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    index = np.rint((np.asarray(hi, np.float64) ** (1 / 7) - 0.002 ** (1 / 7))
                    / (80 ** (1 / 7) - 0.002 ** (1 / 7)) * 40).astype(int)  # hi's place on the grid
    np.testing.assert_allclose(np.asarray(hi), grid[index], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lo), grid[index - 1], rtol=1e-5)
    # P(n) proportional to Phi((ln s_n + 1.1) / 2) - Phi((ln s_{n-1} + 1.1) / 2).
    cdf = np.array([0.5 * math.erfc(-(math.log(s) + 1.1) / (2 * math.sqrt(2))) for s in grid])
    p = np.diff(cdf) / (cdf[-1] - cdf[0])
    freq = np.bincount(index - 1, minlength=40) / 20_000
    np.testing.assert_allclose(freq, p, atol=0.01)


def test_generator_objective_by_hand():
    distance, logits, weight = jnp.array([0.5, 2.0]), jnp.array([1.0, -3.0]), jnp.array([0.3, 0.6])
    expected = 0.5 * ((0.7 * 0.5 + 0.3 * math.log1p(math.exp(-1.0))) + (0.4 * 2.0 + 0.6 * math.log1p(math.exp(3.0))))
    assert float(act.generator_objective(distance, logits, weight)) == pytest.approx(expected, rel=1e-6)


def test_discriminator_objective_by_hand():
    fake, fake_w = jnp.array([2.0, -1.0]), jnp.array([1.0, 0.5])
    real, real_w = jnp.array([0.5, -2.0]), jnp.array([0.25, 1.0])
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = 0.6 * (0.5 * (softplus(2.0) + 0.5 * softplus(-1.0)) + 0.5 * (0.25 * softplus(-0.5) + softplus(2.0))
                      + 0.7)
    got = act.discriminator_objective(fake, fake_w, real, real_w, jnp.array(0.7), 0.6)
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_augmentation_rule_by_hand():
    # EMA (decay 0.5) of R1 against threshold 1; p moves by 0.3 per R1 step and stays in [0, 1].
    p, ema = jnp.float32(0.0), jnp.float32(1.0)
    expected = [(0.3, 2.0), (0.6, 2.5), (0.9, 1.25), (0.6, 0.625), (0.3, 0.3125), (0.0, 0.15625), (0.0, 0.078125)]
    for r1, (want_p, want_ema) in zip([3.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0], expected):
        p, ema = act.update_augmentation(p, ema, jnp.float32(r1), ema_decay=0.5, threshold=1.0, adjustment=0.3)
        assert (float(p), float(ema)) == pytest.approx((want_p, want_ema), abs=1e-6)
    for _ in range(5):
        p, ema = act.update_augmentation(p, ema, jnp.float32(100.0), ema_decay=0.5, threshold=1.0, adjustment=0.3)
    assert float(p) == 1.0


# ----------------------------------------------------------------------------- R1


def test_r1_gradient_matches_finite_differences_of_the_discriminator():
    disc = Discriminator(**TINY_DISC)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    sigma = jnp.array([0.3, 2.0])
    params = disc.init({"params": jax.random.key(1)}, x, sigma, train=False)["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])

    logits = jax.jit(lambda a, s: disc.apply({"params": params}, a, s, train=False))
    sq_norms = jax.jit(lambda a: act.input_gradient_sq_norms(lambda b: logits(b, sigma), a))(x)
    # Central differences, every pixel of each image, all in one batch.
    eps = 1e-2
    basis = eps * jnp.eye(64).reshape(64, 8, 8, 1)
    for i in range(2):
        plus, minus = logits(x[i] + basis, jnp.full((64,), sigma[i])), logits(x[i] - basis, jnp.full((64,), sigma[i]))
        grad = (plus - minus) / (2 * eps)
        assert float(sq_norms[i]) == pytest.approx(float(jnp.sum(grad**2)), rel=2e-2)
    assert float(jnp.min(sq_norms)) > 1e-3  # a real gradient, not zero


# ----------------------------------------------------------------------------- the train step


@pytest.fixture(scope="module")
def tiny():
    """The ACT experiment of act_config on one device, its jitted train step and batches.

    One-level networks without attention: the step and the hand computation compile in ~60% of the time
    (the networks themselves are tested in test_models_paper.py and test_discriminator.py).
    """
    config = act_config()
    config.model.attn_resolutions = ()
    config.method.discriminator.update(channels=(8,), attn_resolutions=())
    exp = experiment.create_experiment(config, jax.devices()[:1])
    batches = [parallel.global_batch(b, exp.mesh) for b in take_batches(config, 4)]
    return exp, train.jit_train_step(exp), batches


def test_update_applies_each_loss_gradient_to_its_own_network_only(tiny):
    """G moves by its optimizer on grad_G L_G alone, D by its own on grad_D L_D alone (computed here).

    Each loss depends on the other network (D judges G's images; D's inputs
    are G's images), but its gradient never reaches the other network.
    """
    exp, step_fn, batches = tiny
    method, state, batch = exp.method, exp.create_state(), batches[0]
    ms = state.method_state
    new, metrics = step_fn(exp.create_state(), batch)  # the step donates its input state

    gen_batch, fake_batch, real_batch = act.split_batch(batch)
    num_scales = jnp.int32(2)  # N(0) = s0
    # The loop's key for step 0, split as update splits it.
    gen_rng, inputs_rng, disc_rng = jax.random.split(jax.random.fold_in(state.rng, 0), 3)

    @jax.jit
    def by_hand(params, opt_state, ms):
        def gen_loss(p, d):
            return method.generator_loss(p, ms["target"], d, ms["ada_p"], gen_batch, gen_rng, num_scales)[0]

        def disc_loss(d, p):
            fake, real = method.discriminator_inputs(p, ms["ada_p"], fake_batch, real_batch, inputs_rng, num_scales)
            return method.discriminator_loss(d, fake, real, True, disc_rng)[0]

        gen_value, (gen_grads, gen_to_disc) = jax.value_and_grad(gen_loss, argnums=(0, 1))(params, ms["disc"])
        updates, _ = exp.optimizer.update(gen_grads, opt_state, params)
        new_params = jax.tree.map(lambda p, u: p + u, params, updates)
        disc_value, (disc_grads, disc_to_gen) = jax.value_and_grad(disc_loss, argnums=(0, 1))(ms["disc"], new_params)
        disc_updates, _ = method.disc_optimizer.update(disc_grads, ms["disc_opt"], ms["disc"])
        new_disc = jax.tree.map(lambda p, u: p + u, ms["disc"], disc_updates)
        other_disc = jax.tree.map(lambda d: 1.1 * d, ms["disc"])
        depends = (gen_loss(params, other_disc) - gen_value, disc_value - disc_loss(ms["disc"], params))
        return new_params, new_disc, gen_to_disc, disc_to_gen, depends

    params, disc, gen_to_disc, disc_to_gen, depends = by_hand(state.params, state.opt_state, ms)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # noqa: E731
    jax.tree.map(close, new.params, params)
    jax.tree.map(close, new.method_state["disc"], disc)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves((gen_to_disc, disc_to_gen)))
    assert min(abs(float(d)) for d in depends) > 1e-7
    for name in ("loss", "grad_norm", "gen_loss", "disc_loss", "disc_accuracy", "ada_p", "r1_ema", "distance"):
        assert np.isfinite(float(metrics[name])), name
    assert float(metrics["grad_norm"]) == pytest.approx(
        math.hypot(float(metrics["gen_grad_norm"]), float(metrics["disc_grad_norm"])), rel=1e-5)


def test_steps_move_p_on_r1_steps_and_resume_exactly(tiny, tmp_path):
    """Four steps straight equal two steps, a checkpoint, a restore and two more: both networks' states."""
    exp, step_fn, batches = tiny
    straight, ps = exp.create_state(), []  # (the step donates its input state)
    for batch in batches:
        straight, _ = step_fn(straight, batch)
        ps.append(float(straight.method_state["ada_p"]))
    # R1 at steps 0 and 2 (interval 2): p rises by 16 * 2 / 128 = 0.25 on those steps only.
    assert ps == pytest.approx([0.25, 0.25, 0.5, 0.5])

    resumed = exp.create_state()
    for batch in batches[:2]:
        resumed, _ = step_fn(resumed, batch)
    checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), keep=2, async_save=False)
    checkpointer.save(2, resumed, {}, force=True)
    _, resumed, _ = checkpointer.restore(exp.abstract_state())
    checkpointer.close()
    for batch in batches[2:]:
        resumed, _ = step_fn(resumed, batch)

    straight, resumed = jax.device_get(straight), jax.device_get(resumed)
    assert set(resumed.method_state) == {"target", "disc", "disc_opt", "ada_p", "r1_ema"}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), straight, resumed)
    # The discriminator's optimizer really holds state (RAdam's second moments moved).
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(resumed.method_state["disc_opt"])) > 0


# ----------------------------------------------------------------------------- config checks


@pytest.mark.parametrize("field,value,message", [
    ("distance", "lpips", "VGG weights"),
    ("adv_weight_mid", 0.5, r"adv_weight_mid=0.5 is invalid: .* <= config.method.adv_weight \(0.3\)"),
    ("disc_optimizer", "sgd", "must be one of 'radam', 'adam'"),
    ("r1_interval", 0, "r1_interval=0 is invalid: must be an integer >= 1"),
])
def test_bad_method_fields_are_named(field, value, message):
    config = act_config()
    config.method[field] = value
    with pytest.raises(ValueError, match=message):
        methods.check_method_config(config)


def test_split_batch_deals_each_group_in_the_ratio():
    batch = {"image": jnp.arange(16), "label": -jnp.arange(16)}
    gen, fake, real = act.split_batch(batch)  # the reference's half and quarters, in groups of 4
    assert (gen["image"].tolist(), fake["image"].tolist(), real["image"].tolist()) == (
        [0, 1, 4, 5, 8, 9, 12, 13], [2, 6, 10, 14], [3, 7, 11, 15])
    gen, fake, real = act.split_batch(batch, (6, 1, 1))
    assert (gen["image"].tolist(), fake["image"].tolist(), real["image"].tolist()) == (
        [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13], [6, 14], [7, 15])
    assert real["label"].tolist() == [-7, -15]


def test_batch_must_split_into_quarters():
    config = act_config()
    config.training.batch_size = 18
    with pytest.raises(ValueError, match="multiple of 4, got 18"):
        methods.check_method_config(config)
    config.method.batch_split = (6, 1, 1)
    config.training.batch_size = 36
    with pytest.raises(ValueError, match="multiple of 8, got 36"):
        methods.check_method_config(config)
