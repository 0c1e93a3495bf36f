"""Fault tolerance: cross-mesh restore, damaged checkpoints, keep policy, SIGKILL and SIGTERM mid-run.

The kill tests run real training processes (`python -m tests.ft_driver`, which
is `consistency_jax.main` plus a per-step delay) and signal them in the middle.
"""

import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consistency_jax import checkpointing, experiment
from consistency_jax.data import pipeline
from tests import ft_config
from tests.helpers import child_xla_flags, tiny_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


# ----------------------------------------------------------------------------
# Restoring onto another mesh.
# ----------------------------------------------------------------------------


def random_state(exp):
    """Every leaf of the train state filled with distinct random values, placed with the experiment's shardings."""
    rng = np.random.default_rng(0)

    def fill(leaf):
        values = rng.integers(0, 2**31, leaf.shape) if np.issubdtype(leaf.dtype, np.integer) else \
            rng.standard_normal(leaf.shape)
        return jax.device_put(values.astype(leaf.dtype), leaf.sharding)

    return jax.tree.map(fill, exp.abstract_state())


def test_checkpoint_saved_on_data4_fsdp2_restores_on_one_device_and_on_data2(tmp_path):
    config = tiny_config()
    config.mesh.fsdp_min_size = 256  # so that the tiny model's arrays are really split
    config.mesh.data, config.mesh.fsdp = 4, 2
    state = random_state(experiment.create_experiment(config, jax.devices()[:8]))
    data = pipeline.create_train_iterator(config.data, global_batch_size=config.training.batch_size, seed=0)
    next(data)
    data_state = data.get_state()
    split = [x for x in jax.tree.leaves(state) if not x.sharding.is_fully_replicated]
    assert len(split) > 10, "the (4, 2) mesh should split the larger params and Adam moments over fsdp"
    saved = jax.device_get(state)
    checkpointer = checkpointing.Checkpointer(str(tmp_path), keep=2)
    checkpointer.save(2, state, data_state)
    checkpointer.wait()

    for devices, data_axis in ((jax.devices()[:1], 1), (jax.devices()[:2], 2)):
        config.mesh.data, config.mesh.fsdp = data_axis, 1
        target = experiment.create_experiment(config, devices)
        step, restored, restored_data = checkpointer.restore(target.abstract_state())
        assert step == 2 and restored_data == data_state
        assert_trees_equal(saved, restored)
        assert all(set(x.sharding.device_set) == set(devices) and x.sharding.is_fully_replicated
                   for x in jax.tree.leaves(restored))
    checkpointer.close()


# ----------------------------------------------------------------------------
# Damaged checkpoints and the keep policy (a small stand-in state: fast).
# ----------------------------------------------------------------------------


def small_state(value: float) -> dict:
    return {"w": jnp.full((32, 32), value, jnp.float32), "step": jnp.asarray(int(value), jnp.int32)}


def abstract_small_state() -> dict:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {"w": jax.ShapeDtypeStruct((32, 32), jnp.float32, sharding=sharding),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding)}


def save_steps(directory, steps, **options) -> None:
    checkpointer = checkpointing.Checkpointer(str(directory), keep=options.pop("keep", 5), **options)
    for step in steps:
        checkpointer.save(step, small_state(step), {"position": step})
    checkpointer.wait()
    checkpointer.close()


def files_under(path) -> list[str]:
    return [f for f in glob.glob(os.path.join(path, "**"), recursive=True) if os.path.isfile(f)]


def overwrite_array_files(step_dir) -> None:
    for path in files_under(os.path.join(step_dir, "state")):
        with open(path, "wb") as f:
            f.write(b"\0garbage")


def flip_bytes_in_array_chunks(step_dir) -> None:
    chunks = files_under(os.path.join(step_dir, "state", "d"))
    assert chunks
    for path in chunks:
        content = bytearray(open(path, "rb").read())
        content[len(content) // 2] ^= 0xFF
        open(path, "wb").write(bytes(content))


def remove_state_item(step_dir) -> None:  # what a partial copy of a checkpoint looks like
    shutil.rmtree(os.path.join(step_dir, "state"))


@pytest.mark.parametrize("damage", [overwrite_array_files, flip_bytes_in_array_chunks, remove_state_item])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    save_steps(tmp_path, [1, 2])
    damage(str(tmp_path / "2"))
    checkpointer = checkpointing.Checkpointer(str(tmp_path), keep=5)
    with caplog.at_level(logging.WARNING):
        step, state, data_state = checkpointer.restore(abstract_small_state())
    assert step == 1 and data_state == {"position": 1}
    np.testing.assert_array_equal(state["w"], np.full((32, 32), 1.0))
    assert "Checkpoint at step 2" in caplog.text and "is damaged" in caplog.text
    # The damaged checkpoint is kept for inspection but out of the way: the resumed run saves step 2 again.
    assert checkpointer.all_steps() == [1] and (tmp_path / "unreadable_2").is_dir()
    checkpointer.save(2, small_state(7), {"position": 2})
    checkpointer.wait()
    step, state, _ = checkpointer.restore(abstract_small_state())
    assert step == 2 and float(state["w"][0, 0]) == 7.0
    checkpointer.close()


def test_no_readable_checkpoint_is_an_error_naming_every_step(tmp_path):
    save_steps(tmp_path, [1, 2])
    for step in (1, 2):
        overwrite_array_files(str(tmp_path / str(step)))
    checkpointer = checkpointing.Checkpointer(str(tmp_path), keep=5)
    with pytest.raises(checkpointing.CheckpointError, match=r"is intact:\nstep 2: .*\nstep 1: "):
        checkpointer.restore(abstract_small_state())
    checkpointer.close()


def test_keeps_the_newest_n_plus_every_kth_step(tmp_path):
    save_steps(tmp_path, range(1, 11), keep=2, keep_every=4)
    assert sorted(int(name) for name in os.listdir(tmp_path) if name.isdigit()) == [4, 8, 9, 10]


# ----------------------------------------------------------------------------
# Killing real training runs.
# ----------------------------------------------------------------------------

NUM_STEPS = 12


def child_command(workdir, checkpoint_every):
    return [sys.executable, "-m", "tests.ft_driver", "--config=tests/ft_config.py", f"--workdir={workdir}",
            f"--config.training.num_steps={NUM_STEPS}", f"--config.training.checkpoint_every={checkpoint_every}"]


def start_child(workdir, checkpoint_every, step_delay_s, compilation_cache):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": child_xla_flags(1),
           "FT_STEP_DELAY_S": str(step_delay_s), "JAX_COMPILATION_CACHE_DIR": str(compilation_cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    os.makedirs(workdir, exist_ok=True)
    log = open(os.path.join(workdir, f"child_{time.time_ns()}.log"), "w")
    return subprocess.Popen(child_command(workdir, checkpoint_every), cwd=REPO_ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def wait_for(child, condition, what, timeout_s=120):
    deadline = time.time() + timeout_s
    while not condition():
        if child.poll() is not None:
            raise AssertionError(f"The run exited (code {child.returncode}) before {what}.")
        if time.time() > deadline:
            child.kill()
            raise AssertionError(f"Timed out waiting for {what}.")
        time.sleep(0.02)


def finish(child, workdir, timeout_s=120):
    try:
        code = child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()
        raise
    if code != 0:
        logs = sorted(glob.glob(os.path.join(workdir, "child_*.log")))
        raise AssertionError(f"Training run failed with code {code}:\n" + open(logs[-1]).read()[-5000:])


def finished_steps(workdir) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit()) if os.path.isdir(directory) else []


def logged_steps(workdir) -> list[int]:
    path = os.path.join(workdir, "metrics.jsonl")
    return [json.loads(line)["step"] for line in open(path)] if os.path.exists(path) else []


def restore_final(workdir):
    config = ft_config.get_config()  # the children's config
    exp = experiment.create_experiment(config, jax.devices()[:1])
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=100)
    restored_step, state, _ = checkpointer.restore(exp.abstract_state())
    checkpointer.close()
    return restored_step, jax.device_get(state)


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """Shared by the child runs: a restart reuses its predecessor's compiled train step."""
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, compilation_cache):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    finish(start_child(workdir, checkpoint_every=4, step_delay_s=0, compilation_cache=compilation_cache), workdir)
    step, state = restore_final(workdir)
    assert step == NUM_STEPS
    return state


def test_sigkill_mid_run_then_restart_equals_an_uninterrupted_run(tmp_path, uninterrupted, compilation_cache):
    workdir = str(tmp_path)
    child = start_child(workdir, checkpoint_every=2, step_delay_s=0.25, compilation_cache=compilation_cache)
    # Checkpoints are saved every 2 steps and asynchronously: the kill may land during the next save.
    wait_for(child, lambda: any(s >= 4 for s in finished_steps(workdir)), "a checkpoint at step 4")
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    killed_at = max(logged_steps(workdir))
    assert child.returncode == -signal.SIGKILL and 4 <= killed_at < NUM_STEPS and max(finished_steps(workdir)) < NUM_STEPS

    finish(start_child(workdir, checkpoint_every=2, step_delay_s=0, compilation_cache=compilation_cache), workdir)
    step, resumed = restore_final(workdir)
    assert step == NUM_STEPS
    assert not glob.glob(os.path.join(workdir, "checkpoints", "*tmp*")), "unfinished saves are cleaned up"
    assert_trees_equal(uninterrupted, resumed)


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_exits_cleanly(tmp_path, compilation_cache):
    workdir = str(tmp_path)
    # No periodic checkpoint before the end: the only checkpoint can be the preemption one.
    child = start_child(workdir, checkpoint_every=NUM_STEPS, step_delay_s=0.25, compilation_cache=compilation_cache)
    wait_for(child, lambda: len(logged_steps(workdir)) >= 3, "three logged steps")
    child.send_signal(signal.SIGTERM)
    finish(child, workdir, timeout_s=60)
    stopped_at = logged_steps(workdir)[-1]
    assert 3 <= stopped_at < NUM_STEPS
    assert finished_steps(workdir) == [stopped_at]
    step, state = restore_final(workdir)
    assert step == int(state.step) == stopped_at
