"""ECT and SCT (methods/ect.py, methods/sct.py): schedules, targets, the SCT estimator, guidance, sampling,
and their configs."""

import importlib.util
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from consistency_jax import experiment, methods, parallel, samplers, schedules
from consistency_jax.methods import ect, sct
from consistency_jax.models import create_model
from tests.helpers import jit_init, tiny_config

IMAGE_SHAPE = (8, 8, 1)


def method_for(name="ect", **fields):
    config = tiny_config()
    config.method = methods.method_config(name)
    config.method.update(fields)
    cls = methods.get_method(name)
    fn = cls.make_function(config, create_model(config.model))
    return cls(config, fn, IMAGE_SHAPE, 0)


@pytest.fixture(scope="module")
def tiny():
    """A tiny ECT method (dropout 0.5), its jitted consistency pair, random params and a batch.

    ln t ~ N(-6, 0.1^2), so t ~ 0.0025 where n(t) ~ 5 > q = 2: r = 0 in stage 0, and r = t (1 - 5 / 2^41)
    ~ t in stage 40 (step 10^6). The params are random (not the init): NCSN++ zero-initialises the conv after
    each dropout, which would hide the mask.
    """
    config = method_for(p_mean=-6.0, p_std=0.1).config
    config.model.dropout = 0.5
    method = ect.ECT(config, ect.ECT.make_function(config, create_model(config.model)), IMAGE_SHAPE, 0)
    shapes = jax.eval_shape(lambda rng: method.fn.init(rng, IMAGE_SHAPE, False), jax.random.PRNGKey(0))
    # NumPy draws: a jax.random call per leaf shape would compile a kernel per shape.
    rng = np.random.RandomState(5)
    params = jax.tree.map(lambda p: jnp.asarray(0.2 * rng.randn(*p.shape), jnp.float32), shapes)
    x = jax.random.uniform(jax.random.PRNGKey(1), (8, *IMAGE_SHAPE), minval=-1, maxval=1)
    return method, jax.jit(method.consistency_pair), params, {"image": x}


# ----------------------------------------------------------------------------- schedules


def test_stage_and_r_against_hand_values():
    assert [int(schedules.ect_stage(k, 25_000)) for k in (0, 24_999, 25_000, 60_000, 399_999)] == [0, 0, 1, 2, 15]

    def by_hand(t, stage, q):  # SPEC section 4, in plain floats
        n = 1 + 8 / (1 + math.exp(t))
        return max(t * (1 - n / q ** (stage + 1)), 0.0)

    cases = [(1.0, 0, 2.0), (10.0, 2, 2.0), (2.0, 1, 4.0), (0.5, 5, 2.0), (80.0, 0, 4.0), (0.01, 3, 2.0)]
    got = [float(schedules.ect_r(jnp.float32(t), s, q)) for t, s, q in cases]
    np.testing.assert_allclose(got, [by_hand(*c) for c in cases], rtol=1e-5, atol=1e-7)
    # Worked values: at t = 1 in stage 0 the gap is the whole of t (r = 0); t = 10, stage 2 (q = 2):
    # n = 1 + 8 sigmoid(-10) = 1.000363, r = 10 (1 - 1.000363 / 8) = 8.74955.
    assert got[0] == 0.0 and abs(got[1] - 8.74955) < 1e-4
    # Stages far past float32's range of q^-(stage + 1) give the limit r = t, not NaN.
    assert float(schedules.ect_r(jnp.float32(3.0), 40, 256.0)) == pytest.approx(3.0)


# ----------------------------------------------------------------------------- targets


def test_r_zero_gives_target_x(tiny):
    method, pair_fn, params, batch = tiny
    pair = pair_fn(params, batch, jax.random.PRNGKey(2), jnp.int32(0))
    assert np.all(np.asarray(pair["r"]) == 0)
    np.testing.assert_array_equal(pair["target"], batch["image"])
    loss, metrics = method.loss_of_pair(pair)
    assert float(metrics["r_zero_fraction"]) == 1.0
    # CIFAR loss at r = 0: mean ||f(x_t, t) - x|| / t.
    norms = np.sqrt(np.sum(np.square(np.asarray(pair["student"] - batch["image"])).reshape(8, -1), axis=1))
    assert float(loss) == pytest.approx(float(np.mean(norms / np.asarray(pair["t"]))), rel=1e-5)


def test_teacher_shares_z_and_dropout_with_the_student(tiny):
    method, pair_fn, params, batch = tiny
    rng = jax.random.PRNGKey(3)
    pair = pair_fn(params, batch, rng, jnp.int32(1_000_000))
    t, r = np.asarray(pair["t"]), np.asarray(pair["r"])
    assert int(pair["stage"]) == 40 and np.all((r > 0) & (np.abs(r - t) < 1e-6 * t))
    # r ~ t: the teacher f(x + r z, r) reproduces the student f(x + t z, t) only with the same z and the
    # same dropout mask.
    gap = float(jnp.max(jnp.abs(pair["student"] - pair["target"])))
    # Negative control: the same network at the same input with another dropout mask differs by far more.
    _, noise_rng, _, _ = jax.random.split(rng, 4)
    x_t = batch["image"] + pair["t"][:, None, None, None] * jax.random.normal(noise_rng, batch["image"].shape)
    other_mask = jax.jit(lambda p, x, t: method.fn(p, x, t, train=True, dropout_rng=jax.random.PRNGKey(99)))(
        params, x_t, pair["t"])
    assert float(jnp.max(jnp.abs(other_mask - pair["student"]))) > 100 * gap
    assert gap < 1e-3


def test_loss_weights_and_distance():
    t, r = jnp.array([1.0, 2.0]), jnp.array([0.5, 0.0])
    np.testing.assert_allclose(ect.loss_weight("inverse_gap", t, r, 0.5), [2.0, 0.5])
    np.testing.assert_allclose(ect.loss_weight("edm", t, r, 0.5), [1 + 4, 0.25 + 4])
    squared = jnp.array([0.0, 4.0])
    np.testing.assert_allclose(ect.safe_pseudo_huber(squared, 0.0), [0.0, 2.0])
    np.testing.assert_allclose(ect.safe_pseudo_huber(squared, 0.06), [0.0, math.sqrt(4 + 0.0036) - 0.06], rtol=1e-6)
    grad = jax.grad(lambda d: jnp.sum(ect.safe_pseudo_huber(d, 0.0)))(squared)
    assert np.all(np.isfinite(grad)) and float(grad[1]) == pytest.approx(0.25)


# ----------------------------------------------------------------------------- SCT estimator


def numpy_posterior_mean(x0, z, t, labels=None, unconditional=None):
    """SPEC section 4 written out directly in float64: softmax over the reference batch of -||x_t - x0_j||^2/2t^2."""
    x0 = np.asarray(x0, np.float64).reshape(len(x0), -1)
    x_t = x0 + np.asarray(t, np.float64)[:, None] * np.asarray(z, np.float64).reshape(len(x0), -1)
    out = np.empty_like(x0)
    for i in range(len(x0)):
        logits = -np.sum((x_t[i] - x0) ** 2, axis=1) / (2 * t[i] ** 2)
        if labels is not None and not (unconditional is not None and unconditional[i]):
            logits = np.where(labels == labels[i], logits, -np.inf)
        w = np.exp(logits - logits.max())
        out[i] = (w / w.sum()) @ x0
    return out


def test_sct_estimator_matches_numpy_and_restricts_to_the_class():
    rng = np.random.RandomState(0)
    x0 = rng.uniform(-1, 1, (12, 4, 4, 1)).astype(np.float32)
    z = rng.randn(12, 4, 4, 1).astype(np.float32)
    t = np.array([0.002, 0.05, 0.3, 0.8, 1.5, 3.0, 10.0, 80.0, 0.5, 2.0, 0.1, 5.0], np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2], np.int32)
    got = np.asarray(sct.posterior_mean(jnp.asarray(x0), jnp.asarray(z), jnp.asarray(t))).reshape(12, -1)
    np.testing.assert_allclose(got, numpy_posterior_mean(x0, z, t), atol=2e-5)
    # Tiny t: the softmax is one-hot on the sample's own x0; t = 80: nearly the batch mean.
    np.testing.assert_allclose(got[0], x0[0].ravel(), atol=1e-6)
    assert np.abs(got[7] - x0.reshape(12, -1).mean(0)).max() < 0.05
    cond = np.asarray(sct.posterior_mean(jnp.asarray(x0), jnp.asarray(z), jnp.asarray(t), jnp.asarray(labels)))
    np.testing.assert_allclose(cond.reshape(12, -1), numpy_posterior_mean(x0, z, t, labels), atol=2e-5)
    # Class restriction: at t = 80 row 7 (class 1) is the mean of class 1 only, not of the batch.
    np.testing.assert_allclose(cond.reshape(12, -1)[7], x0[labels == 1].reshape(4, -1).mean(0), atol=0.02)
    dropped = np.zeros(12, bool)
    dropped[7] = True  # a dropped label (guidance training) averages over every class again
    mixed = sct.posterior_mean(jnp.asarray(x0), jnp.asarray(z), jnp.asarray(t), jnp.asarray(labels),
                               jnp.asarray(dropped))
    np.testing.assert_allclose(np.asarray(mixed).reshape(12, -1), numpy_posterior_mean(x0, z, t, labels, dropped),
                               atol=2e-5)


def test_sct_target_has_lower_variance_than_ect_on_the_same_batch():
    """Data: two points +-a. For x_t the ODE point at r is x_t - (t - r)(x_t - E[x|x_t])/t (exact posterior);
    ECT's x + r z scatters around it (its variance), SCT's estimate sits much closer, on the same batch."""
    rng = np.random.RandomState(1)
    a = np.full((4, 4, 1), 0.5, np.float32)
    signs = rng.choice([-1.0, 1.0], 256).astype(np.float32)
    x0 = signs[:, None, None, None] * a
    z = rng.randn(*x0.shape).astype(np.float32)
    t, r = np.full(256, 2.0, np.float32), np.full(256, 1.0, np.float32)
    x_t = x0 + t[:, None, None, None] * z
    # Exact posterior mean of the two-point mixture: a tanh(<x_t, a> / t^2).
    post = np.tanh(np.sum(x_t * a, axis=(1, 2, 3)) / t**2)[:, None, None, None] * a
    ideal = x_t - ((t - r) / t)[:, None, None, None] * (x_t - post)
    ect_target = x0 + r[:, None, None, None] * z
    sct_target = np.asarray(sct.variance_reduced_target_input(jnp.asarray(x0), jnp.asarray(z), jnp.asarray(t),
                                                              jnp.asarray(r)))
    ect_var = np.mean(np.sum((ect_target - ideal) ** 2, axis=(1, 2, 3)))
    sct_var = np.mean(np.sum((sct_target - ideal) ** 2, axis=(1, 2, 3)))
    assert sct_var < 0.1 * ect_var, (sct_var, ect_var)
    # And with r -> 0 handled like ECT: a tiny t makes SCT's target ECT's x + r z.
    small_t = np.full(256, 1e-3, np.float32)
    same = sct.variance_reduced_target_input(jnp.asarray(x0), jnp.asarray(z), jnp.asarray(small_t),
                                             jnp.asarray(small_t / 2))
    np.testing.assert_allclose(same, x0 + (small_t / 2)[:, None, None, None] * z, atol=1e-6)


def test_sct_reference_batch_is_gathered_over_the_mesh():
    """On a batch sharded over 8 devices the estimator is global: XLA all-gathers the reference images."""
    mesh = parallel.create_mesh(tiny_config().mesh, jax.devices()[:8])
    rng = np.random.RandomState(2)
    x0, z = rng.uniform(-1, 1, (16, 4, 4, 1)).astype(np.float32), rng.randn(16, 4, 4, 1).astype(np.float32)
    t = np.exp(rng.randn(16)).astype(np.float32)
    sharding = parallel.batch_sharding(mesh)
    args = [jax.device_put(v, NamedSharding(mesh, P(("data", "fsdp")))) for v in (x0, z, t)]
    fn = jax.jit(sct.posterior_mean, in_shardings=(sharding,) * 3, out_shardings=sharding)
    assert "all-gather" in fn.lower(*args).compile().as_text()
    np.testing.assert_allclose(fn(*args), sct.posterior_mean(jnp.asarray(x0), jnp.asarray(z), jnp.asarray(t)),
                               atol=1e-5)


# ----------------------------------------------------------------------------- sampling


class _LabelNet:
    """A stand-in network function: f(x, sigma, y) = x / (1 + sigma) + y (labels as a per-image offset)."""

    sigma_min, sigma_data = 0.002, 0.5

    def __call__(self, params, x, sigma, labels=None, *, train=False, dropout_rng=None):
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])[:, None, None, None]
        offset = 0.0 if labels is None else labels.astype(jnp.float32)[:, None, None, None]
        return x / (1 + sigma) + offset


def test_guidance_formula():
    net, x = _LabelNet(), jnp.ones((2, 2, 2, 1))
    labels, sigma = jnp.array([1, 2]), jnp.float32(1.0)
    guided = samplers.GuidedFunction(net, 3.0, null_label=10)
    cond, uncond = net(None, x, sigma, labels), net(None, x, sigma, jnp.array([10, 10]))
    np.testing.assert_allclose(guided(None, x, sigma, labels), uncond + 3.0 * (cond - uncond), rtol=1e-6)
    # By hand: cond = 0.5 + y, uncond = 0.5 + 10 -> 10.5 + 3 (y - 10).
    np.testing.assert_allclose(guided(None, x, sigma, labels)[:, 0, 0, 0], [10.5 - 27, 10.5 - 24])
    np.testing.assert_allclose(samplers.GuidedFunction(net, 1.0, 10)(None, x, sigma, labels), cond)
    np.testing.assert_allclose(samplers.guide(cond, uncond, 0.0), uncond)


def test_guided_sampler_counts_two_evaluations_per_step():
    config = tiny_config()
    config.data.num_classes = config.model.num_classes = 10
    config.method = methods.method_config("sct")
    config.method.guidance_scale = 2.0
    config.method.label_dropout = 0.1
    methods.check_method_config(config)
    model = create_model(config.model)
    method = sct.SCT(config, sct.SCT.make_function(config, model), IMAGE_SHAPE, 10)
    spec = method.sampler(2)
    assert spec.network_evaluations == 4 and spec.sigmas == (80.0, 0.821) and 2.0 in spec.key
    config.method.guidance_scale = 1.0
    assert sct.SCT(config, method.fn, IMAGE_SHAPE, 10).sampler(2).network_evaluations == 2
    config.data.num_classes = config.model.num_classes = 0
    config.method.guidance_scale = 2.0
    with pytest.raises(ValueError, match="class-conditional"):
        methods.check_method_config(config)


def test_edge_skipping_sampler():
    net, rng, shape = _LabelNet(), jax.random.PRNGKey(4), (3, 2, 2, 1)
    sigmas = jnp.array([80.0, 2.0, 0.5])
    np.testing.assert_array_equal(samplers.edge_skipping_sample(net, None, rng, shape, sigmas, eta=1.0),
                                  samplers.consistency_sample(net, None, rng, shape, sigmas))
    # eta = 0: deterministic. By hand: x_in0 = 80 z, x_hat0 = x_in0 / 81; eps = (x_in0 - x_hat0) / 80;
    # x_in1 = x_hat0 + 2 eps, x_hat1 = x_in1 / 3; x_in2 = x_hat1 + 0.5 (x_in1 - x_hat1) / 2; out = x_in2 / 1.5.
    z = jax.random.normal(jax.random.split(rng)[0], shape)
    x_in = 80 * z
    x_hat = x_in / 81
    for sigma, prev in ((2.0, 80.0), (0.5, 2.0)):
        x_in = x_hat + sigma * (x_in - x_hat) / prev
        x_hat = x_in / (1 + sigma)
    np.testing.assert_allclose(samplers.edge_skipping_sample(net, None, rng, shape, sigmas, eta=0.0), x_hat,
                               rtol=1e-5)
    mid = samplers.edge_skipping_sample(net, None, rng, shape, sigmas, eta=0.5)
    assert np.all(np.isfinite(mid)) and not np.allclose(mid, x_hat)


# ----------------------------------------------------------------------------- parametrization and config


class _TinyNet(nn.Module):
    """A one-layer stand-in for a network (the parametrization is what is tested)."""

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, *, train):
        return nn.Dense(x.shape[-1])(x) + noise_labels[:, None, None, None]


def test_boundary_modes():
    x, sigma = jnp.ones((1, *IMAGE_SHAPE)), jnp.float32(0.002)
    config = method_for().config

    def fn(boundary):
        config.method.boundary = boundary
        return ect.ECT.make_function(config, _TinyNet())

    sampling_fn = fn("sampling")
    params = jit_init(sampling_fn, 0, IMAGE_SHAPE)
    # Sampling: f(x, sigma_min) = x exactly; training: the EDM denoiser (c_skip = sd^2 / (s^2 + sd^2) != 1).
    np.testing.assert_array_equal(sampling_fn(params, x, sigma), x)
    edm = fn("none")
    np.testing.assert_array_equal(sampling_fn(params, x, sigma, train=True), edm(params, x, sigma, train=True))
    assert not np.allclose(edm(params, x, sigma), x, atol=1e-7)
    np.testing.assert_array_equal(fn("always")(params, x, sigma, train=True), x)


@pytest.mark.parametrize("field,value", [("q", 1.0), ("stage_steps", 0), ("weighting", "l2"),
                                         ("boundary", "sometimes"), ("sampler_eta", 1.5), ("huber_c", -1.0)])
def test_bad_fields_are_rejected(field, value):
    config = tiny_config()
    config.method = methods.method_config("ect")
    config.method[field] = value
    with pytest.raises(ValueError, match=f"config.method.{field}"):
        methods.check_method_config(config)


# ----------------------------------------------------------------------------- configs

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


def load_config(name: str, *args):
    """Loads a config file by path, as ml_collections' config_flags does (`file.py:arg` passes arg)."""
    spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIG_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def validate_without_data(config, monkeypatch):
    """experiment.validate_config, minus reading the dataset and finding the Inception weights (not on this machine)."""
    from consistency_jax.evaluation import inception_weights

    monkeypatch.setattr(experiment.pipeline, "check_dataset", lambda data_config: None)
    monkeypatch.setattr(inception_weights, "find_weights", lambda directory: None)
    experiment.validate_config(config)


@pytest.mark.parametrize("name", ["cifar10_ect", "cifar10_sct"])
def test_cifar10_configs(name, monkeypatch):
    config = load_config(name)
    validate_without_data(config, monkeypatch)
    m = config.method
    assert m.name == name.split("_")[1]
    assert (m.p_mean, m.p_std, m.q, m.stage_steps, m.k, m.b, m.huber_c) == (-1.1, 2.0, 2.0, 25_000, 8.0, 1.0, 0.0)
    assert m.weighting == "inverse_gap" and m.boundary == "sampling" and m.teacher_workdir is None
    assert (config.training.batch_size, config.training.num_steps) == (128, 100_000)
    assert config.optimizer.name == "radam" and config.optimizer.learning_rate == 1e-4
    assert tuple(config.training.ema_rates) == (0.9999,) and config.model.dropout == 0.2
    assert config.sampling.mid_sigma == 0.821 and config.model.embedding_type == "positional"
    doc = (CONFIG_DIR / f"{name}.py").read_text()
    assert f"--config=configs/{name}.py" in doc and "edm-cifar10-32x32-uncond-vp" in doc
    assert "python -m consistency_jax.convert" in doc
    if name == "cifar10_ect":
        assert all(v in doc for v in ("4.54", "2.20", "3.60", "2.11"))


@pytest.mark.parametrize("name,fid1,fid2", [("imagenet64_ect", 2.49, 1.67), ("imagenet64_sct", 2.42, 1.55)])
def test_imagenet64_configs(name, fid1, fid2, monkeypatch):
    config = load_config(name)
    validate_without_data(config, monkeypatch)
    m = config.method
    assert (m.p_mean, m.p_std, m.q, m.stage_steps, m.huber_c, m.weighting) == (-0.8, 1.6, 4.0, 25_000, 0.06, "edm")
    assert m.boundary == "none" and config.model.name == "edm2" and config.model.model_channels == 384  # XL
    opt = config.optimizer
    assert (opt.name, opt.learning_rate, opt.b1, opt.b2, opt.lr_schedule, opt.rsqrt_ref_steps) == (
        "adam", 7e-4, 0.9, 0.99, "rsqrt", 2000)
    assert tuple(config.training.ema_sigma_rels) == (0.01, 0.05, 0.1) and config.sampling.mid_sigma == 1.526
    assert config.data.num_classes == config.model.num_classes == 1000 and config.model.dropout_res == 16
    small = load_config(name, "S")
    assert (small.model.model_channels, small.optimizer.learning_rate, small.model.dropout) == (192, 1e-3, 0.4)
    doc = (CONFIG_DIR / f"{name}.py").read_text()
    assert f"--config=configs/{name}.py:XL" in doc and f"{fid1:.2f}" in doc and f"{fid2:.2f}" in doc
    with pytest.raises(ValueError, match="valid: S, M, L, XL"):
        load_config(name, "XXL")


@pytest.mark.parametrize("name", ["quickstart_ect", "quickstart_sct"])
def test_quickstart_configs_use_the_teachers_network(name):
    config = load_config(name)
    experiment.validate_config(config)
    teacher = load_config("quickstart_edm")
    assert config.model.to_dict() == teacher.model.to_dict() and config.data.to_dict() == teacher.data.to_dict()
    assert config.method.name == name.split("_")[1]
    assert f"--config=configs/{name}.py" in (CONFIG_DIR / f"{name}.py").read_text()
