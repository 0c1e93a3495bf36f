"""Original CT and CD (Song et al. 2023): curriculum, EMA target, CD's Heun target, state across meshes and resume."""

import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consistency_jax import checkpointing, experiment, methods, parallel, train
from consistency_jax.data import pipeline
from consistency_jax.methods import ct, edm
from consistency_jax.models import create_model
from tests.helpers import jit_init, tiny_config

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def ct_config(num_steps=4):
    config = tiny_config(num_steps)
    config.method = methods.method_config("ct")
    return config


def cd_config(teacher_workdir, num_steps=4, **fields):
    config = tiny_config(num_steps)
    config.method = methods.method_config("cd")
    config.method.teacher_workdir = str(teacher_workdir)
    config.method.update(fields)
    return config


def randomize(params, seed):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def karras(index, n):
    """SPEC section 1, in float64: sigma_i for 0-based index i of the n-point grid."""
    lo, hi = SIGMA_MIN ** (1 / RHO), SIGMA_MAX ** (1 / RHO)
    return (lo + np.asarray(index, np.float64) / (n - 1) * (hi - lo)) ** RHO


def cm_scales_and_mu(step, total, s0=2, s1=150, mu0=0.9):
    """cm/script_util.py create_ema_and_scales_fn ('adaptive', 'progressive'), rewritten in plain Python."""
    scales = math.ceil(math.sqrt(step / total * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1)
    scales = max(scales, 1)
    return scales + 1, math.exp(s0 * math.log(mu0) / scales)


@pytest.mark.parametrize("step", [0, 1, 37, 500, 999, 1000])
def test_ct_curriculum_and_target_rate_follow_the_cm_code(step):
    config = ct_config(num_steps=1000)
    method = experiment.create_experiment(config, jax.devices()[:1]).method
    n, mu = cm_scales_and_mu(step, 1000)
    assert int(method.num_scales(jnp.int32(step))) == n
    assert float(method.target_decay(jnp.int32(step))) == pytest.approx(mu, rel=1e-6)
    # The paper's formula divides by N(k) instead: mu(0) = mu0 exactly.
    config.method.mu_denominator = "scales"
    paper = experiment.create_experiment(config, jax.devices()[:1]).method
    assert float(paper.target_decay(jnp.int32(step))) == pytest.approx(math.exp(2 * math.log(0.9) / n), rel=1e-6)
    assert cm_scales_and_mu(0, 1000)[0] == 2 and cm_scales_and_mu(1000, 1000)[0] == 151


def jitted(fn, dropout_rng=None):
    """(params, inputs, sigmas) -> fn's output in float64 NumPy terms, training mode when given a dropout rng."""
    call = jax.jit(lambda p, inputs, s: fn(p, inputs, s, train=dropout_rng is not None, dropout_rng=dropout_rng))
    return lambda p, inputs, s: call(p, jnp.asarray(inputs, jnp.float32), jnp.asarray(s, jnp.float32))


def hand_loss(student, target, sigma_lo, sigma_hi, distance, weighting):
    diff = np.asarray(student, np.float64) - np.asarray(target, np.float64)
    squared = (diff**2).reshape(diff.shape[0], -1)
    c = 0.00054 * 8
    per_example = squared.mean(1) if distance == "l2" else np.sqrt(squared.sum(1) + c * c) - c
    weight = 1 / (sigma_hi - sigma_lo) if weighting == "inverse_gap" else 1.0
    return float(np.mean(weight * per_example))


def test_ct_loss_matches_an_independent_computation():
    config = ct_config(num_steps=100)
    config.model.dropout = 0.3
    exp = experiment.create_experiment(config, jax.devices()[:1])
    params = randomize(jax.jit(exp.init_params)(jax.random.PRNGKey(0)), 1)
    target = randomize(params, 2)  # an EMA target that differs from the student
    x = jax.random.uniform(jax.random.PRNGKey(3), (4, 8, 8, 1), minval=-1, maxval=1)
    rng, step = jax.random.PRNGKey(5), jnp.int32(30)
    loss, metrics = jax.jit(exp.method.loss)(params, {"target": target}, {"image": x}, rng, step)

    n = cm_scales_and_mu(30, 100)[0]
    assert int(metrics["num_scales"]) == n == 83
    interval_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
    index = np.asarray(jax.random.randint(interval_rng, (4,), 0, n - 1))  # i uniform on the N - 1 intervals
    lo, hi = karras(index, n), karras(index + 1, n)
    z = np.asarray(jax.random.normal(noise_rng, x.shape), np.float64)
    xs = np.asarray(x, np.float64)
    f = jitted(exp.fn, dropout_rng)
    student = f(params, xs + hi[:, None, None, None] * z, hi)
    expected = f(target, xs + lo[:, None, None, None] * z, lo)  # the same z, the EMA target's params
    assert float(loss) == pytest.approx(hand_loss(student, expected, lo, hi, "l2", "uniform"), rel=1e-4)


def standalone_cd(**fields):
    """A CD method around a tiny network, its EDM teacher built from the same network (no workdir needed)."""
    config = cd_config("unused", **fields)
    config.model.dropout = 0.3
    model = create_model(config.model)
    fn = ct.CD.make_function(config, model)
    teacher_fn = edm.EDM.make_function(config, model)
    return ct.CD(config, fn, (8, 8, 1), 0, teacher_fn=teacher_fn), fn, teacher_fn


def test_cd_target_is_one_heun_step_of_the_teacher():
    method, fn, teacher_fn = standalone_cd(distance="pseudo_huber", weighting="inverse_gap", target_ema=0.5)
    params = randomize(jit_init(fn, 0, (8, 8, 1)), 1)
    state = {"target": randomize(params, 2), "teacher": randomize(params, 3)}
    x = jax.random.uniform(jax.random.PRNGKey(3), (4, 8, 8, 1), minval=-1, maxval=1)
    rng = jax.random.PRNGKey(6)
    loss, metrics = jax.jit(method.loss)(params, state, {"image": x}, rng, jnp.int32(0))
    assert int(metrics["num_scales"]) == 18

    interval_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
    index = np.asarray(jax.random.randint(interval_rng, (4,), 0, 17))
    lo, hi = karras(index, 18), karras(index + 1, 18)
    b = lambda v: v[:, None, None, None]  # noqa: E731
    x_hi = np.asarray(x, np.float64) + b(hi) * np.asarray(jax.random.normal(noise_rng, x.shape), np.float64)

    teacher_call = jitted(teacher_fn)  # the frozen EDM denoiser, no dropout

    def teacher(inputs, s):
        return np.asarray(teacher_call(state["teacher"], inputs, s), np.float64)

    # One Heun step of dx/dsigma = (x - D(x, sigma)) / sigma from sigma_{i+1} down to sigma_i.
    d = (x_hi - teacher(x_hi, hi)) / b(hi)
    euler = x_hi + b(lo - hi) * d
    heun = x_hi + b(lo - hi) * (d + (euler - teacher(euler, lo)) / b(lo)) / 2
    f = jitted(fn, dropout_rng)
    student = f(params, x_hi, hi)
    expected = hand_loss(student, f(state["target"], heun, lo), lo, hi, "pseudo_huber", "inverse_gap")
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    # An Euler step (or the CT target x + sigma_i z) gives another loss: the test tells them apart.
    assert abs(hand_loss(student, f(state["target"], euler, lo), lo, hi, "pseudo_huber", "inverse_gap")
               - expected) > 1e-3 * expected

    # With target_ema = 0 the target is the student itself under stop-gradient (CM's CIFAR-10 CD).
    plain, _, _ = standalone_cd(distance="pseudo_huber", weighting="inverse_gap")
    assert plain.init_state(params, state["teacher"]).keys() == {"teacher"}
    loss0, _ = jax.jit(plain.loss)(params, {"teacher": state["teacher"]}, {"image": x}, rng, jnp.int32(0))
    assert float(loss0) == pytest.approx(
        hand_loss(student, f(params, heun, lo), lo, hi, "pseudo_huber", "inverse_gap"), rel=1e-4)


def test_ema_target_moves_with_mu_of_k_in_the_train_step():
    config = ct_config(num_steps=10**6)  # N(0) = 2, N(1) = 3
    exp = experiment.create_experiment(config, jax.devices()[:1])
    state = exp.create_state()
    # Move the target away from the params so that the EMA's two terms can be told apart.
    state = state.replace(method_state={"target": randomize(state.params, 4)})
    data = pipeline.create_train_iterator(config.data, global_batch_size=config.training.batch_size, seed=0)
    step_fn = train.jit_train_step(exp)
    before = jax.device_get(state.method_state["target"])
    for step in range(2):  # steps 0 and 1: N = 2 then 3, mu = 0.81 then 0.9
        state = state.replace(step=jnp.int32(step))
        new_state, metrics = step_fn(state, parallel.global_batch(next(data), exp.mesh))
        n, mu = cm_scales_and_mu(step, 10**6)
        assert int(metrics["num_scales"]) == n and float(metrics["target_decay"]) == pytest.approx(mu, rel=1e-6)
        after = jax.device_get(new_state.method_state["target"])
        expected = jax.tree.map(lambda t, p: mu * t + (1 - mu) * p, before, jax.device_get(new_state.params))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), after, expected)
        state, before = new_state, after
    assert [cm_scales_and_mu(k, 10**6) for k in (0, 1)] == [(2, pytest.approx(0.81)), (3, pytest.approx(0.9))]


def test_method_state_is_checkpointed_and_restored_exactly(edm_teacher_workdir, tmp_path):
    """CD's method state (EMA target and teacher) goes through a checkpoint bit-exact (cheap: no train step)."""
    exp = experiment.create_experiment(cd_config(edm_teacher_workdir, target_ema=0.5), jax.devices()[:1])
    state = exp.create_state()
    state = state.replace(method_state={**state.method_state, "target": randomize(state.method_state["target"], 7)})
    saved = jax.device_get(state.method_state)
    checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
    checkpointer.save(3, state, {}, force=True)
    checkpointer.wait()
    checkpointer.close()
    checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
    _, restored, _ = checkpointer.restore(exp.abstract_state())
    checkpointer.close()
    assert restored.method_state.keys() == {"target", "teacher"}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), restored.method_state, saved)


@pytest.mark.slow
def test_method_state_survives_a_checkpoint_onto_another_mesh(edm_teacher_workdir, tmp_path):
    """Saved from a data=4 x fsdp=2 mesh of 8 devices, restored on 1 device: target and teacher intact."""
    config8 = cd_config(edm_teacher_workdir, target_ema=0.5)
    config8.mesh.data, config8.mesh.fsdp, config8.mesh.fsdp_min_size = 4, 2, 256
    exp8 = experiment.create_experiment(config8, jax.devices()[:8])
    state = exp8.create_state()
    data = pipeline.create_train_iterator(config8.data, global_batch_size=config8.training.batch_size, seed=0)
    state, _ = train.jit_train_step(exp8)(state, parallel.global_batch(next(data), exp8.mesh))
    split = [not a.sharding.is_fully_replicated for a in jax.tree.leaves(state.method_state)]
    assert sum(split) > 5  # the teacher and the target really were sharded over fsdp
    saved = jax.device_get(state)
    checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
    checkpointer.save(1, state, {}, force=True)
    checkpointer.wait()
    checkpointer.close()

    exp1 = experiment.create_experiment(cd_config(edm_teacher_workdir, target_ema=0.5), jax.devices()[:1])
    checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
    _, restored, _ = checkpointer.restore(exp1.abstract_state())
    checkpointer.close()
    assert restored.method_state.keys() == {"target", "teacher"}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                 restored.method_state, saved.method_state)
    # The target moved off the teacher (it is an EMA of the updated student); the teacher did not move.
    teacher0 = jax.device_get(exp1.create_state().method_state["teacher"])
    jax.tree.map(np.testing.assert_array_equal, saved.method_state["teacher"], teacher0)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), saved.method_state["target"],
                                         teacher0))
    assert max(moved) > 1e-6


@pytest.mark.slow
def test_cd_resume_equals_an_uninterrupted_run_without_the_teacher(edm_teacher_workdir, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(edm_teacher_workdir, teacher)
    config = cd_config(teacher, num_steps=4, target_ema=0.5)
    config.training.checkpoint_every = 2
    straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
    # The same run stopped after step 2: its workdir without the step-4 checkpoint.
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")
    shutil.rmtree(teacher)  # a resumed run has the teacher in its state and its config snapshot
    resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert int(resumed.step) == 4
    for field in ("params", "ema_params", "method_state", "opt_state"):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     getattr(straight, field), getattr(resumed, field))
    assert os.path.exists(tmp_path / "resumed" / "teacher_config.json")
