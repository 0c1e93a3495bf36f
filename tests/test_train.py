"""The training loop end to end on tiny models: learning, sharding, resume, NaN stop, sampling."""

import copy
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consistency_jax import checkpointing, experiment, parallel, train
from consistency_jax.data import pipeline
from consistency_jax.evaluation import generate
from tests.helpers import tiny_config


def run_steps(config, devices, num_steps, batches):
    exp = experiment.create_experiment(config, devices)
    state = exp.create_state()
    step_fn = train.jit_train_step(exp)
    losses = []
    for batch in batches[:num_steps]:
        state, metrics = step_fn(state, parallel.global_batch(batch, exp.mesh))
        losses.append(float(metrics["loss"]))
    return jax.device_get(state), losses


def with_loss(exp, loss):
    """The experiment's method with its loss replaced (the default update calls self.loss)."""
    method = copy.copy(exp.method)
    method.loss = loss
    return method


def take_batches(config, n):
    data = pipeline.create_train_iterator(config.data, global_batch_size=config.training.batch_size, seed=0)
    return [next(data) for _ in range(n)]


def test_eight_devices_give_the_same_steps_as_one():
    config = tiny_config()
    batches = take_batches(config, 3)
    state1, losses1 = run_steps(config, jax.devices()[:1], 3, batches)
    state8, losses8 = run_steps(config, jax.devices()[:8], 3, batches)
    np.testing.assert_allclose(losses1, losses8, rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), state1.params, state8.params)
    # The comparison is not between two untouched inits: training moved the params.
    initial = jax.device_get(experiment.create_experiment(config, jax.devices()[:1]).create_state().params)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), initial, state8.params))
    assert max(moved) > 1e-4
    # And the 8-device run really split the batch: one 2-image shard per device.
    mesh8 = experiment.create_experiment(config, jax.devices()[:8]).mesh
    image = parallel.global_batch(batches[0], mesh8)["image"]
    assert len(image.addressable_shards) == 8 and image.addressable_shards[0].data.shape[0] == 2
    assert int(state8.step) == 3


def test_fsdp_mesh_gives_the_same_steps_as_data_parallel():
    config = tiny_config()
    batches = take_batches(config, 2)
    config_fsdp = tiny_config()
    config_fsdp.mesh.data, config_fsdp.mesh.fsdp = 4, 2
    config_fsdp.mesh.fsdp_min_size = 256  # so that the tiny model's larger arrays really are split
    state_dp, losses_dp = run_steps(config, jax.devices()[:8], 2, batches)
    state_fsdp, losses_fsdp = run_steps(config_fsdp, jax.devices()[:8], 2, batches)
    split = experiment.create_experiment(config_fsdp, jax.devices()[:8]).state_shardings.params
    assert sum(not s.is_fully_replicated for s in jax.tree.leaves(split)) > 5
    np.testing.assert_allclose(losses_dp, losses_fsdp, rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 state_dp.params, state_fsdp.params)


def test_loss_goes_down_on_tiny_data():
    """The real train step, on one batch with fixed noise and sigma pairs, drives the iCT loss down."""
    config = tiny_config()
    config.method.curriculum_steps = 10**6  # N stays at 11
    config.optimizer.name, config.optimizer.learning_rate = "adam", 1e-2
    exp = experiment.create_experiment(config, jax.devices()[:1])
    method = with_loss(exp, lambda params, method_state, batch, rng, step: exp.method.loss(
        params, method_state, batch, jax.random.PRNGKey(7), 0))
    step_fn = jax.jit(lambda s, b: train.train_step(s, b, method=method, optimizer=exp.optimizer, ema_rates=(0.9,)))
    batch = {"image": jnp.asarray(take_batches(config, 1)[0]["image"])}
    state = exp.create_state()
    losses = []
    for _ in range(40):
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-5:]) < 0.7 * losses[0], losses


def test_train_and_evaluate_writes_logs_samples_and_report(tmp_path):
    config = tiny_config(num_steps=4)
    config.training.log_every = 2
    config.training.sample_every = 4
    config.eval.at_end = True
    config.eval.num_samples = 16
    state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 4
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [line["step"] for line in lines[:2]] == [2, 4]
    assert all(np.isfinite(line["loss"]) and line["steps_per_sec"] > 0 for line in lines[:2])
    assert (tmp_path / "samples" / "step_00000004.png").exists()
    assert (tmp_path / "eval" / "step_00000004_2step.png").exists()
    report = json.load(open(tmp_path / "eval" / "step_00000004.json"))
    assert set(report["results"]) == {"samples_1step", "samples_2step", "real_test", "untrained_1step"}
    assert report["sigmas"]["2"] == [80.0, 0.821]
    # Held-out real digits are far closer to the training digits than an untrained network's output.
    assert report["results"]["real_test"]["fid"] < 0.2 * report["results"]["untrained_1step"]["fid"]


def test_resume_equals_an_uninterrupted_run(tmp_path):
    def config_with(num_steps):
        config = tiny_config(num_steps=num_steps)
        config.method.curriculum_steps = 6  # the same curriculum in both runs
        config.training.checkpoint_every = 3
        return config

    straight = train.train_and_evaluate(config_with(6), str(tmp_path / "straight"))
    train.train_and_evaluate(config_with(3), str(tmp_path / "resumed"))
    resumed = train.train_and_evaluate(config_with(6), str(tmp_path / "resumed"))
    assert int(resumed.step) == 6
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 straight.params, resumed.params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 straight.ema_params, resumed.ema_params)


def test_nonfinite_loss_keeps_the_state_and_names_the_step():
    config = tiny_config()
    exp = experiment.create_experiment(config, jax.devices()[:1])
    state = exp.create_state()

    def nan_after_two_steps(params, method_state, batch, rng, step):
        loss = jnp.mean(jax.tree.leaves(params)[0]) * 0 + jnp.where(step >= 2, jnp.nan, 1.0)
        return loss, {}

    step_fn = jax.jit(lambda s, b: train.train_step(s, b, method=with_loss(exp, nan_after_two_steps),
                                                    optimizer=exp.optimizer, ema_rates=(0.9,)))
    batch = {"image": jnp.zeros((16, 8, 8, 1))}
    state, _ = step_fn(state, batch)
    state, _ = step_fn(state, batch)
    before = jax.device_get(state)
    state, metrics = step_fn(state, batch)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), before.params, state.params)
    with pytest.raises(train.NonFiniteLossError, match="at step 3"):
        train._fetch(3, metrics)


def test_nonfinite_gradient_with_a_finite_loss_is_caught_too():
    config = tiny_config()
    exp = experiment.create_experiment(config, jax.devices()[:1])
    state = exp.create_state()

    def nan_gradient(params, method_state, batch, rng, step):
        # sqrt at 0: the value is 0, the gradient 0 * inf = nan.
        return jnp.sqrt(jnp.sum(jax.tree.leaves(params)[0] * 0.0)), {}

    step_fn = jax.jit(lambda s, b: train.train_step(s, b, method=with_loss(exp, nan_gradient),
                                                    optimizer=exp.optimizer, ema_rates=(0.9,)))
    before = jax.device_get(state)
    state, metrics = step_fn(state, {"image": jnp.zeros((16, 8, 8, 1))})
    assert float(metrics["loss"]) == 0.0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), before.params, state.params)
    with pytest.raises(train.NonFiniteLossError, match=r"Non-finite grad_norm \(nan\) at step 1"):
        train._fetch(1, metrics)


def test_diverging_run_stops_loudly_and_keeps_no_bad_checkpoint(tmp_path):
    config = tiny_config(num_steps=40)
    config.optimizer.learning_rate = 1e30
    config.optimizer.name = "adam"
    config.training.checkpoint_every = 1
    with pytest.raises(train.NonFiniteLossError, match=r"Non-finite loss \((nan|inf|-inf)\)( and grad_norm \(\S+\))? at step \d+") as error:
        train.train_and_evaluate(config, str(tmp_path))
    bad_step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
    exp = experiment.create_experiment(config, jax.devices()[:1])
    checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), keep=100)
    assert checkpointer.all_steps() and max(checkpointer.all_steps()) < bad_step
    _, state, _ = checkpointer.restore(exp.abstract_state())
    checkpointer.close()
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))


def test_sample_mode_writes_npz_and_grid(tmp_path):
    config = tiny_config(num_steps=2)
    config.sampling.num_samples = 10
    train.train_and_evaluate(config, str(tmp_path))
    path = generate.run_sample(config, str(tmp_path))
    images = np.load(path)["images"]
    assert images.shape == (10, 8, 8, 1) and images.dtype == np.uint8
    assert os.path.exists(path.replace(".npz", ".png"))
    # Deterministic for the seed.
    again = np.load(generate.run_sample(config, str(tmp_path)))["images"]
    np.testing.assert_array_equal(images, again)
    # EMA params by default: the raw params (ema_rate=0) sample other images from the same noise.
    config.sampling.ema_rate = 0.0
    raw = np.load(generate.run_sample(config, str(tmp_path)))["images"]
    assert np.abs(raw.astype(int) - images.astype(int)).max() > 0


def test_class_conditional_training_and_sampling(tmp_path):
    rng = np.random.RandomState(0)
    labels = rng.randint(0, 3, 64)
    images = (rng.rand(64, 8, 8, 1) * 255).astype(np.uint8)
    np.savez(tmp_path / "data.npz", images=images, labels=labels)
    config = tiny_config(num_steps=2)
    config.data.name, config.data.path, config.data.num_classes = "npz", str(tmp_path / "data.npz"), 3
    config.model.num_classes = 3
    config.sampling.num_samples = 12
    train.train_and_evaluate(config, str(tmp_path / "run"))
    out = np.load(generate.run_sample(config, str(tmp_path / "run")))
    assert out["images"].shape == (12, 8, 8, 1)
    assert out["labels"].shape == (12,) and set(out["labels"]) <= {0, 1, 2} and len(set(out["labels"])) > 1


def test_mismatched_class_counts_are_a_config_error():
    config = tiny_config()
    config.data.num_classes = 10
    config.model.num_classes = 0
    with pytest.raises(experiment.ConfigError, match=r"config.model.num_classes=0 differs from config.data.num_classes=10.*"
                                                     r"--config.model.num_classes=10 --config.data.num_classes=10"):
        experiment.validate_config(config)
