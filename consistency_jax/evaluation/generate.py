"""Samples and metrics of a train state: --mode=sample, --mode=eval and evaluation during training.

Generation is jitted, sharded over the mesh and deterministic for a seed; with
a chunk directory it is resumable (chunks on disk are reused, see ChunkStore).
Evaluations during training keep the best-FID state in <workdir>/best.
"""

import json
import os
import shutil
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from consistency_jax import checkpointing, parallel, samplers
from consistency_jax import workdir as workdir_lib
from consistency_jax.data import pipeline
from consistency_jax.errors import UserError
from consistency_jax.evaluation import extractors, metrics, reference_stats
from consistency_jax.experiment import Experiment, create_experiment, validate_config
from consistency_jax.state import TrainState
from consistency_jax.visualization import save_image_grid

# Seconds between progress lines while generating samples.
PROGRESS_EVERY_S = 30.0


class Weights(NamedTuple):
    """The arrays sampling needs from a checkpoint (a TrainState has the same fields)."""

    step: jax.Array
    params: Any
    ema_params: tuple[Any, ...]


def select_params(state: TrainState | Weights, ema_rates: tuple[float, ...], ema_rate: float) -> Any:
    """ema_rate < 0: the first EMA (raw params if none); 0: raw params; else that EMA."""
    if ema_rate == 0 or (ema_rate < 0 and not ema_rates):
        return state.params
    if ema_rate < 0:
        return state.ema_params[0]
    if ema_rate not in ema_rates:
        raise ValueError(f"No EMA with rate {ema_rate} in this run; it keeps {tuple(ema_rates)} "
                         f"(0 selects the raw params).")
    return state.ema_params[list(ema_rates).index(ema_rate)]


class NonFiniteSamplesError(UserError, FloatingPointError):
    """The sampler produced NaN/inf: no images are written (they would be all black or all white)."""


def sampling_params(state: TrainState | Weights, config: ml_collections.ConfigDict) -> Any:
    """The params config.sampling names: a power-function EMA (ema_sigma_rel > 0) or select_params's choice.

    A run that keeps power-function EMAs only samples from the first of them by default (ema_rate -1).
    """
    sigma_rel = sampling_sigma_rel(config)
    if sigma_rel:
        sigma_rels = list(config.training.ema_sigma_rels)
        if sigma_rel not in sigma_rels:
            raise ValueError(f"No power-function EMA with sigma_rel {sigma_rel} in this run; it keeps "
                             f"{tuple(sigma_rels)} (config.training.ema_sigma_rels).")
        return state.ema_params[len(config.training.ema_rates) + sigma_rels.index(sigma_rel)]
    return select_params(state, tuple(config.training.ema_rates), config.sampling.ema_rate)


def sampling_sigma_rel(config: ml_collections.ConfigDict) -> float:
    """The sigma_rel of the power-function EMA that sampling uses; 0 when it uses another."""
    sampling, train = config.sampling, config.training
    sigma_rels = tuple(train.get("ema_sigma_rels", ()))
    if sampling.get("ema_sigma_rel", 0.0):
        return sampling.ema_sigma_rel
    if sampling.ema_rate < 0 and not train.ema_rates and sigma_rels:
        return sigma_rels[0]
    return 0.0


def make_sampler(experiment: Experiment, num_steps: int) -> tuple[samplers.Sampler, Callable]:
    """The method's `num_steps` sampler and its jitted (params, rng, labels) -> (uint8 images, all finite) form.

    The batch is sharded over the mesh. Compiled samplers are kept on the
    experiment by key: training draws sample grids and evaluations many times,
    and a new jit of the same sampler would compile again.
    """
    spec = experiment.method.sampler(num_steps)
    if spec.key not in experiment.jitted_samplers:
        batch_sharding = parallel.batch_sharding(experiment.mesh)

        def sample(params, rng, labels):
            shape = (labels.shape[0], *experiment.image_shape)
            cond = labels if experiment.num_classes > 0 else None
            images = jax.lax.with_sharding_constraint(spec.sample(params, rng, shape, cond), batch_sharding)
            return samplers.to_uint8(images), jnp.all(jnp.isfinite(images))

        replicated = parallel.replicated(experiment.mesh)
        optimized = experiment.config.sampling.xla_optimizations
        compiler_options = None if optimized else parallel.run_once_compiler_options()
        experiment.jitted_samplers[spec.key] = jax.jit(sample, out_shardings=(batch_sharding, replicated),
                                                       compiler_options=compiler_options)
    return spec, experiment.jitted_samplers[spec.key]


def generate(experiment: Experiment, params: Any, num_samples: int, num_steps: int, seed: int,
             batch_size: int, chunk_dir: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """num_samples uint8 images (and labels when class-conditional), deterministic for a seed.

    Images come in chunks of one sampler batch (batch_size rounded to the mesh
    size); chunk i is drawn with fold_in(PRNGKey(seed), i) alone, so it does not
    depend on num_samples, on the device count or on which chunks were made
    before it. With a chunk_dir every chunk is also written there as it is
    made, and chunks already there are loaded instead of sampled again: an
    interrupted run resumes where it stopped and returns the same images.
    """
    if num_samples <= 0:
        raise ValueError(f"generate needs num_samples > 0, got {num_samples}.")
    chunk_size = max(experiment.mesh.size, batch_size - batch_size % experiment.mesh.size)
    num_chunks = -(-num_samples // chunk_size)
    spec, sampler = make_sampler(experiment, num_steps)
    store = None
    if chunk_dir is not None:
        manifest = {
            "chunk_size": chunk_size,
            "image_shape": list(experiment.image_shape),
            "num_classes": experiment.num_classes,
            "num_steps": num_steps,
            "sampler": repr(spec.key),
            "seed": seed,
            "params_fingerprint": params_fingerprint(params),
        }
        store = ChunkStore(chunk_dir, manifest)
    present = store.present(num_chunks) if store else np.zeros(num_chunks, bool)
    progress = _Progress(f"{num_steps}-step samples", num_samples, chunk_size, int(present.sum()))
    images, labels = [], []
    for index in range(num_chunks):
        if present[index]:
            chunk = store.load(index)
        else:
            chunk = _sample_chunk(experiment, sampler, params, seed, index, chunk_size)
            if chunk is None:
                raise NonFiniteSamplesError(
                    f"The {num_steps}-step sampler produced NaN/inf values (chunk {index} of {num_chunks}, seed "
                    f"{seed}); no images were written. The weights sampled from are broken: check the run's loss "
                    f"in metrics.jsonl, or sample another checkpoint (--step) or EMA (config.sampling.ema_rate).")
            if store:
                store.write(index, *chunk)
            progress.made_one()
        images.append(chunk[0])
        labels.append(chunk[1])
    progress.done()
    images = np.concatenate(images)[:num_samples]
    labels = np.concatenate(labels)[:num_samples] if experiment.num_classes > 0 else None
    return images, labels


def _sample_chunk(experiment: Experiment, sampler: Callable, params: Any, seed: int, index: int,
                  chunk_size: int) -> tuple[np.ndarray, np.ndarray | None] | None:
    """One chunk of images (and labels), or None if the sampler's output was not finite."""
    # Keys and labels go in as numpy: identical on every process, so jit takes them as replicated.
    batch_rng, label_rng = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), index))
    if experiment.num_classes > 0:
        labels = np.asarray(jax.random.randint(label_rng, (chunk_size,), 0, experiment.num_classes), np.int32)
    else:
        labels = np.zeros((chunk_size,), np.int32)
    images, finite = sampler(params, np.asarray(batch_rng), labels)
    if not bool(finite):
        return None
    # Every process gets the whole chunk (the metrics run on each process's own devices).
    images = np.asarray(multihost_utils.process_allgather(images, tiled=True))
    return images, (labels if experiment.num_classes > 0 else None)


@jax.jit
def _sum_of_magnitudes(params: Any) -> jax.Array:
    return sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in jax.tree.leaves(params))


def params_fingerprint(params: Any) -> str:
    """A short string that changes when the params do: chunks of other params are never reused."""
    total = np.asarray(multihost_utils.process_allgather(_sum_of_magnitudes(params), tiled=True), np.float32)
    shapes = [tuple(x.shape) for x in jax.tree.leaves(params)]
    return f"{total.item():.9e}|{len(shapes)} arrays|{sum(int(np.prod(s)) for s in shapes)} values"


class ChunkStore:
    """Sample chunks as chunk_<index>.npz files in a directory, with a manifest of what made them.

    Process 0 reads and writes the files and broadcasts what it read, so the
    directory need not be visible to the other processes. Files are written
    whole and renamed into place: a killed run never leaves a half chunk under
    a chunk's name. Chunks made with other settings (manifest mismatch) or of
    the wrong shape are discarded and sampled again.
    """

    def __init__(self, directory: str, manifest: dict):
        self.directory = directory
        self.manifest = manifest
        self._is_writer = jax.process_index() == 0
        if self._is_writer:
            self._start_directory()

    def _start_directory(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, "manifest.json")
        if os.path.exists(path):
            with open(path) as f:
                previous = json.load(f)
            if previous == self.manifest:
                return
            stale = [name for name in os.listdir(self.directory) if name.endswith(".npz")]
            logging.warning("Sample chunks in %s were made with other settings (%s); discarding %d of them.",
                            self.directory, _manifest_difference(previous, self.manifest), len(stale))
            for name in stale:
                os.remove(os.path.join(self.directory, name))
        _write_atomically(path, lambda f: json.dump(self.manifest, f, indent=2), binary=False)

    def _path(self, index: int) -> str:
        return os.path.join(self.directory, f"chunk_{index:06d}.npz")

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """The chunk if its file holds chunk_size images of the right shape (and labels when conditional)."""
        path = self._path(index)
        if not os.path.exists(path):
            return None
        size = self.manifest["chunk_size"]
        expected = (size, *self.manifest["image_shape"])
        try:
            with np.load(path) as stored:
                images = stored["images"]
                labels = stored["labels"] if "labels" in stored.files else None
        except (OSError, ValueError, KeyError) as e:
            logging.warning("Sample chunk %s is unreadable (%s); sampling it again.", path, e)
            return None
        conditional = self.manifest["num_classes"] > 0
        if (images.shape != expected or images.dtype != np.uint8
                or conditional != (labels is not None) or (conditional and labels.shape != (size,))):
            logging.warning("Sample chunk %s holds images %s %s (expected uint8 %s); sampling it again.",
                            path, images.dtype, images.shape, expected)
            return None
        return images, labels

    def present(self, num_chunks: int) -> np.ndarray:
        """Which of chunks 0..num_chunks-1 are on disk and valid; the same answer on every process."""
        found = np.asarray([self._is_writer and self._read(i) is not None for i in range(num_chunks)], bool)
        return np.asarray(multihost_utils.broadcast_one_to_all(found), bool)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        size, shape = self.manifest["chunk_size"], tuple(self.manifest["image_shape"])
        chunk = self._read(index) if self._is_writer else None
        images = chunk[0] if chunk else np.zeros((size, *shape), np.uint8)
        images = np.asarray(multihost_utils.broadcast_one_to_all(images))
        if self.manifest["num_classes"] == 0:
            return images, None
        labels = chunk[1] if chunk else np.zeros((size,), np.int32)
        return images, np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(labels, np.int32)))

    def write(self, index: int, images: np.ndarray, labels: np.ndarray | None) -> None:
        if not self._is_writer:
            return
        arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
        _write_atomically(self._path(index), lambda f: np.savez(f, **arrays), binary=True)

    def remove(self) -> None:
        """Deletes the directory once its samples are used up (evaluations keep metrics, not images)."""
        if self._is_writer:
            shutil.rmtree(self.directory, ignore_errors=True)


def _manifest_difference(old: dict, new: dict) -> str:
    keys = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)} -> {new.get(k)}" for k in keys)


def _write_atomically(path: str, write: Callable, *, binary: bool) -> None:
    partial = path + ".partial"
    with open(partial, "wb" if binary else "w") as f:
        write(f)
    os.replace(partial, path)


class _Progress:
    """Log lines on process 0 with images done, rate and ETA: at most one every PROGRESS_EVERY_S, and the last."""

    def __init__(self, what: str, num_samples: int, chunk_size: int, chunks_on_disk: int):
        self._what, self._num_samples, self._chunk_size = what, num_samples, chunk_size
        self._num_chunks = -(-num_samples // chunk_size)
        self._done = self._resumed = chunks_on_disk
        self._start = self._last_log = time.time()
        if chunks_on_disk and jax.process_index() == 0:
            logging.info("%s: resuming with %d of %d chunks already on disk.", what, chunks_on_disk,
                         self._num_chunks)

    def made_one(self) -> None:
        self._done += 1
        now = time.time()
        if now - self._last_log >= PROGRESS_EVERY_S or self._done == self._num_chunks:
            self._last_log = now
            self._log(now)

    def _log(self, now: float) -> None:
        if jax.process_index() != 0:
            return
        rate = (self._done - self._resumed) * self._chunk_size / max(now - self._start, 1e-9)
        left = (self._num_chunks - self._done) * self._chunk_size / max(rate, 1e-9)
        logging.info("%s: chunk %d/%d (%d/%d images), %.1f images/s, ETA %s", self._what, self._done,
                     self._num_chunks, min(self._done * self._chunk_size, self._num_samples), self._num_samples,
                     rate, time.strftime("%H:%M:%S", time.gmtime(left)))

    def done(self) -> None:
        if self._done == self._resumed and jax.process_index() == 0:
            logging.info("%s: all %d chunks were already on disk.", self._what, self._done)


# ----------------------------------------------------------------------------
# Restoring a checkpoint for sampling and evaluation.
# ----------------------------------------------------------------------------


def restore_weights(experiment: Experiment, workdir: str, step: int | None) -> Weights:
    """The step, params and EMAs of a checkpoint (the latest intact one by default), without optimizer or method state.

    The run's checkpoints are opened read-only: sampling beside a running
    training job never renames or deletes anything there.
    """
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise checkpointing.CheckpointError(f"No checkpoint in {directory}: train first (--mode=train).")
    checkpointer = checkpointing.Checkpointer(directory, read_only=True)
    try:
        if checkpointer.latest_step() is None:
            raise checkpointing.CheckpointError(f"No checkpoint in {directory}: train first (--mode=train).")
        if step is not None and step not in checkpointer.all_steps():
            raise checkpointing.CheckpointError(f"No checkpoint at step {step} in {directory}; available steps: "
                                                f"{checkpointer.all_steps()}.")
        abstract = experiment.abstract_state()
        try:
            _, fields = checkpointer.restore_fields(
                {"step": abstract.step, "params": abstract.params, "ema_params": abstract.ema_params}, step)
        except checkpointing.IncompatibleCheckpointError as e:
            raise checkpointing.IncompatibleCheckpointError(
                f"{e} {workdir_lib.describe_differences(workdir, experiment.config)}") from e
    finally:
        checkpointer.close()
    return Weights(**fields)


def run_sample(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> str:
    """--mode=sample: writes config.sampling.num_samples samples to .npz (uint8 NHWC) and a PNG grid.

    Samples are made in chunks under samples/chunks_<stem>/ first, so an
    interrupted run picks up where it stopped; the chunks go once the .npz is written.
    """
    validate_config(config, "sample")
    experiment = create_experiment(config, workdir=workdir)
    state = restore_weights(experiment, workdir, step)
    sampling = config.sampling
    params = sampling_params(state, config)
    name = f"samples_step{int(state.step)}_{sampling.num_steps}steps"
    chunk_dir = os.path.join(workdir, "samples", f"chunks_{name}_seed{config.seed}")
    images, labels = generate(experiment, params, sampling.num_samples, sampling.num_steps, config.seed,
                              sampling.batch_size, chunk_dir=chunk_dir)
    stem = os.path.join(workdir, "samples", name)
    if jax.process_index() == 0:
        arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
        _write_atomically(stem + ".npz", lambda f: np.savez(f, **arrays), binary=True)
        save_image_grid(images[:256], stem + ".png")
        shutil.rmtree(chunk_dir, ignore_errors=True)
        logging.info("Wrote %d samples (%d network evaluations each) to %s.npz and a grid to %s.png", len(images),
                     experiment.method.sampler(sampling.num_steps).network_evaluations, stem, stem)
    return stem + ".npz"


# ----------------------------------------------------------------------------
# Evaluation: feature-space metrics of samples at each step count.
# ----------------------------------------------------------------------------


def evaluate_state(experiment: Experiment, state: TrainState | Weights, workdir: str, step: int,
                   with_baselines: bool = False) -> dict[str, float]:
    """Metrics of samples at each of config.eval.steps against config.eval.reference (the training set).

    With baselines, the same metrics for held-out real images and for 1-step
    samples of the untrained network: the floor and ceiling a result sits between.
    Writes eval/step_<step>.json and prints a table on process 0.
    """
    config = experiment.config
    ev = config.eval
    cache_dir = os.path.join(workdir, "eval_cache")
    extractor = extractors.create_feature_extractor(ev, cache_dir=cache_dir, data_config=config.data)
    reference = reference_stats.evaluation_reference(extractor, config, cache_dir)
    ema_rate = config.sampling.ema_rate
    params = sampling_params(state, config)
    seed = config.seed + 1
    eval_dir = os.path.join(workdir, "eval")
    chunk_dirs = []

    def samples_of(params, num_steps, label):
        chunk_dirs.append(os.path.join(eval_dir, f"samples_{label}_{num_steps}steps_seed{seed}"))
        return generate(experiment, params, ev.num_samples, num_steps, seed, config.sampling.batch_size,
                        chunk_dir=chunk_dirs[-1])[0]

    rows: dict[str, dict[str, float]] = {}
    for num_steps in ev.steps:
        images = samples_of(params, num_steps, f"{step:08d}")
        rows[f"samples_{num_steps}step"] = metrics.compute_metrics(extractor, images, reference)
        if jax.process_index() == 0:
            save_image_grid(images[:64], os.path.join(eval_dir, f"step_{step:08d}_{num_steps}step.png"))
    if with_baselines:
        heldout = pipeline.heldout_split(config.data)
        if heldout:
            real, _ = pipeline.load_eval_images(config.data, heldout, ev.num_samples)
            rows[f"real_{heldout}"] = metrics.compute_metrics(extractor, real, reference)
        untrained = jax.jit(experiment.init_params, out_shardings=experiment.state_shardings.params,
                            compiler_options=parallel.run_once_compiler_options())(jax.random.PRNGKey(config.seed))
        images = samples_of(untrained, 1, "untrained")
        rows["untrained_1step"] = metrics.compute_metrics(extractor, images, reference)
    result = {
        "checkpoint_step": step,
        "feature_extractor": extractor.name,
        "num_samples": ev.num_samples,
        "steps": list(ev.steps),
        "ema_rate": _ema_rate_used(config.training.ema_rates, ema_rate),
        "reference": {"config": ev.reference, "source": reference.source, "num_examples": reference.num_examples},
        "clip_denoised": bool(config.sampling.clip_denoised),
        **({"ema_sigma_rel": sampling_sigma_rel(config)} if sampling_sigma_rel(config) else {}),
        "sigmas": {n: list(experiment.method.sampler(n).sigmas) for n in ev.steps},
        "network_evaluations": {n: experiment.method.sampler(n).network_evaluations for n in ev.steps},
        "results": rows,
    }
    if jax.process_index() == 0:
        os.makedirs(eval_dir, exist_ok=True)
        path = os.path.join(eval_dir, f"step_{step:08d}.json")
        _write_atomically(path, lambda f: json.dump(result, f, indent=2), binary=False)
        # The samples were only kept to resume an interrupted evaluation; the metrics are in the JSON now.
        for chunk_dir in chunk_dirs:
            shutil.rmtree(chunk_dir, ignore_errors=True)
        print(format_report(result))
        logging.info("Wrote the evaluation to %s", path)
    return {f"{name}/{key}": value for name, row in rows.items() for key, value in row.items()}


def best_metric_name(config: ml_collections.ConfigDict) -> str:
    """The metric the best checkpoint is chosen by: FID of the fewest-step sampler evaluated (1 step by default)."""
    return f"samples_{min(config.eval.steps)}step/fid"


def _best_checkpointer(workdir: str) -> checkpointing.Checkpointer:
    """<workdir>/best: the one state with the lowest FID so far, verified like every checkpoint."""
    return checkpointing.Checkpointer(os.path.join(workdir, "best"), keep=1, best_metric="fid", async_save=False)


def record_evaluation(experiment: Experiment, state: TrainState, workdir: str, step: int,
                      evaluation: dict[str, float]) -> dict[str, float]:
    """Keeps the state with the lowest FID so far in <workdir>/best; returns {'best_fid': ...} to log.

    `evaluation` is what evaluate_state returned for this state. The state is
    saved (synchronously, by every process) only when its FID beats the stored
    best; the previous best is then deleted. Restore it with restore_best_state.
    """
    name = best_metric_name(experiment.config)
    if name not in evaluation:
        raise KeyError(f"The evaluation has no {name!r} to choose the best checkpoint by; it has "
                       f"{sorted(evaluation)}.")
    fid = float(evaluation[name])
    checkpointer = _best_checkpointer(workdir)
    try:
        best_step = checkpointer.best_step()
        best_fid = float(checkpointer.metrics(best_step)["fid"]) if best_step is not None else float("inf")
        improved = np.isfinite(fid) and fid < best_fid and step not in checkpointer.all_steps()
        # One decision for all processes: saving is collective.
        if bool(multihost_utils.broadcast_one_to_all(np.asarray(improved))):
            checkpointer.save(step, state, force=True, metrics={"fid": fid})
            checkpointer.wait()
            logging.info("New best %s %.4f at step %d (previous best %.4f); saved to %s/best.", name, fid, step,
                         best_fid, workdir)
            best_fid = fid
    finally:
        checkpointer.close()
    return {"best_fid": best_fid}


def restore_best_state(experiment: Experiment, workdir: str) -> tuple[int, TrainState]:
    """(step, state) of the best checkpoint that record_evaluation kept in <workdir>/best."""
    checkpointer = _best_checkpointer(workdir)
    try:
        step = checkpointer.best_step()
        if step is None:
            raise FileNotFoundError(f"No best checkpoint in {workdir}/best: it is written by evaluations during "
                                    f"training (config.eval.every_steps > 0).")
        _, state, _ = checkpointer.restore(experiment.abstract_state(), step)
    finally:
        checkpointer.close()
    return step, state


def _ema_rate_used(ema_rates, ema_rate: float) -> float:
    if ema_rate < 0:
        return float(ema_rates[0]) if ema_rates else 0.0
    return float(ema_rate)


def format_report(result: dict) -> str:
    rows = result["results"]
    keys = sorted({k for row in rows.values() for k in row})
    lines = [f"Evaluation at step {result['checkpoint_step']}: {result['num_samples']} images per row, "
             f"{result['feature_extractor']} features, EMA "
             f"{('sigma_rel %g' % result['ema_sigma_rel']) if 'ema_sigma_rel' in result else result['ema_rate']}, "
             f"reference = {result['reference']['source']}",
             "Network evaluations per sample: " + ", ".join(
                 f"{n} steps: {nfe}" if int(n) > 1 else f"{n} step: {nfe}"
                 for n, nfe in result.get("network_evaluations", {}).items()),
             f"{'':24s}" + "".join(f"{k:>14s}" for k in keys)]
    for name, row in rows.items():
        lines.append(f"{name:24s}" + "".join(f"{row.get(k, float('nan')):14.4f}" for k in keys))
    return "\n".join(lines)


def run_eval(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict[str, float]:
    """--mode=eval: metrics of a checkpoint, written to <workdir>/eval/step_<step>.json."""
    validate_config(config, "eval")
    experiment = create_experiment(config, workdir=workdir)
    state = restore_weights(experiment, workdir, step)
    return evaluate_state(experiment, state, workdir, int(state.step))
