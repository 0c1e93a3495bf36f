"""ILSVRC2012 (or any folder of class sub-folders) -> array shards with ADM's centre crop.

The iCT / CM / ADM ImageNet 64x64 models train on the full-resolution
ILSVRC2012 training images, each converted to RGB, box-halved while its
shorter side is at least twice the target, resized with bicubic so the
shorter side is the target, and centre-cropped (openai/consistency_models,
cm/image_datasets.py, center_crop_arr). TFDS's `imagenet_resized/64x64`
squashes whole images to 64x64 instead: a different dataset.

Usage:
  python -m consistency_jax.data.ilsvrc --train_dir=/data/ILSVRC2012/train \\
      --output_dir=/data/imagenet64_adm --image_size=64

`train_dir` holds one sub-folder per class (n01440764/, ...); labels are the
indices of the sorted sub-folder names (ADM's, CM's and TFDS's order). The
output is a directory of array shards (data/array_shards.py); train on it with
`--config.data.name=array_shards --config.data.path=/data/imagenet64_adm`.
The command is resumable: it writes one shard at a time (atomically) and,
started again with the same arguments, skips the shards already written. An
unreadable image stops it with the file's name, unless --on_bad_image=skip,
which leaves it out and records it in the manifest. Progress is logged with
rate and ETA. Cost: about 2 ms of CPU per 500x375 JPEG (decode, box-halving,
bicubic; measured on an AVX-512 EPYC host), so ~0.8 CPU-hours for ILSVRC's
1.28M images: minutes on a many-core host, plus reading ~140 GB.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from concurrent import futures

import numpy as np
from absl import app, flags, logging
from PIL import Image

from consistency_jax.data import array_shards
from consistency_jax.data.sources import BAD_IMAGE_POLICIES, IMAGE_EXTENSIONS, adm_center_crop

PREPROCESSING = "adm_center_crop"  # recorded in the manifest: what was done to the images
_MAX_PATHS_IN_MESSAGE = 10


class PreprocessError(ValueError):
    """The input cannot be preprocessed as asked; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Listing:
    classes: list[str]  # sorted sub-folder names; label i is classes[i]
    files: list[str]  # paths relative to the train dir, in index order
    labels: np.ndarray  # int32, one per file

    def digest(self) -> str:
        text = "\n".join(f"{label}\t{path}" for label, path in zip(self.labels.tolist(), self.files))
        return hashlib.sha256(text.encode()).hexdigest()


def list_class_folders(train_dir: str) -> Listing:
    """The images of every class sub-folder of `train_dir`, sorted (class folders, then paths within)."""
    if not os.path.isdir(train_dir):
        raise PreprocessError(f"--train_dir={train_dir!r} is not a directory.")
    classes = sorted(entry.name for entry in os.scandir(train_dir) if entry.is_dir())
    if not classes:
        raise PreprocessError(f"{train_dir} has no class sub-folders (ILSVRC2012's train/ has 1000, n01440764 ...).")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = []
        for root, dirs, names in os.walk(os.path.join(train_dir, name)):
            dirs.sort()
            found += [os.path.relpath(os.path.join(root, n), train_dir) for n in sorted(names)
                      if n.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            raise PreprocessError(f"Class folder {os.path.join(train_dir, name)} has no image files "
                                  f"({', '.join(IMAGE_EXTENSIONS)}).")
        files += found
        labels += [label] * len(found)
    return Listing(classes, files, np.asarray(labels, np.int32))


def crop_file(path: str, image_size: int) -> np.ndarray | None:
    """ADM's centre crop of one image file as uint8 [S, S, 3]; None if it cannot be decoded."""
    try:
        with Image.open(path) as pil:
            pil.load()
            return adm_center_crop(pil, image_size, 3)
    except (OSError, ValueError, Image.DecompressionBombError):  # PIL's errors for broken or non-image files
        return None


class _Progress:
    """Logs images done, rate, ETA at most every `every_s` seconds."""

    def __init__(self, total: int, done: int, every_s: float):
        self.total, self.done, self.every_s = total, done, every_s
        self.start_done, self.start = done, time.monotonic()
        self.last = self.start

    def add(self, count: int, shard: int, num_shards: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.last < self.every_s and self.done < self.total:
            return
        self.last = now
        rate = (self.done - self.start_done) / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        logging.info("shard %d/%d: %s/%s images (%.1f%%), %.0f images/s, ETA %s", shard + 1, num_shards,
                     f"{self.done:,}", f"{self.total:,}", 100 * self.done / self.total, rate, _duration(eta))


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "unknown"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _start_or_resume(output_dir: str, train_dir: str, listing: Listing, image_size: int,
                     shard_size: int) -> dict:
    """The manifest of this run: a new one, or the one of an unfinished run with the same inputs."""
    manifest = {
        "format_version": array_shards.FORMAT_VERSION,
        "source_dir": os.path.abspath(train_dir),
        "preprocessing": PREPROCESSING,
        "image_shape": [image_size, image_size, 3],
        "classes": listing.classes,
        "num_classes": len(listing.classes),
        "num_files": len(listing.files),
        "listing_sha256": listing.digest(),
        "shard_size": shard_size,
        "num_shards": -(-len(listing.files) // shard_size),
        "complete": False,
    }
    manifest_path = os.path.join(output_dir, array_shards.MANIFEST)
    if os.path.exists(manifest_path):
        old = array_shards.read_manifest(output_dir)
        keys = ("preprocessing", "image_shape", "listing_sha256", "shard_size", "num_shards")
        changed = [key for key in keys if old.get(key) != manifest[key]]
        if changed:
            raise PreprocessError(
                f"{output_dir} holds the output of a different preprocessing run ({', '.join(changed)} differ"
                f"{': the input files changed' if 'listing_sha256' in changed else ''}). Use a new --output_dir, "
                "or delete this one to start over.")
        return old
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, array_shards.FILE_LIST), "w") as f:
        f.writelines(path + "\n" for path in listing.files)
    array_shards.write_json_atomically(manifest_path, manifest)
    return manifest


def _shard_done(output_dir: str, index: int) -> dict | None:
    record = array_shards.shard_paths(output_dir, index)["record"]
    if not os.path.exists(record):
        return None
    return array_shards.read_json(record)


def preprocess(train_dir: str, output_dir: str, image_size: int = 64, *, shard_size: int = 10_000,
               workers: int | None = None, on_bad_image: str = "error", log_every_s: float = 30.0,
               crop: Callable[[str, int], np.ndarray | None] = crop_file) -> dict:
    """Writes (or finishes writing) the array shards of `train_dir` into `output_dir`; returns the manifest."""
    if image_size <= 0 or shard_size <= 0:
        raise PreprocessError(f"--image_size and --shard_size must be positive, got {image_size}, {shard_size}.")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise PreprocessError(f"--on_bad_image={on_bad_image!r}; valid: {', '.join(BAD_IMAGE_POLICIES)}.")
    listing = list_class_folders(train_dir)
    manifest = _start_or_resume(output_dir, train_dir, listing, image_size, shard_size)
    num_shards = manifest["num_shards"]
    done = [_shard_done(output_dir, index) for index in range(num_shards)]
    progress = _Progress(len(listing.files), sum(min(shard_size, len(listing.files) - i * shard_size)
                                                 for i, d in enumerate(done) if d), log_every_s)
    logging.info("%s: %d images in %d classes -> %d shards in %s (%d already written).", train_dir,
                 len(listing.files), len(listing.classes), num_shards, output_dir, sum(d is not None for d in done))
    with futures.ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as pool:  # PIL decodes without the GIL
        for index in range(num_shards):
            if done[index] is None:
                done[index] = _write_shard(pool, crop, train_dir, output_dir, listing, index, shard_size,
                                           image_size, on_bad_image)
                progress.add(done[index]["num_inputs"], index, num_shards)
    skipped = [path for record in done for path in record["skipped"]]
    manifest.update(complete=True, num_examples=sum(record["num_examples"] for record in done), skipped=skipped)
    array_shards.write_json_atomically(os.path.join(output_dir, array_shards.MANIFEST), manifest)
    logging.info("Done: %s images in %s (%d unreadable files skipped).", f"{manifest['num_examples']:,}",
                 output_dir, len(skipped))
    return manifest


def _write_shard(pool: futures.Executor, crop: Callable, train_dir: str, output_dir: str, listing: Listing,
                 index: int, shard_size: int, image_size: int, on_bad_image: str) -> dict:
    start, stop = index * shard_size, min((index + 1) * shard_size, len(listing.files))
    files = listing.files[start:stop]
    images = list(pool.map(lambda rel: crop(os.path.join(train_dir, rel), image_size), files))
    bad = [path for path, image in zip(files, images) if image is None]
    if bad and on_bad_image == "error":
        listed = "\n  ".join(os.path.join(train_dir, path) for path in bad[:_MAX_PATHS_IN_MESSAGE])
        more = f"\n  ... and {len(bad) - _MAX_PATHS_IN_MESSAGE} more" if len(bad) > _MAX_PATHS_IN_MESSAGE else ""
        raise PreprocessError(
            f"{len(bad)} of the images {start}..{stop - 1} cannot be decoded:\n  {listed}{more}\n"
            "Replace or remove them and run the command again (the shards written so far are kept if the file "
            "list is unchanged), or pass --on_bad_image=skip to leave them out.")
    keep = [i for i, image in enumerate(images) if image is not None]
    paths = array_shards.shard_paths(output_dir, index)
    array_shards.write_array_atomically(
        paths["images"], np.stack([images[i] for i in keep]) if keep
        else np.zeros((0, image_size, image_size, 3), np.uint8))
    array_shards.write_array_atomically(paths["labels"], listing.labels[start:stop][keep])
    record = {"first_input": start, "num_inputs": len(files), "num_examples": len(keep), "skipped": bad}
    array_shards.write_json_atomically(paths["record"], record)  # last: marks the shard as done
    return record


_TRAIN_DIR = flags.DEFINE_string("train_dir", None, "Folder with one sub-folder of images per class.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the array shards go (created; resumable).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Side of the square images written.")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 10_000, "Images per shard (the unit of resuming).")
_WORKERS = flags.DEFINE_integer("workers", None, "Decoding threads; default: all cores.")
_ON_BAD_IMAGE = flags.DEFINE_enum("on_bad_image", "error", list(BAD_IMAGE_POLICIES),
                                  "'error': stop and name undecodable files; 'skip': leave them out.")


def main(argv: Sequence[str]) -> None:
    del argv
    try:
        preprocess(_TRAIN_DIR.value, _OUTPUT_DIR.value, _IMAGE_SIZE.value, shard_size=_SHARD_SIZE.value,
                   workers=_WORKERS.value, on_bad_image=_ON_BAD_IMAGE.value)
    except PreprocessError as error:
        raise SystemExit(f"Error: {error}") from None


if __name__ == "__main__":
    flags.mark_flags_as_required(["train_dir", "output_dir"])
    app.run(main)
