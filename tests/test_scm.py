"""sCT / sCD (methods/scm.py) and TrigFlow (parametrization.py): conversions, the JVP, the loss, training."""

import contextlib
import copy
import json
import math
import os
import runpy

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from consistency_jax import checkpointing, experiment, methods, parallel, parametrization, train
from consistency_jax.data import pipeline
from consistency_jax.methods import scm
from consistency_jax.models import create_model
from consistency_jax.models.layers import ResBlock
from consistency_jax.state import TrainState
from tests.helpers import jit_init, tiny_config

SD = 0.5
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def scm_config(name: str = "scm_ct", num_steps: int = 4, **model) -> ml_collections.ConfigDict:
    """An 8-channel one-level NCSN++ (its middle attention only; a third of tiny_config's network, quicker to
    compile) with the paper's TrigFlow options: positional embedding, adaptive double normalisation."""
    config = tiny_config(num_steps)
    config.method = methods.method_config(name)
    config.model.update(dict(channel_mult=(1,), attn_resolutions=(), embedding_type="positional",
                             adaptive_double_norm=True, dropout=0.0, **model))
    return config


def make_method(config: ml_collections.ConfigDict, teacher_fn=None) -> scm.SCM:
    cls = methods.get_method(config.method.name)
    fn = cls.make_function(config, create_model(config.model))
    return cls(config, fn, (8, 8, 1), 0, teacher_fn=teacher_fn)


def randomize(params, seed=1, scale=0.1):
    # The output convolution starts at zero, which would hide the network: perturb every weight.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])


@contextlib.contextmanager
def float64():
    """jax_enable_x64 inside the block only (the rest of the suite runs in float32)."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ----------------------------------------------------------------------------
# TrigFlow <-> EDM.
# ----------------------------------------------------------------------------


def test_trigflow_edm_conversions_round_trip_and_match_the_formulas():
    sigma = jnp.array([0.002, 0.1, 0.5, 3.0, 80.0])
    t = parametrization.trigflow_time(sigma, SD)
    np.testing.assert_allclose(t, np.arctan(np.asarray(sigma, np.float64) / SD), rtol=1e-6)
    np.testing.assert_allclose(parametrization.edm_sigma(t, SD), sigma, rtol=1e-5)
    x_sigma = jax.random.normal(jax.random.PRNGKey(0), (5, 4, 4, 1)) * (1 + sigma[:, None, None, None])
    x_t = parametrization.trigflow_x(x_sigma, t)
    np.testing.assert_allclose(x_t, np.cos(np.asarray(t))[:, None, None, None] * np.asarray(x_sigma), rtol=1e-6)
    np.testing.assert_allclose(parametrization.edm_x(x_t, t), x_sigma, rtol=1e-5)
    # The same x0 and noise: x_sigma = x0 + sigma eps is x_t = cos(t) x0 + sin(t) sd eps.
    x0, eps = jnp.ones((5, 4, 4, 1)), jnp.full((5, 4, 4, 1), 0.3)
    np.testing.assert_allclose(
        parametrization.trigflow_x(x0 + sigma[:, None, None, None] * eps, t),
        np.broadcast_to(np.cos(np.asarray(t))[:, None, None, None] + np.sin(np.asarray(t))[:, None, None, None]
                        * SD * 0.3, x0.shape), rtol=1e-5)
    denoised = jax.random.normal(jax.random.PRNGKey(1), x_t.shape)
    v = parametrization.velocity_from_denoised(x_t, t, denoised)
    np.testing.assert_allclose(parametrization.denoised_from_velocity(x_t, t, v), denoised, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(v, (np.cos(np.asarray(t))[:, None, None, None] * np.asarray(x_t) - denoised)
                               / np.sin(np.asarray(t))[:, None, None, None], rtol=1e-4, atol=1e-4)
    model = create_model(tiny_config().model)
    with pytest.raises(ValueError, match="no exact TrigFlow form"):
        parametrization.trigflow_of(parametrization.ConsistencyFunction(model, 0.002, SD))


def test_trigflow_function_is_exact_at_t_0_and_takes_edm_coordinates():
    method = make_method(scm_config())
    fn = method.fn
    params = randomize(jit_init(fn, 0, (8, 8, 1)))
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 1))
    t = jnp.array([0.0, 1.0])
    sigma = parametrization.edm_sigma(t, SD)
    trig, edm_coordinates = jax.jit(lambda p: (fn.consistency(p, parametrization.trigflow_x(x, t), t),
                                               fn(p, x, sigma)))(params)
    np.testing.assert_array_equal(trig[0], x[0])  # f(x, 0) = x exactly
    assert float(jnp.abs(trig[1] - x[1]).max()) > 1e-2
    np.testing.assert_allclose(edm_coordinates, trig, rtol=1e-5, atol=1e-6)  # fn(x_sigma, sigma) = f(cos(t) x, t)


def test_adaptive_double_norm_reads_only_the_direction_of_scale_and_shift():
    """pnorm makes the block invariant to the size of the embedding projection, unlike plain AdaGN."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 8))
    emb = jax.random.normal(jax.random.PRNGKey(1), (2, 16))

    def outputs(**kw):
        block = ResBlock(8, scale_shift=True, **kw)
        params = randomize(block.init(jax.random.PRNGKey(2), x, emb)["params"])
        scaled = {**params, "emb_proj": jax.tree.map(lambda p: 5.0 * p, params["emb_proj"])}
        return block.apply({"params": params}, x, emb), block.apply({"params": scaled}, x, emb)

    out, out_scaled = outputs(adaptive_double_norm=True)
    np.testing.assert_allclose(out, out_scaled, rtol=1e-4, atol=1e-5)
    out, out_scaled = outputs()
    assert float(jnp.abs(out - out_scaled).max()) > 1e-2


# ----------------------------------------------------------------------------
# The tangent: one JVP, against finite differences and the discrete-time loss.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("time_conditioning", ["trigflow", pytest.param("edm", marks=pytest.mark.slow)])
def test_jvp_tangent_equals_a_central_finite_difference_of_f(time_conditioning):
    """cos(t) df/dt from the rearranged JVP equals d/dh f(x_t + h dx/dt, t + h) (float64, relative 1e-4)."""
    with float64():
        config = scm_config(dtype="float64")
        config.method.time_conditioning = time_conditioning
        method = make_method(config)
        fn = method.fn
        params = jax.tree.map(lambda p: p.astype(jnp.float64),
                              randomize(jit_init(fn, 0, (8, 8, 1))))
        keys = jax.random.split(jax.random.PRNGKey(4), 3)
        t = jnp.array([0.15, 0.7, 1.2], jnp.float64)
        x0 = jax.random.normal(keys[0], (3, 8, 8, 1), jnp.float64) * SD
        z = jax.random.normal(keys[1], (3, 8, 8, 1), jnp.float64) * SD
        x_t = jnp.cos(t)[:, None, None, None] * x0 + jnp.sin(t)[:, None, None, None] * z
        v = jnp.cos(t)[:, None, None, None] * z - jnp.sin(t)[:, None, None, None] * x0  # dx_t/dt (sCT)

        h = 1e-5

        @jax.jit
        def tangent_and_finite_difference(params):
            f_minus = fn.raw(params, x_t / SD, t, train=True)
            jvp_out = method.tangent_jvp(params, x_t, t, v, None, None)
            g = scm.rearranged_tangent(f_minus, jvp_out, x_t, v, t, SD, r=1.0)
            plus_minus = fn.consistency(params, jnp.concatenate([x_t + h * v, x_t - h * v]),
                                        jnp.concatenate([t + h, t - h]), train=True)
            return g, (plus_minus[:3] - plus_minus[3:]) / (2 * h)

        g, finite_difference = tangent_and_finite_difference(params)
        assert g.dtype == jnp.float64
        for i in range(3):
            assert relative_error(g[i] / jnp.cos(t[i]), finite_difference[i]) < 1e-4


def test_sct_gradient_is_the_limit_of_the_discrete_time_ct_gradient_over_the_step():
    """grad L_sCT = lim_{dt->0} grad L_CT(dt) / dt, where L_CT = lambda(t) ||f(x_t, t) - sg f(x_{t-dt}, t-dt)||^2 / D
    with the paper's prior weighting lambda(t) = 1 / (sd tan t) (appendix D), the same x0, z, t, no tangent
    normalisation, no adaptive weighting, and r = 1."""
    with float64():
        config = scm_config(dtype="float64")
        config.method.tangent_normalization = "none"
        config.method.adaptive_weighting = False
        method = make_method(config)
        fn = method.fn
        params = jax.tree.map(lambda p: p.astype(jnp.float64),
                              randomize(jit_init(fn, 0, (8, 8, 1)), scale=0.05))
        keys = jax.random.split(jax.random.PRNGKey(5), 2)
        t = jnp.array([0.3, 0.8, 1.3], jnp.float64)
        x0 = jax.random.normal(keys[0], (3, 8, 8, 1), jnp.float64) * SD
        z = jax.random.normal(keys[1], (3, 8, 8, 1), jnp.float64) * SD
        flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa: E731

        sct = flat(jax.jit(jax.grad(lambda p: method.objective(p, {}, x0, z, t, None, None, 1.0)[0]))(params))

        def discrete_loss(p, dt):
            def f_at(p, s):
                c, sn = jnp.cos(s)[:, None, None, None], jnp.sin(s)[:, None, None, None]
                return fn.consistency(p, c * x0 + sn * z, s, train=True)
            diff = f_at(p, t) - jax.lax.stop_gradient(f_at(p, t - dt))
            weight = 1 / (SD * jnp.tan(t))
            return jnp.mean(weight * jnp.mean(jnp.square(diff).reshape(3, -1), axis=-1))

        discrete_grad = jax.jit(jax.grad(discrete_loss))
        errors = [relative_error(flat(discrete_grad(params, dt)) / dt, sct) for dt in (1e-2, 1e-3, 1e-4)]
        assert errors[0] > errors[1] > errors[2], errors
        assert errors[1] < 0.3 * errors[0] and errors[2] < 2e-3, errors


# ----------------------------------------------------------------------------
# Training: a few real steps, the weighting network, checkpoints, bf16.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """20 real sCT steps on digits (warm-up 16, lr 3e-3), checkpointed at the end: a partly trained model."""
    config = scm_config(num_steps=20)
    config.method.tangent_warmup_steps = 16
    config.optimizer.learning_rate = 3e-3
    config.optimizer.grad_clip_norm = 1.0
    config.training.checkpoint_every = 20
    config.training.log_every = 10
    workdir = str(tmp_path_factory.mktemp("sct"))
    state = train.train_and_evaluate(config, workdir)
    return config, workdir, jax.device_get(state)


def test_weighting_network_is_trained_and_checkpointed(trained):
    config, workdir, state = trained
    weighting = state.method_state["weighting"]
    # It starts at w = 0 (zero weights) and the joint step moved it.
    assert float(np.abs(weighting["linear"]["kernel"]).max()) > 1e-4
    counts = [int(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state.method_state["weighting_opt_state"])
              if "count" in jax.tree_util.keystr(path)]
    assert counts and all(c == 20 for c in counts)
    exp = experiment.create_experiment(config, jax.devices()[:1])
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        step, restored, _ = checkpointer.restore(exp.abstract_state())
    finally:
        checkpointer.close()
    assert step == 20
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.method_state), state.method_state)
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    # The logged warm-up is the window mean of r = min(1, step / H).
    warmup = [np.mean([min(1.0, k / 16) for k in range(start, start + 10)]) for start in (0, 10)]
    assert [line["tangent_warmup"] for line in lines] == pytest.approx(warmup)
    assert all(np.isfinite(line["loss"]) and line["grad_norm"] > 0 for line in lines)


def test_update_is_one_optimizer_step_over_network_and_weighting():
    """grad_norm covers theta and phi, and the update equals one optimizer over both, joint clipping included.

    The update's logic does not depend on the network, so the loss here is a small function of both."""
    config = scm_config()
    config.optimizer.grad_clip_norm = 0.5
    exp = experiment.create_experiment(config, jax.devices()[:1])
    method = copy.copy(exp.method)
    params = {"a": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([[0.5]])}
    weighting = {"linear": {"kernel": jnp.full((4, 1), 0.3), "bias": jnp.array([0.2])}}

    def loss(params, method_state, batch, rng, step):
        w = method_state["weighting"]["linear"]
        value = jnp.sum(params["a"] ** 2) * jnp.exp(w["bias"][0]) + jnp.sum(w["kernel"]) * params["b"][0, 0]
        return value, {}

    method.loss = loss
    optimizer = exp.optimizer
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                       ema_params=(), method_state={"weighting": weighting,
                                                    "weighting_opt_state": optimizer.init(weighting)},
                       rng=jax.random.PRNGKey(0))
    new_state, metrics = method.update(state, {}, jax.random.PRNGKey(1), optimizer)

    pair = (params, weighting)
    grads = jax.grad(lambda pair: loss(pair[0], {"weighting": pair[1]}, None, None, 0)[0])(pair)
    norm = float(optax.global_norm(grads))
    assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-6) and norm > 2 * 0.5  # clipping acts
    updates, _ = optimizer.update(grads, optimizer.init(pair), pair)
    expected = optax.apply_updates(pair, updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 (new_state.params, new_state.method_state["weighting"]), expected)
    assert not np.allclose(new_state.method_state["weighting"]["linear"]["bias"], weighting["linear"]["bias"])


def test_bf16_activations_with_fp32_tangents_stay_finite_on_a_partly_trained_model(trained):
    config, _, state = trained
    params = jax.tree.map(jnp.asarray, state.params)
    reference = make_method(config)
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.dtype = "bfloat16"
    config.method.jvp_dtype = "float32"
    mixed = make_method(config)
    x0 = jnp.asarray(next(pipeline.create_train_iterator(config.data, global_batch_size=8, seed=4))["image"][:8])
    z = SD * jax.random.normal(jax.random.PRNGKey(6), x0.shape)
    # Both ends of [0, pi/2], where the paper saw fp16 tangents overflow, and the middle.
    t = jnp.array([1e-4, 1e-2, 0.3, 0.8, 1.2, 1.5, 1.5695, math.pi / 2 - 1e-4])
    x_t = jnp.cos(t)[:, None, None, None] * x0 + jnp.sin(t)[:, None, None, None] * z
    v = jnp.cos(t)[:, None, None, None] * z - jnp.sin(t)[:, None, None, None] * x0

    def loss_grads_and_tangent(method, params):
        (loss, _), grads = jax.value_and_grad(method.objective, has_aux=True)(
            params, state.method_state, x0, z, t, None, None, 1.0)
        return loss, grads, method.tangent_jvp(params, x_t, t, v, None, None)

    run = jax.jit(loss_grads_and_tangent, static_argnums=0)
    (loss, grads, tangent), (loss32, grads32, tangent32) = run(mixed, params), run(reference, params)
    assert tangent.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(tangent)))
    assert np.isfinite(float(loss)) and all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert relative_error(tangent, tangent32) < 1e-5  # the JVP pass runs in float32 with the bf16 model
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa: E731
    assert 0 < relative_error(flat(grads), flat(grads32)) < 0.1  # bf16 activations in F_theta only
    assert float(loss) == pytest.approx(float(loss32), rel=0.1, abs=0.05)


# ----------------------------------------------------------------------------
# sCD's teacher, the sampler, configs.
# ----------------------------------------------------------------------------


def test_scd_uses_the_teachers_pf_ode_and_starts_from_its_params():
    teacher_model = create_model(scm_config().model)
    edm = parametrization.ConsistencyFunction(teacher_model, 0.002, SD, "edm", boundary=False)
    teacher_params = randomize(jit_init(edm, 0, (8, 8, 1)))
    config = scm_config("scm_cd")
    config.method.teacher_workdir = "/unused"  # the teacher's params come from the test
    with pytest.raises(ValueError, match="time_conditioning='edm'"):
        make_method(config, teacher_fn=edm)
    config.method.time_conditioning = "edm"
    method = make_method(config, teacher_fn=edm)
    params = method.init_params(jit_init(method.fn, 1, (8, 8, 1)), teacher_params)
    state = method.init_state(params, teacher_params)
    assert state["teacher"] is teacher_params
    t = jnp.array([0.2, 1.0])
    x0 = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 1)) * SD
    z = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 1)) * SD
    x_t = jnp.cos(t)[:, None, None, None] * x0 + jnp.sin(t)[:, None, None, None] * z
    velocity, denoised = jax.jit(lambda state: (
        method.ode_velocity(state, x0, z, x_t, t, None),
        edm(state["teacher"], parametrization.edm_x(x_t, t), parametrization.edm_sigma(t, SD))))(state)
    # The teacher's PF-ODE in TrigFlow is its EDM denoiser's: (cos(t) x_t - D(x_t / cos t, sd tan t)) / sin(t).
    np.testing.assert_allclose(velocity, parametrization.velocity_from_denoised(x_t, t, denoised),
                               rtol=2e-3, atol=2e-4)
    # The student starts as that denoiser: the teacher's params, read by the same TrigFlow function.
    assert params is teacher_params and method.fn == method.teacher_trigflow


class _Zero(nn.Module):
    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, *, train):
        return 0.0 * x + 0.0 * self.param("unused", nn.initializers.zeros, ())


def test_sampler_starts_at_t_max_and_renoises_in_trigflow_coordinates():
    config = scm_config()
    config.sampling.mid_sigma = SD * math.tan(1.1)
    method = make_method(config)
    sampler = method.sampler(2)
    assert sampler.sigmas == pytest.approx((80.0, 0.98238), rel=1e-4) and sampler.network_evaluations == 2
    assert sampler.key[1] == pytest.approx((math.atan(160.0), 1.1))
    fn = parametrization.TrigFlowFunction(_Zero(), SD)  # F = 0, so f(x_t, t) = cos(t) x_t
    rng = jax.random.PRNGKey(0)
    out = scm.trigflow_consistency_sample(fn, {"unused": 0.0}, rng, (2, 8, 8, 1), (math.atan(160.0), 1.1))
    k0, k1 = jax.random.split(rng, 2)
    x0 = math.cos(math.atan(160.0)) * SD * jax.random.normal(k0, (2, 8, 8, 1))
    expected = math.cos(1.1) * (math.cos(1.1) * x0 + math.sin(1.1) * SD * jax.random.normal(k1, (2, 8, 8, 1)))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="decreasing positive sigmas"):
        config.sampling.mid_sigma = 100.0
        methods.get_method("scm_ct").check_sampler(config, 2)


@pytest.mark.parametrize("name,method,published", [
    ("quickstart_scm", "scm_ct", None),
    ("cifar10_trigflow", "trigflow", "2.15"),
    ("cifar10_scm_ct", "scm_ct", "2.85"),
    ("cifar10_scm_cd", "scm_cd", "3.66"),
    ("imagenet64_scm_ct", "scm_ct", "2.04"),
    ("imagenet64_scm_cd", "scm_cd", "2.44"),
])
def test_configs_validate(name, method, published, monkeypatch):
    module = runpy.run_path(os.path.join(CONFIGS, f"{name}.py"))
    config = module["get_config"]()
    if config.data.name != "digits":  # everything but the (absent) prepared dataset and Inception weights
        from consistency_jax.evaluation import inception_weights
        monkeypatch.setattr(pipeline, "check_dataset", lambda data_config: None)
        monkeypatch.setattr(inception_weights, "find_weights", lambda directory: None)
    experiment.validate_config(config)
    assert config.method.name == method
    assert config.method.time_conditioning == "trigflow" and config.model.embedding_type == "positional"
    assert config.model.adaptive_double_norm
    if published:
        assert published in module["__doc__"] and f"--config=configs/{name}.py" in module["__doc__"]
    if method.startswith("scm"):
        assert config.method.tangent_norm_c == 0.1 and config.method.tangent_normalization == "l2"
        assert config.sampling.mid_sigma == pytest.approx(SD * math.tan(1.1))
        if published:
            assert config.method.tangent_warmup_steps == 10_000 and config.method.p_mean == -1.0


def test_trigflow_ddpmpp_has_the_documented_size():
    config = runpy.run_path(os.path.join(CONFIGS, "cifar10_trigflow.py"))["get_config"]()
    model = create_model(config.model)
    shapes = jax.eval_shape(lambda rng: model.init({"params": rng, "dropout": rng}, jnp.zeros((1, 32, 32, 3)),
                                                   jnp.zeros((1,)), train=False), jax.random.PRNGKey(0))
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) == 60_066_563


def test_trigflow_diffusion_loss_is_edms_loss_in_trigflow_coordinates():
    """methods/trigflow.py's ||F - v/sd||^2 equals EDM's weighted ||D - x0||^2 for the same draws."""
    config = scm_config("trigflow")
    method = make_method(config)
    params = randomize(jit_init(method.fn, 0, (8, 8, 1)))
    batch = {"image": jax.random.uniform(jax.random.PRNGKey(1), (4, 8, 8, 1), minval=-1, maxval=1)}
    from consistency_jax.methods import edm
    trig_loss, edm_loss = jax.jit(lambda p, rng: (method.loss(p, {}, batch, rng, 0)[0],
                                                  edm.EDM.loss(method, p, {}, batch, rng, 0)[0]))(
        params, jax.random.PRNGKey(2))
    assert float(trig_loss) == pytest.approx(float(edm_loss), rel=1e-3)
    assert float(trig_loss) > 0


def test_config_errors_name_the_field():
    config = scm_config()
    config.method.tangent_normalization = "L2"
    with pytest.raises(experiment.ConfigError, match="config.method.tangent_normalization='L2'"):
        experiment.validate_config(config)
    config = scm_config()
    config.method.jvp_dtype = "float16"
    with pytest.raises(experiment.ConfigError, match="config.method.jvp_dtype"):
        experiment.validate_config(config)


@pytest.mark.slow
def test_scd_distils_an_edm_run_end_to_end(tmp_path):
    """An EDM diffusion run as teacher_workdir: loaded once into the sCD state, the student starts from it."""
    teacher_config = scm_config("edm", num_steps=2)
    teacher_config.training.checkpoint_every = 2
    teacher_state = train.train_and_evaluate(teacher_config, str(tmp_path / "edm"))
    config = scm_config("scm_cd", num_steps=2)
    config.method.teacher_workdir = str(tmp_path / "edm")
    config.method.teacher_ema_rate = 0.0  # the raw params, to compare exactly
    config.method.time_conditioning = "edm"
    exp = experiment.create_experiment(config, jax.devices()[:1], workdir=str(tmp_path / "scd"))
    start = jax.device_get(exp.create_state())
    jax.tree.map(np.testing.assert_array_equal, start.params, jax.device_get(teacher_state.params))
    jax.tree.map(np.testing.assert_array_equal, start.method_state["teacher"], start.params)
    state = train.train_and_evaluate(config, str(tmp_path / "scd"))
    assert int(state.step) == 2 and (tmp_path / "scd" / "teacher_config.json").exists()
    # The teacher stays frozen while the student moves.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.method_state["teacher"]), start.params)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), jax.device_get(state.params),
                                         start.params))
    assert max(moved) > 0


def test_adm_takes_the_scm_options_dropout_only_at_low_resolution():
    """ADM with adaptive double normalisation and dropout only in blocks at <= dropout_max_resolution (traced only)."""
    from consistency_jax.models.adm import ADM

    rates = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dropout):
            rates[context.module.parent.name] = context.module.rate
        return next_fun(*args, **kwargs)

    x = jnp.zeros((2, 8, 8, 1))
    for updown in (True, False):
        rates.clear()
        model = ADM(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_head_channels=8,
                    dropout=0.3, dropout_max_resolution=4, adaptive_double_norm=True, resblock_updown=updown)
        with nn.intercept_methods(record):
            jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
                                              x, jnp.zeros((2,)), None, train=True))
        # Named by the input resolution: enc8_down outputs 4x4 (dropout), dec4_up 8x8 (none).
        expected = {"enc8_block0": 0.0, "enc4_block0": 0.3, "mid4_block0": 0.3, "mid4_block1": 0.3,
                    "dec4_block0": 0.3, "dec4_block1": 0.3, "dec8_block0": 0.0, "dec8_block1": 0.0}
        if updown:
            expected.update(enc8_down=0.3, dec4_up=0.0)
        assert rates == expected


def test_proposal_makes_sd_tan_t_lognormal_with_p_mean_and_p_std():
    t = np.asarray(scm.sample_times(jax.random.PRNGKey(0), 100_000, -0.8, 1.6, SD), np.float64)
    assert t.min() > 0 and t.max() < math.pi / 2
    tau = np.log(SD * np.tan(t))
    assert tau.mean() == pytest.approx(-0.8, abs=0.02) and tau.std() == pytest.approx(1.6, abs=0.02)
