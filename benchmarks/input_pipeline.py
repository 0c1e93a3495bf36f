"""Images/s of the training input pipeline alone (no model), on CIFAR-10-shaped mock data.

Two sources, both 32x32x3 uint8 with 10 labels, random flip on, as in the
CIFAR-10 configs:

  memory        an in-memory array (the path digits, .npz and image folders take)
  array_shards  memory-mapped .npy shards (data/array_shards.py: what
                `python -m consistency_jax.data.ilsvrc` writes), read
                through the page cache (warm after the warm-up batches)
  array_record  a TFDS dataset prepared locally as ArrayRecord with PNG-encoded
                images (the path cifar10 / imagenet_resized / lsun take: file
                reads plus PNG decoding), built from random pixels, no download

Usage:
  python -m benchmarks.input_pipeline [--batch_size=128] [--num_batches=100] [--num_examples=10000]
"""

import json
import os
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags

from configs import default
from consistency_jax.data import array_shards, pipeline, sources

_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Global batch size (one process).")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 100, "Timed batches per source, after warm-up.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 10000, "Examples in each mock dataset.")
_WARMUP_BATCHES = 5


class MockCifar10(tfds.core.GeneratorBasedBuilder):
    """CIFAR-10's features filled with random pixels, for reading benchmarks."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, num_examples: int, **kwargs):
        self._num_examples = num_examples
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(32, 32, 3)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        for index in range(self._num_examples):
            yield index, {"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "label": index % 10}


def cifar10_config():
    config = default.get_config().data
    config.unlock()
    config.update(dict(name="cifar10", image_size=32, num_channels=3, num_classes=10, random_flip=True))
    return config


def images_per_second(source, batch_size: int, num_batches: int) -> float:
    iterator = pipeline.train_iterator_from_source(
        source, cifar10_config(), global_batch_size=batch_size, seed=0, process_index=0, process_count=1
    )
    for _ in range(_WARMUP_BATCHES):  # thread start-up and first reads
        next(iterator)
    start = time.perf_counter()
    for _ in range(num_batches):
        batch = next(iterator)
    elapsed = time.perf_counter() - start
    assert batch["image"].shape == (batch_size, 32, 32, 3) and batch["label"].shape == (batch_size,)
    return batch_size * num_batches / elapsed


def _write_shards(memory: sources.ArraySource, directory: str, shard_size: int) -> sources.FittedSource:
    """The in-memory images as array shards, opened as the pipeline opens data.name='array_shards'."""
    os.makedirs(directory)
    starts = range(0, len(memory), shard_size)
    for index, start in enumerate(starts):
        paths = array_shards.shard_paths(directory, index)
        array_shards.write_array_atomically(paths["images"], memory.images[start:start + shard_size])
        array_shards.write_array_atomically(paths["labels"], memory.labels[start:start + shard_size])
    array_shards.write_json_atomically(os.path.join(directory, array_shards.MANIFEST), {
        "complete": True, "num_shards": len(starts), "num_examples": len(memory), "image_shape": [32, 32, 3],
        "num_classes": 10})
    return sources.FittedSource(array_shards.open_shards(directory)[0], 32, 3)


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    count = _NUM_EXAMPLES.value
    memory = sources.ArraySource(
        rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), (np.arange(count) % 10).astype(np.int32)
    )
    with tempfile.TemporaryDirectory() as data_dir:
        builder = MockCifar10(num_examples=count, data_dir=data_dir, file_format="array_record")
        builder.download_and_prepare()
        array_record = sources.FittedSource(builder.as_data_source(split="train"), 32, 3)
        shards = _write_shards(memory, os.path.join(data_dir, "shards"), shard_size=max(1, count // 4))
        for name, source in (("memory", memory), ("array_shards", shards), ("array_record", array_record)):
            rate = images_per_second(source, _BATCH_SIZE.value, _NUM_BATCHES.value)
            print(json.dumps({"source": name, "batch_size": _BATCH_SIZE.value, "images_per_s": round(rate)}))


if __name__ == "__main__":
    app.run(main)
