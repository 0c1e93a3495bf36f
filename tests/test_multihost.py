"""Two real JAX processes on this CPU (2 fake devices each) train like one process on 4 devices.

Each child is `python -m tests.ft_driver` (consistency_jax.main) started with
--coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=K.
"""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from consistency_jax import checkpointing, experiment, parallel, train
from consistency_jax.data import pipeline
from tests import ft_config
from tests.helpers import child_xla_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """Shared by the child runs: the second job reuses the first one's compiled programs."""
    return tmp_path_factory.mktemp("jax_cache")


def start_job(workdir, cache, num_steps, step_delay_s=0.0, extra_flags=()) -> list[subprocess.Popen]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": child_xla_flags(2),
           "FT_STEP_DELAY_S": str(step_delay_s),
           "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    os.makedirs(workdir, exist_ok=True)
    address = f"127.0.0.1:{free_port()}"
    children = []
    for process_id in range(2):
        command = [sys.executable, "-m", "tests.ft_driver", "--config=tests/ft_config.py", f"--workdir={workdir}",
                   f"--config.training.num_steps={num_steps}", "--config.mesh.data=2", "--config.mesh.fsdp=2",
                   f"--coordinator_address={address}", "--num_processes=2", f"--process_id={process_id}",
                   *extra_flags]
        log = open(os.path.join(workdir, f"process_{process_id}.log"), "w")
        children.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return children


def wait_all(children, workdir, timeout_s=240) -> None:
    deadline = time.time() + timeout_s
    try:
        for child in children:
            child.wait(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
        for child in children:
            child.kill()
        raise AssertionError("The two-process job timed out:\n" + tail_of_logs(workdir))
    if any(child.returncode != 0 for child in children):
        raise AssertionError(f"Exit codes {[c.returncode for c in children]}:\n" + tail_of_logs(workdir))


def tail_of_logs(workdir) -> str:
    return "\n".join(f"--- {path}\n{open(path).read()[-3000:]}"
                     for path in sorted(glob.glob(os.path.join(workdir, "process_*.log"))))


def logged(workdir) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def restore_on_one_device(workdir):
    config = ft_config.get_config()
    exp = experiment.create_experiment(config, jax.devices()[:1])
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=100)
    step, state, _ = checkpointer.restore(exp.abstract_state())
    checkpointer.close()
    return step, jax.device_get(state)


def single_process_run(config, devices, num_steps):
    """The reference: the same steps in this process, on 4 devices, data parallel only."""
    exp = experiment.create_experiment(config, devices)
    state = exp.create_state()
    step_fn = train.jit_train_step(exp)
    data = pipeline.create_train_iterator(config.data, global_batch_size=config.training.batch_size,
                                          seed=config.seed)
    losses = []
    for _ in range(num_steps):
        state, metrics = step_fn(state, parallel.global_batch(next(data), exp.mesh))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state)


def test_two_processes_with_two_devices_each_match_one_process_with_four(tmp_path, compilation_cache):
    workdir = str(tmp_path / "two_processes")
    children = start_job(workdir, compilation_cache, NUM_STEPS)
    config = ft_config.get_config()
    config.training.num_steps = NUM_STEPS
    config.mesh.data = 4
    reference_losses, reference = single_process_run(config, jax.devices()[:4], NUM_STEPS)
    wait_all(children, workdir)

    lines = logged(workdir)
    assert [line["step"] for line in lines] == list(range(1, NUM_STEPS + 1)), "process 0 alone writes metrics"
    np.testing.assert_allclose([line["loss"] for line in lines], reference_losses, rtol=1e-4)
    step, state = restore_on_one_device(workdir)
    assert step == NUM_STEPS
    for name in ("params", "opt_state", "ema_params"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                     getattr(reference, name), getattr(state, name))
    # Both processes wrote their shards of the one checkpoint.
    state_dir = os.path.join(workdir, "checkpoints", str(NUM_STEPS), "state")
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))


@pytest.mark.slow  # ~40 s more on 2 busy cores
def test_sigterm_to_one_process_stops_both_at_the_same_step_with_a_checkpoint(tmp_path, compilation_cache):
    """A preemption notice reaches one host; orbax's sync point stops all of them at one step.

    Guards train._SigtermFlag staying out of multi-process runs: a Python SIGTERM
    handler would replace JAX's, stop only the signalled process and hang the other.
    """
    workdir = str(tmp_path / "preempted")
    num_steps = 40
    children = start_job(workdir, compilation_cache, num_steps, step_delay_s=0.25,
                         extra_flags=[f"--config.training.checkpoint_every={num_steps}"])
    deadline = time.time() + 240
    while len(logged(workdir)) < 2:
        assert all(child.poll() is None for child in children), "a process exited early:\n" + tail_of_logs(workdir)
        assert time.time() < deadline, "no training steps within the time limit:\n" + tail_of_logs(workdir)
        time.sleep(0.05)
    children[1].send_signal(signal.SIGTERM)
    wait_all(children, workdir, timeout_s=120)

    stopped_at = logged(workdir)[-1]["step"]
    assert 2 <= stopped_at < num_steps
    steps = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
    assert steps == [stopped_at]
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(
        os.listdir(os.path.join(workdir, "checkpoints", str(stopped_at), "state")))


# ----------------------------------------------------------------------------
# When jax.distributed.initialize() is called, and with what (no processes started).
# ----------------------------------------------------------------------------


@pytest.fixture
def initialize_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args: calls.append(args))
    for name in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_a_plain_machine_runs_as_one_process(initialize_calls):
    parallel.maybe_initialize_distributed(False)
    assert initialize_calls == []


@pytest.mark.parametrize("force, env, expected", [
    (True, {}, (None, None, None)),  # --distributed: JAX finds the cluster itself
    (False, {"SLURM_NTASKS": "4"}, (None, None, None)),
    (False, {"TPU_WORKER_HOSTNAMES": "w0,w1"}, (None, None, None)),
])
def test_clusters_are_detected(initialize_calls, monkeypatch, force, env, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parallel.maybe_initialize_distributed(force)
    assert initialize_calls == [expected]


def test_coordinator_flags_are_passed_on(initialize_calls):
    parallel.maybe_initialize_distributed(False, "10.0.0.1:1234", 4, 3)
    assert initialize_calls == [("10.0.0.1:1234", 4, 3)]


@pytest.mark.parametrize("flags, message", [
    (("10.0.0.1:1234", None, 0), "needs all of --coordinator_address, --num_processes and --process_id"),
    ((None, 2, 0), "needs all of"),
    (("10.0.0.1:1234", 2, 2), r"--process_id must be in 0\.\.1, got 2"),
])
def test_incomplete_or_wrong_coordinator_flags_are_refused(initialize_calls, flags, message):
    with pytest.raises(ValueError, match=message):
        parallel.maybe_initialize_distributed(False, *flags)
    assert initialize_calls == []
