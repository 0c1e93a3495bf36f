"""Random-access image sources by config name, and their fail-fast validation.

Every source is a sequence of examples `{"image": uint8 [H, W, C], "label": int}`
(unlabelled data has label -1) at the config's resolution, which is what
`pipeline.py` shuffles, shards and batches:

  cifar10, imagenet_resized/64x64, lsun/cat   tfds.data_source (ArrayRecord files,
                                              read lazily, one example at a time)
  digits                                      scikit-learn's 8x8 digits, in memory
  npz                                         an .npz with uint8 'images' [N, H, W(, C)]
                                              and optional int 'labels' [N], in memory
  folder                                      a folder of images, decoded once at start
                                              and kept in memory; with num_classes > 0
                                              each sub-folder is a class (sorted names)
  array_shards                                a directory of memory-mapped uint8 .npy shards
                                              (data/array_shards.py), e.g. ILSVRC2012 with
                                              ADM's centre crop (python -m consistency_jax.data.ilsvrc)

Images whose resolution differs from the config's are resized (shorter side to
`image_size`, box-downsampled then bicubic as in the ADM/CM LSUN preprocessing)
and centre-cropped (`adm_center_crop`); this is how LSUN Cat becomes 256x256.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import zipfile
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import numpy as np
from PIL import Image

from consistency_jax.data import array_shards
from consistency_jax.data import digits as digits_lib
from consistency_jax.errors import UserError, read_file

TFDS_DATASETS = ("cifar10", "imagenet_resized/64x64", "lsun/cat")
IN_MEMORY_DATASETS = ("digits", "npz", "folder")
DATASET_NAMES = TFDS_DATASETS + IN_MEMORY_DATASETS + ("array_shards",)
PREPROCESS_COMMAND = "python -m consistency_jax.data.ilsvrc --train_dir=DIR --output_dir=OUT --image_size=64"
BAD_IMAGE_POLICIES = ("error", "skip")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
UNLABELLED = -1

# Label counts of the datasets with labels; lsun/cat has none. Folder and npz
# datasets take theirs from the files.
_KNOWN_NUM_CLASSES = {"cifar10": 10, "imagenet_resized/64x64": 1000, "digits": 10, "lsun/cat": 0}
_MAX_PATHS_IN_MESSAGE = 10

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    image_shape: tuple[int, int, int]  # (H, W, C) of the images the pipeline yields
    num_classes: int  # 0 if the config trains unconditionally
    num_examples: int  # size of the training split (after skipping bad images)


class DataConfigError(UserError, ValueError):
    """The data config names a dataset that is unknown, missing or unusable."""


class ArraySource:
    """In-memory random-access source over uint8 images [N, H, W, C] and int32 labels [N]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": self.labels[index]}


class FittedSource:
    """Wraps a source whose images need resizing to the config's resolution (TFDS)."""

    def __init__(self, source: Sequence[dict[str, Any]], image_size: int, num_channels: int):
        self._source = source
        self._image_size = image_size
        self._num_channels = num_channels

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self._source[index]
        label = int(example["label"]) if "label" in example else UNLABELLED
        return {"image": fit_image(example["image"], self._image_size, self._num_channels), "label": label}


def fit_image(image: np.ndarray, image_size: int, num_channels: int) -> np.ndarray:
    """uint8 [H, W] or [H, W, C] -> uint8 [image_size, image_size, num_channels].

    Channels are converted (grey <-> RGB, alpha dropped) and the shorter side is
    resized to `image_size` before a centre crop. An image already at the target
    shape is returned unchanged.
    """
    if image.ndim == 3 and image.shape == (image_size, image_size, num_channels):
        return image
    pil = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    return adm_center_crop(pil, image_size, num_channels)


def adm_center_crop(pil: Image.Image, image_size: int, num_channels: int) -> np.ndarray:
    """ADM's / CM's `center_crop_arr` (openai/consistency_models cm/image_datasets.py): uint8 [S, S, C].

    Converts to RGB (or L), halves with a box filter while the shorter side is
    at least 2 * image_size, resizes the shorter side to image_size with
    bicubic (sizes rounded with Python's round), then crops the centre.
    """
    pil = pil.convert("L" if num_channels == 1 else "RGB")
    # Halve with a box filter while the image is at least twice too large, so the
    # final bicubic step does not alias (the ADM/CM `center_crop_arr`).
    while min(pil.size) >= 2 * image_size:
        pil = pil.resize(tuple(s // 2 for s in pil.size), resample=Image.BOX)
    scale = image_size / min(pil.size)
    pil = pil.resize(tuple(max(image_size, round(s * scale)) for s in pil.size), resample=Image.BICUBIC)
    array = np.asarray(pil)
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    array = array[top : top + image_size, left : left + image_size]
    return array.reshape(image_size, image_size, num_channels)


def check_data_config(data_config) -> None:
    """Checks the fields that need no files: name, resolution, classes, policy, path."""
    if data_config.name not in DATASET_NAMES:
        raise DataConfigError(
            f"Unknown data.name {data_config.name!r}; valid names: {', '.join(DATASET_NAMES)}."
        )
    if data_config.image_size <= 0:
        raise DataConfigError(f"data.image_size must be positive, got {data_config.image_size}.")
    if data_config.num_channels not in (1, 3):
        raise DataConfigError(f"data.num_channels must be 1 or 3, got {data_config.num_channels}.")
    if data_config.num_classes < 0:
        raise DataConfigError(
            f"data.num_classes must be >= 0 (0: unconditional), got {data_config.num_classes}."
        )
    if data_config.on_bad_image not in BAD_IMAGE_POLICIES:
        raise DataConfigError(
            f"data.on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {data_config.on_bad_image!r}."
        )
    known_classes = _KNOWN_NUM_CLASSES.get(data_config.name)
    if known_classes is not None and data_config.num_classes not in (0, known_classes):
        has = f"has {known_classes} classes" if known_classes else "has no labels"
        raise DataConfigError(
            f"data.num_classes={data_config.num_classes}, but {data_config.name} {has}; "
            f"set data.num_classes to {known_classes} (class-conditional) or 0 (unconditional)."
        )
    if data_config.name in ("npz", "folder", "array_shards"):
        _check_custom_path(data_config.name, data_config.path)


def _check_custom_path(name: str, path: str | None) -> None:
    expected = {"npz": "an .npz file", "folder": "a folder of images",
                "array_shards": f"a directory written by `{PREPROCESS_COMMAND}`"}[name]
    if not path:
        raise DataConfigError(f"data.name={name!r} needs data.path: {expected}.")
    if name == "npz" and not os.path.isfile(path):
        raise DataConfigError(f"data.path={path!r} is not a file; data.name='npz' needs {expected}.")
    if name in ("folder", "array_shards") and not os.path.isdir(path):
        raise DataConfigError(f"data.path={path!r} is not a directory; data.name={name!r} needs {expected}.")


def open_source(data_config, split: str) -> Sequence[dict[str, Any]]:
    """The split of the configured dataset as a random-access source at the config's resolution."""
    check_data_config(data_config)
    if data_config.name in TFDS_DATASETS:
        source = open_tfds_source(data_config.name, split, data_config.data_dir)
        return FittedSource(source, data_config.image_size, data_config.num_channels)
    size, channels, classes = data_config.image_size, data_config.num_channels, data_config.num_classes
    if data_config.name == "array_shards":
        return _open_array_shards(data_config.path, split, size, channels, classes)
    if data_config.name == "digits":
        return ArraySource(*_load_digits(split, size, channels, classes))
    if split != "train":
        raise DataConfigError(f"data.name={data_config.name!r} has only the 'train' split, got {split!r}.")
    loader = _load_npz if data_config.name == "npz" else _load_folder
    return ArraySource(*loader(data_config.path, size, channels, classes, data_config.on_bad_image))


def _open_array_shards(path: str, split: str, image_size: int, num_channels: int,
                       num_classes: int) -> Sequence[dict[str, Any]]:
    if split != "train":
        raise DataConfigError(f"data.name='array_shards' has only the 'train' split, got {split!r}.")
    try:
        source, manifest = array_shards.open_shards(path)
    except array_shards.ShardsError as error:
        raise DataConfigError(str(error)) from error
    if num_classes not in (0, manifest["num_classes"]):
        raise DataConfigError(
            f"data.num_classes={num_classes}, but {path} has {manifest['num_classes']} classes; set "
            f"data.num_classes to {manifest['num_classes']} (class-conditional) or 0 (unconditional).")
    # Images stored at another resolution are resized on access (the same crop as the preprocessing).
    return FittedSource(source, image_size, num_channels)


def open_tfds_source(name: str, split: str, data_dir: str | None) -> Sequence[dict[str, Any]]:
    """tfds.data_source without downloading; an unprepared dataset raises a how-to-prepare error."""
    import tensorflow_datasets as tfds  # lazily: digits/npz/folder runs need no TensorFlow

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as error:  # noqa: BLE001 -- diagnosed below, re-raised when not a preparation problem
        problem = _diagnose_tfds_preparation(name, data_dir)
        if problem is None:
            raise
        raise DataConfigError(problem) from error


def _diagnose_tfds_preparation(name: str, data_dir: str | None) -> str | None:
    """Why `name` cannot be read as ArrayRecord from `data_dir` and how to fix it; None if it can."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    where = f"--data_dir={builder.data_dir_root}"
    build = f"tfds build {name} --file_format=array_record {where}"
    if not builder.is_prepared():
        message = (
            f"Dataset {name} is not prepared in {builder.data_dir_root} (data.data_dir={data_dir!r}). "
            f"Prepare it once with:\n  {build}\n"
            "or point data.data_dir (--config.data.data_dir=...) at a directory where it is prepared."
        )
        if name.startswith("imagenet_resized"):
            message += (
                "\nImageNet needs a manual download: log in at https://image-net.org/download-images, download "
                "Imagenet64_train_part1_npz.zip, Imagenet64_train_part2_npz.zip and Imagenet64_val_npz.zip "
                f"(Downsampled ImageNet 64x64) into a folder DIR and run:\n  {build} --manual_dir=DIR"
            )
        if name.startswith("lsun"):
            message += (
                "\nTFDS builds LSUN from the LMDB archive at dl.yf.io and reads it with tensorflow-io "
                "(pip install tensorflow-io); alternatively export the images to a folder and use "
                "data.name='folder' with data.path pointing at it."
            )
        return message
    file_format = builder.info.file_format
    if file_format is None or file_format.value != "array_record":
        return (
            f"Dataset {name} is prepared in {builder.data_dir_root} as {file_format}, but the pipeline reads "
            f"random-access ArrayRecord files. Rebuild it in another data_dir (or delete {builder.data_path}):\n"
            f"  {build}"
        )
    return None


def _load_digits(split: str, image_size: int, num_channels: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if split not in ("train", "test"):
        raise DataConfigError(f"digits has the splits 'train' and 'test', got {split!r}.")
    images, labels = digits_lib.load_digits_split(split)
    images = np.stack([fit_image(image, image_size, num_channels) for image in images])
    return images, labels if num_classes else np.full(len(images), UNLABELLED, np.int32)


@functools.lru_cache(maxsize=2)  # check_dataset, dataset_info and the iterator share one load
def _load_npz(
    path: str, image_size: int, num_channels: int, num_classes: int, on_bad_image: str
) -> tuple[np.ndarray, np.ndarray]:
    del on_bad_image  # an array cannot hold an undecodable image
    images, labels = read_file(path, "data.path: the .npz", _read_npz_arrays,
                               "It must be an uncompressed or compressed .npz written by numpy.savez.")
    if (
        images.dtype != np.uint8
        or images.ndim not in (3, 4)
        or (images.ndim == 4 and images.shape[-1] not in (1, 3, 4))
    ):
        raise DataConfigError(
            f"{path}: 'images' must be uint8 [N, H, W] or [N, H, W, C] with C in 1, 3, 4; "
            f"got {images.dtype} {images.shape}."
        )
    if len(images) == 0:
        raise DataConfigError(f"{path}: 'images' is empty.")
    images = np.stack([fit_image(image, image_size, num_channels) for image in images])
    return images, _checked_labels(labels, len(images), num_classes, path)


def _read_npz_arrays(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    if not zipfile.is_zipfile(path):  # numpy would try to unpickle it and say so; read_file names the file
        raise ValueError("not a zip archive (an .npz is a zip archive of arrays)")
    with np.load(path) as archive:
        if "images" not in archive.files:
            raise DataConfigError(
                f"{path} has arrays {archive.files}; it needs uint8 'images' [N, H, W] or [N, H, W, C] "
                "and, for class-conditional training, int 'labels' [N]."
            )
        return archive["images"], archive["labels"] if "labels" in archive.files else None


def _checked_labels(labels: np.ndarray | None, count: int, num_classes: int, where: str) -> np.ndarray:
    if num_classes == 0:
        return np.full(count, UNLABELLED, np.int32)
    if labels is None:
        raise DataConfigError(f"data.num_classes={num_classes}, but {where} has no 'labels' array.")
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataConfigError(
            f"{where}: 'labels' must be integers of shape ({count},), got {labels.dtype} {labels.shape}."
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataConfigError(
            f"{where}: labels span {labels.min()}..{labels.max()}, outside 0..{num_classes - 1} (data.num_classes)."
        )
    return labels.astype(np.int32)


@functools.lru_cache(maxsize=2)  # check_dataset, dataset_info and the iterator share one decode pass
def _load_folder(
    path: str, image_size: int, num_channels: int, num_classes: int, on_bad_image: str
) -> tuple[np.ndarray, np.ndarray]:
    paths, labels = _list_folder_images(path, num_classes)
    with futures.ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # PIL decodes without the GIL
        decoded = list(pool.map(lambda p: _decode_or_none(p, image_size, num_channels), paths))
    bad = [p for p, image in zip(paths, decoded) if image is None]
    if bad:
        listed = "\n  ".join(bad[:_MAX_PATHS_IN_MESSAGE])
        more = (
            f"\n  ... and {len(bad) - _MAX_PATHS_IN_MESSAGE} more" if len(bad) > _MAX_PATHS_IN_MESSAGE else ""
        )
        if on_bad_image == "error":
            raise DataConfigError(
                f"{len(bad)} of {len(paths)} images in {path} cannot be decoded:\n  {listed}{more}\n"
                "Remove or fix them, or set data.on_bad_image='skip' to train without them."
            )
        logger.warning(
            "Skipping %d of %d undecodable images in %s:\n  %s%s", len(bad), len(paths), path, listed, more
        )
    keep = [i for i, image in enumerate(decoded) if image is not None]
    if not keep:
        raise DataConfigError(f"None of the {len(paths)} images in {path} can be decoded.")
    return np.stack([decoded[i] for i in keep]), labels[keep]


def _list_folder_images(path: str, num_classes: int) -> tuple[list[str], np.ndarray]:
    """Image paths under `path` in sorted order; with classes, one sorted sub-folder per class."""
    if num_classes == 0:
        paths = _image_files_under(path)
        if not paths:
            raise DataConfigError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) under {path}.")
        return paths, np.full(len(paths), UNLABELLED, np.int32)
    class_dirs = sorted(e.name for e in os.scandir(path) if e.is_dir())
    if len(class_dirs) != num_classes:
        raise DataConfigError(
            f"data.num_classes={num_classes}, but {path} has {len(class_dirs)} sub-folders ({class_dirs[:20]}); "
            "a labelled folder needs one sub-folder per class."
        )
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        class_paths = _image_files_under(os.path.join(path, class_dir))
        if not class_paths:
            raise DataConfigError(f"Class folder {os.path.join(path, class_dir)} has no image files.")
        paths += class_paths
        labels += [label] * len(class_paths)
    return paths, np.asarray(labels, np.int32)


def _image_files_under(path: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(path):
        dirs.sort()  # os.walk order depends on the file system; sort for a deterministic index
        found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def _decode_or_none(path: str, image_size: int, num_channels: int) -> np.ndarray | None:
    try:
        with Image.open(path) as pil:
            pil.load()
            return adm_center_crop(pil, image_size, num_channels)
    except (
        OSError,
        ValueError,
        Image.DecompressionBombError,
    ):  # PIL's errors for truncated or non-image files
        return None
