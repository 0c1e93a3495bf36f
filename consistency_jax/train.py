"""The one training loop: every method trains through `train_and_evaluate`.

Sections: the jitted train step; logging; the loop (sample grids, checkpoints,
resume, preemption, non-finite loss); evaluation at the end.
"""

import functools
import json
import math
import os
import signal
import socket
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from consistency_jax import checkpointing, host_memory, parallel, teachers
from consistency_jax import workdir as workdir_lib
from consistency_jax.data import pipeline
from consistency_jax.errors import UserError
from consistency_jax.evaluation import generate
from consistency_jax.experiment import ConfigError, Experiment, create_experiment, validate_config
from consistency_jax.methods.base import Method
from consistency_jax.state import TrainState, ema_decays, update_emas
from consistency_jax.visualization import save_image_grid


# ----------------------------------------------------------------------------
# The train step.
# ----------------------------------------------------------------------------


def train_step(state: TrainState, batch: dict, *, method: Method, optimizer: optax.GradientTransformation,
               ema_rates: tuple[float, ...], ema_sigma_rels: tuple[float, ...] = ()) -> tuple[TrainState, dict]:
    """One training step of the method, then the evaluation EMAs.

    A non-finite loss or gradient norm leaves the whole state (params,
    optimizer and method state, EMAs) at its last good values; only the step
    counter moves, and the host then stops the run.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    updated, metrics = method.update(state, batch, rng, optimizer)
    decays = ema_decays(state.step, ema_rates, ema_sigma_rels)
    updated = updated.replace(ema_params=update_emas(state.ema_params, updated.params, decays))
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
    return new_state.replace(step=state.step + 1), metrics


def jit_train_step(experiment: Experiment) -> Callable:
    step = functools.partial(train_step, method=experiment.method, optimizer=experiment.optimizer,
                             ema_rates=tuple(experiment.config.training.ema_rates),
                             ema_sigma_rels=tuple(experiment.config.training.ema_sigma_rels))
    return jax.jit(step,
                   in_shardings=(experiment.state_shardings, parallel.batch_sharding(experiment.mesh)),
                   out_shardings=(experiment.state_shardings, parallel.replicated(experiment.mesh)),
                   donate_argnums=0)


# ----------------------------------------------------------------------------
# Logging.
# ----------------------------------------------------------------------------


class MetricsLog:
    """TensorBoard scalars, a JSON-lines file in the workdir and the log; process 0 writes the files.

    The event file is written with tensorboard's own writer, not clu's, whose
    metric_writers package imports TensorFlow (~0.5 GB of the training
    process's peak RSS on CPU); the log line has clu's LoggingWriter format.
    """

    def __init__(self, workdir: str):
        self._is_writer = jax.process_index() == 0
        self._path = os.path.join(workdir, "metrics.jsonl")
        self._events = None
        if self._is_writer:
            # tensorboard's EventFileWriter would import TensorFlow (for gfile) where it is installed.
            from tensorboard.summary.writer.record_writer import RecordWriter

            name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}"
            self._events = RecordWriter(open(os.path.join(workdir, name), "ab"))
            self._add_event(file_version="brain.Event:2")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        scalars = {k: float(v) for k, v in scalars.items()}
        logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in sorted(scalars.items())))
        if self._is_writer:
            from tensorboard.compat.proto import summary_pb2

            self._add_event(step=step, summary=summary_pb2.Summary(
                value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]))
            with open(self._path, "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")

    def _add_event(self, **fields) -> None:
        from tensorboard.compat.proto import event_pb2

        self._events.write(event_pb2.Event(wall_time=time.time(), **fields).SerializeToString())

    def flush(self) -> None:
        if self._events is not None:
            self._events.flush()


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss or gradient norm became NaN/inf; the run stops without applying or saving that step."""


def _check_finite(step: int, metrics: dict[str, float]) -> None:
    bad = [name for name in ("loss", "grad_norm") if not math.isfinite(metrics[name])]
    if bad:
        raise NonFiniteLossError(
            f"Non-finite {' and '.join(f'{name} ({metrics[name]})' for name in bad)} at step {step}. "
            f"The update of that step was not applied "
            f"and no checkpoint after step {step - 1} was written; lower the learning rate, enable "
            f"config.optimizer.grad_clip_norm, or check the data.")


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop polls, so the run can save and exit cleanly.

    Single process only. With several processes, JAX's own SIGTERM handler
    (installed by jax.distributed.initialize) must stay in place: it makes every
    process stop at the same step through checkpointer.reached_preemption,
    whereas a flag on the signalled process alone would leave the others
    waiting in the next collective.
    """

    def __init__(self):
        self.raised = False
        self._installed = jax.process_count() == 1
        if self._installed:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint at the current step, then exiting.")
        self.raised = True

    def restore(self):
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (resuming from the workdir's latest intact checkpoint if any) and evaluates at the end."""
    validate_config(config, "train")
    workdir_lib.check_usable(workdir)
    experiment = create_experiment(config, workdir=workdir)
    train = config.training
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                              keep=train.keep_checkpoints, keep_every=train.keep_every)
    try:
        state, data = _resume_or_start(experiment, checkpointer, workdir)
    except BaseException:
        checkpointer.close()
        raise
    if experiment.teacher_config is not None:
        teachers.save_snapshot(experiment.teacher_config, workdir)
    step = int(state.step)
    if step < train.num_steps and jax.process_index() == 0:
        workdir_lib.record_config(workdir, config, step)
    log = MetricsLog(workdir)

    train_step_fn = jit_train_step(experiment)
    sigterm = _SigtermFlag()
    pending = None  # (step, device metrics) of the last dispatched step, checked one step late
    window: list[dict[str, float]] = []
    window_start = time.time()
    untimed, first_step = 0, True  # the window's steps left out of its rate: the first one includes the compile
    try:
        while step < train.num_steps:
            batch = parallel.global_batch(next(data), experiment.mesh)
            state, metrics = train_step_fn(state, batch)
            if first_step:  # the ETA comes from steady-state steps, not from the compile
                jax.block_until_ready(metrics)
                window_start, untimed, first_step = time.time(), 1, False
            step += 1
            # Fetching the previous step's metrics keeps the device queue one step ahead.
            if pending is not None:
                window.append(_fetch(*pending))
            pending = (step, metrics)
            at_end = step == train.num_steps
            stop = sigterm.raised or checkpointer.reached_preemption(step)
            if _every(step, train.log_every) or at_end or stop:
                window.append(_fetch(*pending))
                pending = None
                window_start = _log_window(log, step, train.num_steps, window, window_start, untimed)
                host_memory.release_free_memory()
                window, untimed = [], 0
            checkpointer.check_for_errors()  # a failed background save stops the run within a step
            if train.sample_every and (_every(step, train.sample_every) or at_end):
                _write_sample_grid(experiment, state, workdir, step)
            if _every(step, train.checkpoint_every) or at_end or stop:
                if pending is not None:
                    window.append(_fetch(*pending))
                    pending = None
                checkpointer.save(step, state, data.get_state(), force=stop or at_end)
            if stop:
                logging.warning("Preempted: checkpoint written at step %d; exiting.", step)
                break
            if _every(step, config.eval.every_steps) and not at_end:
                _evaluate(experiment, state, workdir, step, log, with_baselines=False)
    finally:
        sigterm.restore()
        checkpointer.close()  # waits for the last save; raises if it failed
        log.flush()

    if config.eval.at_end and step == train.num_steps and not sigterm.raised:
        _evaluate(experiment, state, workdir, step, log, with_baselines=True)
        log.flush()
    return state


def _every(step: int, interval: int) -> bool:
    """Whether a periodic action with this interval falls on `step`; an interval of 0 never does."""
    return interval > 0 and step % interval == 0


def _resume_or_start(experiment: Experiment, checkpointer: checkpointing.Checkpointer,
                     workdir: str) -> tuple[TrainState, pipeline.TrainIterator]:
    """The state and data iterator to train from: the newest intact checkpoint's, or fresh ones.

    A resumed run is compared with the run's config.json first: fields that
    change the train state's arrays stop it (orbax would fail deep inside the
    restore), other differences are logged; training.num_steps below the
    checkpoint's step is an error (nothing would train).
    """
    config, train = experiment.config, experiment.config.training
    data = pipeline.create_train_iterator(config.data, global_batch_size=train.batch_size, seed=config.seed)
    if checkpointer.latest_step() is None:
        return experiment.create_state(), data
    saved = workdir_lib.saved_config(workdir)
    changes = workdir_lib.differences(saved, workdir_lib.config_as_dict(config)) if saved else []
    try:
        step, state, data_state = checkpointer.restore(experiment.abstract_state())
    except checkpointing.IncompatibleCheckpointError as e:
        raise checkpointing.IncompatibleCheckpointError(
            f"{e} {workdir_lib.describe_differences(workdir, config)}") from e
    if step > train.num_steps:
        raise ConfigError(
            f"config.training.num_steps={train.num_steps}, but the checkpoint in {workdir} is at step {step}: there "
            f"is nothing to train. Set --config.training.num_steps above {step} to continue training, or use "
            f"--mode=sample / --mode=eval for this checkpoint.")
    try:
        data.set_state(data_state)
    except ValueError as e:
        raise ConfigError(f"{e} {workdir_lib.describe_differences(workdir, config)}") from e
    if changes:
        logging.warning("Resuming %s at step %d with a config that differs from the run's %s: %s. The previous "
                        "configs stay in %s/.", workdir, step, workdir_lib.CONFIG_NAME,
                        workdir_lib.format_differences(changes), workdir_lib.HISTORY_DIR)
    logging.info("Resumed from the checkpoint at step %d in %s.", step, workdir)
    return state, data


def _evaluate(experiment: Experiment, state: TrainState, workdir: str, step: int, log: MetricsLog,
              with_baselines: bool) -> None:
    """Logs the metrics of `state` and keeps it in <workdir>/best if its FID is the lowest so far."""
    report = generate.evaluate_state(experiment, state, workdir, step, with_baselines=with_baselines)
    log.write(step, {**report, **generate.record_evaluation(experiment, state, workdir, step, report)})


def _fetch(step: int, metrics: dict) -> dict[str, float]:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    _check_finite(step, values)
    return values


def _log_window(log: MetricsLog, step: int, num_steps: int, window: list[dict[str, float]],
                window_start: float, untimed: int = 0) -> float:
    """Logs the window's mean metrics and its rate; `untimed` leading steps (the compile) are not in the rate."""
    now = time.time()
    timed = len(window) - untimed
    rate = timed / max(now - window_start, 1e-9) if timed > 0 else 0.0
    means = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
    log.write(step, {**means, "steps_per_sec": rate})
    eta = (num_steps - step) / rate if rate > 0 else float("inf")
    logging.info("step %d/%d  loss %.5f  %.2f steps/s  ETA %s", step, num_steps, means["loss"], rate,
                 time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?")
    return now


def _write_sample_grid(experiment: Experiment, state: TrainState, workdir: str, step: int) -> None:
    config = experiment.config
    params = generate.sampling_params(state, config)
    images, _ = generate.generate(experiment, params, min(config.sampling.num_samples, 64), config.sampling.num_steps,
                         config.seed, config.sampling.batch_size)
    if jax.process_index() == 0:
        save_image_grid(images, os.path.join(workdir, "samples", f"step_{step:08d}.png"))
