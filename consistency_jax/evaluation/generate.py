"""Samples and metrics of a train state: --mode=sample, --mode=eval and evaluation during training.

Generation is jitted, sharded over the mesh and deterministic for a seed.
"""

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from consistency_jax import checkpointing, parallel, samplers
from consistency_jax.data import pipeline
from consistency_jax.evaluation import extractors, metrics, reference_stats
from consistency_jax.experiment import Experiment, create_experiment, validate_config
from consistency_jax.state import TrainState
from consistency_jax.visualization import save_image_grid




def select_params(state: TrainState, ema_rates: tuple[float, ...], ema_rate: float) -> Any:
    """ema_rate < 0: the first EMA (raw params if none); 0: raw params; else that EMA."""
    if ema_rate == 0 or (ema_rate < 0 and not ema_rates):
        return state.params
    if ema_rate < 0:
        return state.ema_params[0]
    if ema_rate not in ema_rates:
        raise ValueError(f"No EMA with rate {ema_rate} in this run; it keeps {tuple(ema_rates)} "
                         f"(0 selects the raw params).")
    return state.ema_params[list(ema_rates).index(ema_rate)]


def make_sampler(experiment: Experiment, num_steps: int) -> Callable:
    """A jitted (params, rng, labels) -> uint8 images sampler whose batch is sharded over the mesh."""
    sigmas = jnp.asarray(samplers.sampling_sigmas(experiment.config, num_steps), jnp.float32)
    batch_sharding = parallel.batch_sharding(experiment.mesh)

    def sample(params, rng, labels):
        shape = (labels.shape[0], *experiment.image_shape)
        cond = labels if experiment.num_classes > 0 else None
        images = samplers.consistency_sample(experiment.fn, params, rng, shape, sigmas, cond)
        return samplers.to_uint8(jax.lax.with_sharding_constraint(images, batch_sharding))

    return jax.jit(sample, out_shardings=batch_sharding)


def generate(experiment: Experiment, params: Any, num_samples: int, num_steps: int, seed: int,
             batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """num_samples uint8 images (and labels when class-conditional), deterministic for a seed."""
    batch_size = max(experiment.mesh.size, batch_size - batch_size % experiment.mesh.size)
    sampler = make_sampler(experiment, num_steps)
    rng = jax.random.PRNGKey(seed)
    images, labels = [], []
    for start in range(0, num_samples, batch_size):
        batch_rng, label_rng = jax.random.split(jax.random.fold_in(rng, start))
        label_batch = (jax.random.randint(label_rng, (batch_size,), 0, experiment.num_classes)
                       if experiment.num_classes > 0 else jnp.zeros((batch_size,), jnp.int32))
        images.append(np.asarray(jax.device_get(sampler(params, batch_rng, label_batch))))
        labels.append(np.asarray(label_batch))
    images = np.concatenate(images)[:num_samples]
    labels = np.concatenate(labels)[:num_samples] if experiment.num_classes > 0 else None
    return images, labels


# ----------------------------------------------------------------------------
# Restoring a checkpoint for sampling and evaluation.
# ----------------------------------------------------------------------------


def restore_state(experiment: Experiment, workdir: str, step: int | None) -> TrainState:
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1_000_000)
    try:
        if checkpointer.latest_step() is None:
            raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints: train first (--mode=train).")
        if step is not None and step not in checkpointer.all_steps():
            raise ValueError(f"No checkpoint at step {step} in {workdir}/checkpoints; "
                             f"available steps: {checkpointer.all_steps()}.")
        _, state, _ = checkpointer.restore(experiment.abstract_state(), step)
    finally:
        checkpointer.close()
    return state


def run_sample(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> str:
    """--mode=sample: writes config.sampling.num_samples samples to .npz (uint8 NHWC) and a PNG grid."""
    validate_config(config)
    experiment = create_experiment(config)
    state = restore_state(experiment, workdir, step)
    sampling = config.sampling
    params = select_params(state, tuple(config.training.ema_rates), sampling.ema_rate)
    images, labels = generate(experiment, params, sampling.num_samples, sampling.num_steps, config.seed,
                              sampling.batch_size)
    stem = os.path.join(workdir, "samples", f"samples_step{int(state.step)}_{sampling.num_steps}steps")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(stem), exist_ok=True)
        arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
        np.savez(stem + ".npz", **arrays)
        save_image_grid(images[:256], stem + ".png")
        logging.info("Wrote %d samples to %s.npz and a grid to %s.png", len(images), stem, stem)
    return stem + ".npz"


# ----------------------------------------------------------------------------
# Evaluation: feature-space metrics of samples at each step count.
# ----------------------------------------------------------------------------


def evaluate_state(experiment: Experiment, state: TrainState, workdir: str, step: int,
                   with_baselines: bool = False) -> dict[str, float]:
    """Metrics of samples at each of config.eval.steps against the training-set statistics.

    With baselines, the same metrics for held-out real images and for 1-step
    samples of the untrained network: the floor and ceiling a result sits between.
    Writes eval/step_<step>.json and prints a table on process 0.
    """
    config = experiment.config
    ev = config.eval
    cache_dir = os.path.join(workdir, "eval_cache")
    extractor = extractors.create_feature_extractor(ev, cache_dir=cache_dir, data_config=config.data)
    reference = reference_stats.reference_statistics(extractor, config.data, cache_dir, split="train",
                                                     num_examples=None)
    ema_rate = config.sampling.ema_rate
    params = select_params(state, tuple(config.training.ema_rates), ema_rate)
    rows: dict[str, dict[str, float]] = {}
    for num_steps in ev.steps:
        images, _ = generate(experiment, params, ev.num_samples, num_steps, config.seed + 1,
                             config.sampling.batch_size)
        rows[f"samples_{num_steps}step"] = metrics.compute_metrics(extractor, images, reference)
    if with_baselines:
        heldout = pipeline.heldout_split(config.data)
        if heldout:
            real, _ = pipeline.load_eval_images(config.data, heldout, ev.num_samples)
            rows[f"real_{heldout}"] = metrics.compute_metrics(extractor, real, reference)
        untrained = experiment.init_state(jax.random.PRNGKey(config.seed)).params
        images, _ = generate(experiment, untrained, ev.num_samples, 1, config.seed + 1,
                             config.sampling.batch_size)
        rows["untrained_1step"] = metrics.compute_metrics(extractor, images, reference)
    result = {
        "checkpoint_step": step,
        "feature_extractor": extractor.name,
        "num_samples": ev.num_samples,
        "ema_rate": _ema_rate_used(config.training.ema_rates, ema_rate),
        "sigmas": {n: list(samplers.sampling_sigmas(config, n)) for n in ev.steps},
        "results": rows,
    }
    if jax.process_index() == 0:
        os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
        with open(os.path.join(workdir, "eval", f"step_{step:08d}.json"), "w") as f:
            json.dump(result, f, indent=2)
        print(format_report(result))
    return {f"{name}/{key}": value for name, row in rows.items() for key, value in row.items()}


def _ema_rate_used(ema_rates, ema_rate: float) -> float:
    if ema_rate < 0:
        return float(ema_rates[0]) if ema_rates else 0.0
    return float(ema_rate)


def format_report(result: dict) -> str:
    rows = result["results"]
    keys = sorted({k for row in rows.values() for k in row})
    lines = [f"Evaluation at step {result['checkpoint_step']}: {result['num_samples']} images per row, "
             f"{result['feature_extractor']} features, EMA {result['ema_rate']}, reference = training set",
             f"{'':24s}" + "".join(f"{k:>14s}" for k in keys)]
    for name, row in rows.items():
        lines.append(f"{name:24s}" + "".join(f"{row.get(k, float('nan')):14.4f}" for k in keys))
    return "\n".join(lines)


def run_eval(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict[str, float]:
    """--mode=eval: metrics of a checkpoint, written to <workdir>/eval/step_<step>.json."""
    validate_config(config)
    experiment = create_experiment(config)
    state = restore_state(experiment, workdir, step)
    return evaluate_state(experiment, state, workdir, int(state.step))
