"""Training input pipeline: grain over a random-access source, per-process shares of global batches.

The order of examples is a function of (seed, global batch index) only, never of
the number of processes:

  stream position  p = epoch * N + i          i-th example of the epoch's shuffle
  global batch     g = positions [epoch * N + b * B, epoch * N + (b + 1) * B),
                   epoch, b = divmod(g, N // B)  (drop_remainder: the last N % B
                   examples of each epoch's order are left out)
  process k        reads the k-th contiguous share of B / process_count examples
                   of every global batch

so the processes read disjoint shards that together cover each epoch, the
concatenation of their shares in process order is the global batch, and the
random flip, drawn from the stream position, is the same whoever reads it. The
iterator state is the number of global batches consumed: a checkpoint written
by one host count resumes, batch for batch, on another.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np

from consistency_jax.data import sources
from consistency_jax.data.sources import DataConfigError, DatasetInfo

__all__ = [
    "DataConfigError",
    "DatasetInfo",
    "TrainIterator",
    "check_dataset",
    "create_train_iterator",
    "dataset_info",
    "load_eval_images",
    "heldout_split",
    "to_global_batch",
    "train_iterator_from_source",
]

# Each read thread assembles one whole local batch; as many threads as cores,
# at most 8 batches in flight, bounds the host memory a prefetch holds.
_READ_THREADS = min(8, os.cpu_count() or 1)
_READ_OPTIONS = grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_READ_THREADS)
_EVAL_READ_BATCH = 256


def check_dataset(data_config) -> None:
    """Fails fast (before anything compiles) when the configured training data cannot be read.

    Raises DataConfigError saying what is wrong and how to fix it: an unknown
    name (lists the valid ones), an unprepared TFDS dataset (the `tfds build`
    command), a bad data.path, labels that do not match data.num_classes, or
    undecodable images in a folder when data.on_bad_image='error'.
    """
    source = sources.open_source(data_config, "train")
    if len(source) == 0:
        raise DataConfigError(f"The training split of {data_config.name} is empty.")
    source[0]  # reads and decodes one example, so unreadable files fail here rather than mid-run


def dataset_info(data_config) -> DatasetInfo:
    """Shape of the images the pipeline yields, the conditioning classes and the training-set size."""
    source = sources.open_source(data_config, "train")
    return DatasetInfo(
        image_shape=(data_config.image_size, data_config.image_size, data_config.num_channels),
        num_classes=data_config.num_classes,
        num_examples=len(source),
    )


class TrainIterator:
    """Infinite iterator over this process's share of the global batches; checkpointable.

    Each `next()` returns {"image": float32 [b, H, W, C] in [-1, 1]} (b = global
    batch / process count) plus "label": int32 [b] for class-conditional configs.
    """

    def __init__(self, local_batches: grain.MapDataset, run_identity: dict[str, Any]):
        self._local_batches = local_batches  # element g: this process's share of global batch g
        self._run_identity = run_identity  # what must match for a saved state to make sense
        self._consumed = 0
        self._iterator = None  # started lazily, so set_state before the first next() wastes no reads

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            remaining = self._local_batches[self._consumed :]
            self._iterator = iter(remaining.to_iter_dataset(read_options=_READ_OPTIONS))
        batch = next(self._iterator)
        self._consumed += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable and independent of the process count: global batches consumed + run identity."""
        return {"global_batches_consumed": self._consumed, **self._run_identity}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues exactly after the batches counted in `state` (taken by get_state, any host count)."""
        mismatched = {
            key: (state.get(key), value)
            for key, value in self._run_identity.items()
            if state.get(key) != value
        }
        if mismatched:
            details = ", ".join(
                f"{key}: saved {saved!r}, now {now!r}" for key, (saved, now) in mismatched.items()
            )
            raise ValueError(
                f"The saved data iterator state belongs to a different input pipeline ({details}); "
                "resume with the data config, seed and batch size it was saved with, or start a new workdir."
            )
        consumed = state["global_batches_consumed"]
        if not isinstance(consumed, int) or consumed < 0:
            raise ValueError(f"global_batches_consumed must be a non-negative integer, got {consumed!r}.")
        self._consumed = consumed
        self._iterator = None


class _ProcessShare(grain.MapDataset):
    """Element k is example k of this process's stream: its share of global batch k // local_batch_size."""

    def __init__(
        self,
        parent: grain.MapDataset,
        *,
        epoch_size: int,
        global_batch_size: int,
        process_index: int,
        process_count: int,
    ):
        super().__init__(parent)
        self._epoch_size = epoch_size
        self._global_batch_size = global_batch_size
        self._batches_per_epoch = epoch_size // global_batch_size
        self._local_batch_size = global_batch_size // process_count
        self._offset_in_batch = process_index * self._local_batch_size

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return "ProcessShareMapDataset"

    def stream_position(self, index: int) -> int:
        global_batch, index_in_share = divmod(index, self._local_batch_size)
        epoch, batch_in_epoch = divmod(global_batch, self._batches_per_epoch)
        return (
            epoch * self._epoch_size
            + batch_in_epoch * self._global_batch_size
            + self._offset_in_batch
            + index_in_share
        )

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self.stream_position(index)]


def create_train_iterator(
    data_config,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainIterator:
    """This process's share of an endless, per-epoch reshuffled stream of global batches.

    Defaults: jax.process_index() / jax.process_count(). Raises ValueError when the
    global batch does not split evenly over the processes or exceeds the dataset.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    _check_batch_split(global_batch_size, process_index, process_count)
    return train_iterator_from_source(
        sources.open_source(data_config, "train"),
        data_config,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )


def _check_batch_split(global_batch_size: int, process_index: int, process_count: int) -> None:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"The global batch size ({global_batch_size}) must be a positive multiple of the number of "
            f"processes ({process_count}); each process loads global_batch_size / process_count examples."
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in 0..{process_count - 1}, got {process_index}.")


def train_iterator_from_source(
    source: Sequence[dict[str, Any]],
    data_config,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
) -> TrainIterator:
    """create_train_iterator over an already opened source of {"image": uint8 HWC, "label": int} examples."""
    _check_batch_split(global_batch_size, process_index, process_count)
    if seed < 0:
        raise ValueError(f"The data seed must be non-negative, got {seed}.")
    if len(source) < global_batch_size:
        raise ValueError(
            f"{data_config.name} has {len(source)} training examples, fewer than one global batch "
            f"({global_batch_size}); lower training.batch_size."
        )
    # Independent, well-mixed streams for order and flips: grain reseeds each epoch
    # with seed + epoch, so raw neighbouring seeds would share epochs.
    shuffle_seed, flip_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    examples = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat(None)
    if data_config.random_flip:
        examples = examples.random_map(_random_horizontal_flip, seed=flip_seed)
    share = _ProcessShare(
        examples,
        epoch_size=len(source),
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    conditional = data_config.num_classes > 0
    local_batches = share.batch(global_batch_size // process_count, drop_remainder=True).map(
        lambda batch: _to_model_inputs(batch, conditional)
    )
    run_identity = {
        "dataset": data_config.name,
        "num_examples": len(source),
        "global_batch_size": global_batch_size,
        "seed": seed,
        "random_flip": bool(data_config.random_flip),
    }
    return TrainIterator(local_batches, run_identity)


def _random_horizontal_flip(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if rng.random() < 0.5:
        return {**example, "image": example["image"][:, ::-1]}
    return example


def _to_model_inputs(batch: dict[str, np.ndarray], conditional: bool) -> dict[str, np.ndarray]:
    # Normalised per batch, not per example: one vectorised op instead of b small ones.
    inputs = {"image": batch["image"].astype(np.float32) / np.float32(127.5) - np.float32(1.0)}
    if conditional:
        inputs["label"] = batch["label"].astype(np.int32)
    return inputs


def heldout_split(data_config) -> str | None:
    """The split of real images not trained on, if the dataset has one.

    Evaluation compares samples with the training images (the papers'
    convention for FID) and reports the same metrics for these held-out images
    as the floor a model can reach.
    """
    return {"digits": "test", "cifar10": "test", "imagenet_resized/64x64": "validation"}.get(data_config.name)


def load_eval_images(data_config, split: str, max_examples: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The first `max_examples` of `split` in stored order: (uint8 [n, H, W, C], int32 labels [n]).

    Deterministic, at the config's resolution, for reference statistics (FID).
    Labels are -1 for unlabelled data or unconditional configs.
    """
    source = sources.open_source(data_config, split)
    count = len(source) if max_examples is None else min(max_examples, len(source))
    if count <= 0:
        raise ValueError(
            f"No examples to load from {data_config.name}/{split} (max_examples={max_examples})."
        )
    batches = grain.MapDataset.source(source)[:count].batch(_EVAL_READ_BATCH)
    images, labels = [], []
    for batch in batches.to_iter_dataset(read_options=_READ_OPTIONS):
        images.append(batch["image"])
        labels.append(batch["label"])
    labels = np.concatenate(labels).astype(np.int32)
    if data_config.num_classes == 0:
        labels = np.full_like(labels, sources.UNLABELLED)
    return np.concatenate(images), labels


def to_global_batch(
    local_batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding
) -> dict[str, jax.Array]:
    """Assembles the processes' local batches into global arrays split along the batch axis.

    `sharding` shards dimension 0 (e.g. NamedSharding(mesh, P('data'))); the global
    batch is the processes' shares concatenated in process order.
    """
    local_size = len(local_batch["image"])
    global_size = local_size * jax.process_count()
    batch_axes = sharding.spec[0] if len(sharding.spec) else None
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
    num_batch_shards = math.prod(sharding.mesh.shape[axis] for axis in batch_axes)
    if global_size % num_batch_shards:
        raise ValueError(
            f"The global batch size ({global_size}) must be divisible by the number of devices it is split "
            f"over ({num_batch_shards}, mesh axes {batch_axes}); choose training.batch_size as a multiple of it."
        )
    return {
        key: jax.make_array_from_process_local_data(sharding, value, (global_size, *value.shape[1:]))
        for key, value in local_batch.items()
    }
