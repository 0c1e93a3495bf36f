"""Reliability: damaged checkpoints, failed saves, non-finite states and samples, resuming with another config.

Most checkpoint cases use a small stand-in state (fast); the loop cases share
one finished 4-step run of the tiny model (module fixture) and work on copies.
"""

import glob
import json
import logging
import os
import resource
import shutil
import signal
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from consistency_jax import checkpointing, errors, experiment, parallel, train
from consistency_jax import workdir as workdir_lib
from consistency_jax.data import pipeline
from consistency_jax.evaluation import generate, inception_weights
from tests.helpers import tiny_config

# ----------------------------------------------------------------------------
# Damaged bytes inside a data file, non-finite states, keep policy (stand-in state).
# ----------------------------------------------------------------------------

RNG = np.random.default_rng(0)
SAVED = {step: RNG.standard_normal((64, 64)).astype(np.float32) for step in (1, 2)}


def stand_in_state(step):
    return {"params": {"w": jnp.asarray(SAVED[step])}, "ema_params": ({"w": jnp.asarray(SAVED[step])},),
            "step": jnp.asarray(step, jnp.int32)}


def abstract_stand_in():
    return jax.eval_shape(lambda: stand_in_state(1))


def save_two_steps(directory):
    checkpointer = checkpointing.Checkpointer(str(directory), keep=5)
    for step in (1, 2):
        checkpointer.save(step, stand_in_state(step), {"position": step})
    checkpointer.close()


def overwrite_middle_of_largest_file(step_dir, content: bytes):
    """What a disk or copy error does: other bytes inside the array data, file size unchanged."""
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True) if os.path.isfile(f)]
    path = max(files, key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle:middle + len(content)] = content
    open(path, "wb").write(bytes(data))
    return path


RANDOM_BYTES = np.random.default_rng(1).integers(0, 256, 64, dtype=np.uint8).tobytes()
FINITE_GARBAGE = b"\x3e" * 64  # float32 0x3e3e3e3e = 0.186 at any alignment: finite, wrong


@pytest.mark.parametrize("content", [RANDOM_BYTES, FINITE_GARBAGE], ids=["random", "finite"])
def test_changed_bytes_in_a_data_file_are_detected_and_the_previous_checkpoint_is_used(tmp_path, caplog, content):
    save_two_steps(tmp_path)
    overwrite_middle_of_largest_file(str(tmp_path / "2"), content)
    checkpointer = checkpointing.Checkpointer(str(tmp_path), keep=5)
    with caplog.at_level(logging.WARNING):
        step, state, data = checkpointer.restore(abstract_stand_in())
    assert step == 1 and data == {"position": 1}
    np.testing.assert_array_equal(state["ema_params"][0]["w"], SAVED[1])
    assert "Checkpoint at step 2" in caplog.text and "is damaged" in caplog.text
    assert checkpointer.all_steps() == [1] and (tmp_path / "unreadable_2").is_dir()
    checkpointer.close()


def test_sampling_reads_the_previous_checkpoint_without_touching_the_run(tmp_path):
    save_two_steps(tmp_path)
    overwrite_middle_of_largest_file(str(tmp_path / "2"), FINITE_GARBAGE)
    checkpointer = checkpointing.Checkpointer(str(tmp_path), read_only=True)
    abstract = abstract_stand_in()
    step, fields = checkpointer.restore_fields({"params": abstract["params"], "ema_params": abstract["ema_params"]})
    checkpointer.close()
    assert step == 1
    np.testing.assert_array_equal(fields["ema_params"][0]["w"], SAVED[1])
    np.testing.assert_array_equal(fields["params"]["w"], SAVED[1])
    assert (tmp_path / "2").is_dir() and not (tmp_path / "unreadable_2").exists()  # read-only: nothing renamed


def test_a_non_finite_state_is_never_saved(tmp_path):
    checkpointer = checkpointing.Checkpointer(str(tmp_path), keep=1)
    checkpointer.save(1, stand_in_state(1), {"position": 1})
    checkpointer.wait()
    state = stand_in_state(2)
    state["ema_params"] = ({"w": state["ema_params"][0]["w"].at[3, 4].set(jnp.nan)},)
    with pytest.raises(checkpointing.NonFiniteStateError, match=r"step 2: .*NaN/inf in 1 arrays \(ema_params/0/w\)"):
        checkpointer.save(2, state, {"position": 2})
    checkpointer.close()
    assert sorted(os.listdir(tmp_path)) == ["1"]  # keep=1 and the good checkpoint is still there


def test_a_checkpoint_without_integrity_data_holding_nan_falls_back(tmp_path):
    """Checkpoints written before integrity data existed are still read, and still checked for NaN/inf."""
    manager = ocp.CheckpointManager(str(tmp_path), options=ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False), item_names=("state", "data"))
    for step in (1, 2):
        state = stand_in_state(step)
        if step == 2:
            state["params"] = {"w": state["params"]["w"].at[0, 0].set(jnp.inf)}
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave({"position": step})))
    manager.close()
    checkpointer = checkpointing.Checkpointer(str(tmp_path), keep=5)
    step, state, data = checkpointer.restore(abstract_stand_in())
    checkpointer.close()
    assert step == 1 and data == {"position": 1}


def test_keeping_no_checkpoint_is_refused(tmp_path):
    with pytest.raises(ValueError, match="keep >= 1"):
        checkpointing.Checkpointer(str(tmp_path), keep=0)


def test_digests_change_with_any_value_and_position():
    x = jnp.asarray(RNG.standard_normal((5, 7)), jnp.float32)
    digest = checkpointing.array_summaries({"x": x})["x"][0]
    assert checkpointing.array_summaries({"x": x.at[4, 6].add(1e-7)})["x"][0] != digest
    swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])
    assert checkpointing.array_summaries({"x": swapped})["x"][0] != digest
    assert checkpointing.array_summaries({"x": x})["x"] == (digest, True)


# ----------------------------------------------------------------------------
# The loop: a finished run, resumed in every way a user might.
# ----------------------------------------------------------------------------


def run_config(num_steps):
    """tiny_config with an even smaller network (one level, no attention): these tests are about files."""
    config = tiny_config(num_steps=num_steps)
    config.model.update(dict(model_channels=4, channel_mult=(1,), attn_resolutions=()))
    config.method.curriculum_steps = 4
    config.training.checkpoint_every = 0  # only at the end (item 6: was ZeroDivisionError)
    return config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("finished"))
    train.train_and_evaluate(run_config(4), workdir)
    return workdir


@pytest.fixture
def run_copy(finished_run, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(finished_run, workdir)
    return workdir


def read(path):
    return open(path, "rb").read()


def test_checkpoint_every_0_saves_only_at_the_end(finished_run):
    assert sorted(os.listdir(os.path.join(finished_run, "checkpoints"))) == ["4"]
    assert os.listdir(os.path.join(finished_run, workdir_lib.HISTORY_DIR)) == ["step_00000000.json"]


def test_resuming_with_another_network_names_the_fields_and_changes_nothing(run_copy, capfd):
    config = run_config(6)
    config.model.model_channels = 16
    before = read(os.path.join(run_copy, "config.json"))
    with pytest.raises(checkpointing.IncompatibleCheckpointError,
                       match=r"holds other arrays than this run.s network.*model.model_channels: 4 -> 16"):
        train.train_and_evaluate(config, run_copy)
    output = "".join(capfd.readouterr())
    assert "asyncio" not in output and "strict=False" not in output and len(output.splitlines()) < 20
    assert read(os.path.join(run_copy, "config.json")) == before
    assert sorted(os.listdir(os.path.join(run_copy, "checkpoints"))) == ["4"]  # nothing moved aside


def test_num_steps_below_the_checkpoint_is_an_error(run_copy):
    before = read(os.path.join(run_copy, "config.json"))
    with pytest.raises(experiment.ConfigError, match=r"num_steps=2, but the checkpoint .* at step 4: there is "
                                                     r"nothing to train"):
        train.train_and_evaluate(run_config(2), run_copy)
    assert read(os.path.join(run_copy, "config.json")) == before


def test_a_finished_run_started_again_rewrites_no_config(run_copy):
    config = run_config(4)
    config.optimizer.learning_rate = 5e-4
    before = read(os.path.join(run_copy, "config.json"))
    state = train.train_and_evaluate(config, run_copy)
    assert int(state.step) == 4
    assert read(os.path.join(run_copy, "config.json")) == before
    assert os.listdir(os.path.join(run_copy, workdir_lib.HISTORY_DIR)) == ["step_00000000.json"]


def test_a_damaged_only_checkpoint_stops_sampling_without_writing_images(run_copy):
    """The issue's case: changed bytes in the EMA weights once gave all-black samples and exit code 0."""
    data_files = glob.glob(os.path.join(run_copy, "checkpoints", "4", "state", "**", "d", "*"), recursive=True)
    assert data_files
    for path in data_files:  # every array file, so the params and EMAs are hit whatever the layout
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2:len(data) // 2 + 8] = FINITE_GARBAGE[:8]
        open(path, "wb").write(bytes(data))
    with pytest.raises(checkpointing.CheckpointError, match=r"No checkpoint in .* is intact:\nstep 4: "):
        generate.run_sample(run_config(4), run_copy)
    assert not glob.glob(os.path.join(run_copy, "samples", "*.npz"))


class FileSizeLimit:
    """RLIMIT_FSIZE for this process: writes past `limit` bytes fail with EFBIG, as on a full disk."""

    def __init__(self, limit):
        self.limit = limit
        self._previous = None

    def __enter__(self):
        self._previous = resource.getrlimit(resource.RLIMIT_FSIZE)
        self._handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self._previous[1]))

    def __exit__(self, *exc):
        if self._previous is None:
            return
        resource.setrlimit(resource.RLIMIT_FSIZE, self._previous)
        signal.signal(signal.SIGXFSZ, self._handler)


@pytest.fixture(scope="module")
def resumed_with_a_failing_save(finished_run, tmp_path_factory):
    """Resumes the finished run with another learning rate; the save at step 8 hits a file-size limit."""
    workdir = str(tmp_path_factory.mktemp("resumed"))
    shutil.copytree(finished_run, workdir, dirs_exist_ok=True)
    config = run_config(12)
    config.training.checkpoint_every = 4
    config.optimizer.learning_rate = 5e-4
    real_save, real_batch = checkpointing.Checkpointer.save, parallel.global_batch
    limit = FileSizeLimit(16 * 1024)  # the network's array files are larger than this

    def save(self, step, *args, **kwargs):
        if step == 8:
            limit.__enter__()
        return real_save(self, step, *args, **kwargs)

    def slow_batch(*args):  # leaves time for the failure to surface before the next save
        import time
        time.sleep(0.1)
        return real_batch(*args)

    patch = pytest.MonkeyPatch()
    patch.setattr(checkpointing.Checkpointer, "save", save)
    patch.setattr(parallel, "global_batch", slow_batch)
    logs = []
    handler = logging.Handler()
    handler.emit = lambda record: logs.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(checkpointing.CheckpointSaveError) as error:
            train.train_and_evaluate(config, workdir)
    finally:
        limit.__exit__()
        patch.undo()
        logging.getLogger().removeHandler(handler)
    return workdir, str(error.value), "\n".join(logs)


def test_a_failed_background_save_stops_the_run_at_once(resumed_with_a_failing_save):
    workdir, message, _ = resumed_with_a_failing_save
    assert "Saving the checkpoint of step 8" in message and "File too large" in message
    assert "newest: step 4" in message
    logged = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert max(logged) < 12  # stopped before the next checkpoint interval ended
    assert checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True).all_steps() == [4]
    exp = experiment.create_experiment(run_config(12), jax.devices()[:1])
    step, _, _ = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")).restore(exp.abstract_state())
    assert step == 4


def test_a_resume_with_changed_settings_warns_and_keeps_the_config_history(resumed_with_a_failing_save, finished_run):
    workdir, _, logs = resumed_with_a_failing_save
    assert "differs from the run's config.json: optimizer.learning_rate: 0.001 -> 0.0005" in logs
    history = sorted(os.listdir(os.path.join(workdir, workdir_lib.HISTORY_DIR)))
    assert history == ["step_00000000.json", "step_00000004.json"]
    first = json.load(open(os.path.join(workdir, workdir_lib.HISTORY_DIR, history[0])))
    assert first == json.load(open(os.path.join(finished_run, "config.json")))
    assert json.load(open(os.path.join(workdir, "config.json")))["optimizer"]["learning_rate"] == 5e-4


# ----------------------------------------------------------------------------
# Non-finite samples; files that cannot be read.
# ----------------------------------------------------------------------------


def test_samplers_refuse_non_finite_output(tmp_path):
    exp = experiment.create_experiment(run_config(4), jax.devices()[:1])
    params = jax.tree.map(lambda x: x * jnp.nan, exp.init_params(jax.random.PRNGKey(0)))
    chunk_dir = str(tmp_path / "chunks")
    with pytest.raises(generate.NonFiniteSamplesError, match="1-step sampler produced NaN/inf"):
        generate.generate(exp, params, 8, 1, seed=0, batch_size=8, chunk_dir=chunk_dir)
    assert not glob.glob(os.path.join(chunk_dir, "*.npz"))


@pytest.mark.slow  # a state, a checkpoint and the edit's compile (~40 s on a loaded 2-core host); -m slow
def test_edit_mode_refuses_non_finite_output(tmp_path, monkeypatch):
    from PIL import Image

    from consistency_jax.evaluation import edit as edit_files

    config = tiny_config()
    workdir = str(tmp_path / "run")
    exp = experiment.create_experiment(config, jax.devices()[:1])
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, async_save=False)
    checkpointer.save(1, exp.create_state(), {}, force=True)
    checkpointer.close()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "digit.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "hole.png")
    config.edit.images, config.edit.masks, config.edit.steps = str(tmp_path / "digit.png"), str(tmp_path / "hole.png"), 2
    monkeypatch.setattr(edit_files.editing, "edit", lambda fn, params, rng, y, *args: y * jnp.nan)  # broken weights
    with pytest.raises(generate.NonFiniteSamplesError, match="inpaint edit produced NaN/inf values"):
        edit_files.run_edit(config, workdir)
    assert not glob.glob(str(tmp_path / "digit_inpaint*"))


@pytest.mark.parametrize("damage", ["truncated", "not_a_zip"])
def test_a_truncated_npz_dataset_is_named(tmp_path, damage):
    path = tmp_path / "data.npz"
    np.savez(path, images=np.zeros((20, 8, 8, 1), np.uint8))
    if damage == "truncated":
        open(path, "r+b").truncate(os.path.getsize(path) // 2)
    else:  # numpy's own message would be about unpickling
        path.write_text("not an archive\n")
    config = tiny_config()
    config.data.name, config.data.path = "npz", str(path)
    with pytest.raises(errors.FileReadError, match=f"data.path: the .npz {path} .* cannot be read"):
        pipeline.check_dataset(config.data)


def test_a_corrupt_inception_archive_is_named(tmp_path):
    path = tmp_path / inception_weights.TF_GRAPH_ARCHIVE
    with tarfile.open(path, "w:gz") as archive:
        archive.add(__file__, arcname=inception_weights.TF_GRAPH_FILE)
    open(path, "r+b").truncate(os.path.getsize(path) // 2)
    with pytest.raises(errors.FileReadError, match=f"The Inception weight file {path} .* cannot be read.*Delete it"):
        inception_weights.load_inception_variables(str(path))
