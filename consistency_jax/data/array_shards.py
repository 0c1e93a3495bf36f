"""A directory of memory-mapped uint8 .npy shards: the on-disk format of preprocessed datasets.

Layout (written by `python -m consistency_jax.data.ilsvrc`):

  manifest.json          what was made and from what: image shape, classes, shard
                         size, the input listing's hash, and "complete": true once
                         every shard is written
  files.txt              the input files, one per line, in index order
  shard_00000.json       per shard: how many images it holds, the inputs it skipped;
                         written last, so its presence marks the shard as done
  images_00000.npy       uint8 [n, H, W, C]
  labels_00000.npy       int32 [n]

Why this format: the pipeline reads it as fast as an in-memory array (no
decoding, random access straight from the page cache, see
benchmarks/input_pipeline.py), it costs nothing to open (the shards are
memory-mapped, not loaded: ImageNet 64x64 is 15.7 GB), and processes on one
host share the page cache instead of holding a copy each.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
FILE_LIST = "files.txt"
FORMAT_VERSION = 1


class ShardsError(ValueError):
    """The directory is not a complete, readable set of array shards."""


def shard_paths(directory: str, index: int) -> dict[str, str]:
    stem = os.path.join(directory, f"{{}}_{index:05d}")
    return {"images": stem.format("images") + ".npy", "labels": stem.format("labels") + ".npy",
            "record": stem.format("shard") + ".json"}


def write_json_atomically(path: str, value: Any) -> None:
    partial = path + ".partial"
    with open(partial, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(partial, path)


def write_array_atomically(path: str, array: np.ndarray) -> None:
    partial = path + ".partial.npy"
    np.save(partial, array)
    os.replace(partial, path)


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def read_manifest(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ShardsError(f"{directory} has no {MANIFEST}: it is not a dataset written by "
                          "`python -m consistency_jax.data.ilsvrc` (see README, Data).")
    return read_json(path)


class ShardedArraySource:
    """Random access to {"image": uint8 [H, W, C], "label": int} over memory-mapped shards."""

    def __init__(self, images: list[np.ndarray], labels: list[np.ndarray]):
        if len(images) != len(labels) or any(len(i) != len(l) for i, l in zip(images, labels)):
            raise ValueError("Every image shard needs a label shard of the same length.")
        self._images, self._labels = images, labels
        self._ends = np.cumsum([len(shard) for shard in images])

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"Index {index} out of range for {len(self)} examples.")
        shard = int(np.searchsorted(self._ends, index, side="right"))
        offset = index - (int(self._ends[shard - 1]) if shard else 0)
        return {"image": self._images[shard][offset], "label": int(self._labels[shard][offset])}


def open_shards(directory: str) -> tuple[ShardedArraySource, dict[str, Any]]:
    """The complete dataset in `directory`, memory-mapped, and its manifest; ShardsError if unusable."""
    manifest = read_manifest(directory)
    if not manifest.get("complete"):
        raise ShardsError(f"{directory} is an unfinished preprocessing output ({manifest.get('num_files')} input "
                          "files, not all shards written). Run the same preprocessing command again to finish it.")
    images, labels = [], []
    for index in range(manifest["num_shards"]):
        paths = shard_paths(directory, index)
        try:
            images.append(np.load(paths["images"], mmap_mode="r"))
            labels.append(np.load(paths["labels"], mmap_mode="r"))
        except (OSError, ValueError) as error:
            raise ShardsError(f"Cannot read shard {index} of {directory}: {error}. Delete {paths['record']} and "
                              "run the preprocessing command again to rewrite it.") from error
        shape = tuple(manifest["image_shape"])
        if images[-1].dtype != np.uint8 or images[-1].shape[1:] != shape or len(labels[-1]) != len(images[-1]):
            promised = ", ".join(map(str, shape))
            raise ShardsError(f"Shard {index} of {directory} holds {images[-1].dtype} {images[-1].shape} with "
                              f"{len(labels[-1])} labels; the manifest promises uint8 [n, {promised}].")
    source = ShardedArraySource(images, labels)
    if len(source) != manifest["num_examples"]:
        raise ShardsError(f"{directory}: the shards hold {len(source)} images, the manifest "
                          f"{manifest['num_examples']}.")
    return source, manifest
