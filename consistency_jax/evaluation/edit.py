"""--mode=edit: zero-shot editing of image files with a trained consistency model (maths in editing.py).

    python -m consistency_jax.main --config=configs/quickstart_act.py --workdir=/tmp/act --mode=edit \
        --config.edit.task=inpaint --config.edit.images=digit.png --config.edit.masks=hole.png

Inputs (config.edit): `images` is a PNG (one image) or an .npz with uint8
'images' [N, H, W] or [N, H, W, C] (and optionally 'masks' and int 'labels'
[N]). Per task the images are:
  inpaint    H x W at the model's size and channels, with `masks` (a PNG or an
             .npz 'masks' [N, H, W]; white / nonzero = pixels to generate;
             may also sit in the images' .npz)
  colorize   grayscale (or colour, whose luma is used) at the model's size
  superres   low resolution, H / p x W / p with p dividing the model's size
  stroke     a painting at the model's size and channels
Outputs go next to the images: <stem>_<task>.png (a grid when there are
several) and <stem>_<task>.npz with uint8 'images' (the results) and 'inputs'
(the reference y the model saw, at the model's resolution).
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from consistency_jax import editing, samplers
from consistency_jax.evaluation import generate
from consistency_jax.experiment import ConfigError, create_experiment, validate_config
from consistency_jax.visualization import save_image_grid


def check_edit_config(config: ml_collections.ConfigDict) -> None:
    edit = config.edit
    if edit.task not in editing.TASKS:
        raise ConfigError(f"Unknown config.edit.task {edit.task!r}; valid: {', '.join(editing.TASKS)}.")
    if not edit.images:
        raise ConfigError("--mode=edit needs config.edit.images: a PNG file or an .npz with uint8 'images'.")
    if edit.steps < 1:
        raise ConfigError(f"config.edit.steps must be >= 1, got {edit.steps}.")
    sigma_max = config.parametrization.sigma_max
    if edit.sigma_start != -1 and not config.parametrization.sigma_min < edit.sigma_start <= sigma_max:
        raise ConfigError(f"config.edit.sigma_start must be -1 (the task's default) or in (sigma_min, sigma_max = "
                          f"{sigma_max}]; got {edit.sigma_start}.")


def _read_array(path: str, key: str) -> np.ndarray | None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"config.edit: no file {path}.")
    if path.endswith(".npz"):
        with np.load(path) as archive:
            return archive[key] if key in archive.files else None
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB" if image.mode not in ("L", "I", "F", "1") else "L"))[None]


def read_images(path: str, num_channels: int) -> np.ndarray:
    """uint8 [N, H, W, C] with the requested channel count (RGB <-> gray converted; gray via luma)."""
    images = _read_array(path, "images")
    if images is None:
        raise ValueError(f"{path} has no 'images' array; it needs uint8 'images' [N, H, W] or [N, H, W, C].")
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"{path}: images must be uint8 [N, H, W] or [N, H, W, C]; got {images.dtype} {images.shape}.")
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 4:  # RGBA
        images = images[..., :3]
    if images.shape[-1] == num_channels:
        return images
    if num_channels == 1:
        luma = images.astype(np.float64) @ np.asarray(editing.LUMA)
        return np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]
    return np.repeat(images, num_channels, axis=-1)


def read_masks(path: str, count: int, height: int, width: int) -> np.ndarray:
    """bool [N, H, W, 1], True where pixels are to be generated (white / nonzero)."""
    masks = _read_array(path, "masks")
    if masks is None:
        raise ValueError(f"{path} has no 'masks' array: inpainting needs masks [N, H, W] (nonzero = fill).")
    masks = np.asarray(masks)
    if masks.ndim == 4:
        masks = masks[..., 0] if masks.shape[-1] == 1 else masks.max(axis=-1)
    masks = masks >= 128 if masks.dtype == np.uint8 and not path.endswith(".npz") else masks != 0
    if masks.shape[0] == 1 and count > 1:
        masks = np.repeat(masks, count, axis=0)
    if masks.shape != (count, height, width):
        raise ValueError(f"{path}: masks must be [N, H, W] = {[count, height, width]} (one per image, or one for "
                         f"all); got {list(masks.shape)}.")
    return masks[..., None]


def _labels(config: ml_collections.ConfigDict, num_classes: int, count: int) -> np.ndarray | None:
    if num_classes == 0:
        return None
    labels = _read_array(config.edit.images, "labels") if config.edit.images.endswith(".npz") else None
    if labels is None:
        if config.edit.label < 0:
            raise ValueError(f"This model is class-conditional ({num_classes} classes): give 'labels' in the "
                             f"images' .npz or set config.edit.label.")
        labels = np.full((count,), config.edit.label)
    labels = np.asarray(labels, np.int32).reshape(-1)
    if labels.shape != (count,) or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"Editing labels must be {count} ints in [0, {num_classes}); got {labels}.")
    return labels


def prepare(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int]) -> dict:
    """The task's reference images y in [-1, 1] at the model's resolution, and its mask or patch size."""
    edit, (size, _, channels) = config.edit, image_shape
    task = edit.task
    images = read_images(edit.images, 1 if task == "colorize" else channels)
    count, height, width = images.shape[:3]
    patch = 1
    if task == "superres":
        if height != width or size % height or height == size:
            raise ValueError(f"Super-resolution inputs must be square and smaller than the model's {size}x{size} "
                             f"by an integer factor; got {height}x{width}.")
        patch = size // height
        images = images.repeat(patch, axis=1).repeat(patch, axis=2)
    elif (height, width) != (size, size):
        raise ValueError(f"config.edit.images holds {height}x{width} images; the model makes {size}x{size}.")
    if task == "colorize":
        images = np.repeat(images, channels, axis=-1)
    mask = None
    if task == "inpaint":
        mask = read_masks(edit.masks or edit.images, count, size, size)
    return {"y": images.astype(np.float32) / 127.5 - 1, "mask": mask, "patch": patch}


def run_edit(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> str:
    """--mode=edit: edits config.edit.images with a checkpoint and writes the results next to them."""
    validate_config(config)
    check_edit_config(config)
    experiment = create_experiment(config, workdir=workdir)
    editing.check_editable(experiment.method)
    edit, param = config.edit, config.parametrization
    problem = prepare(config, experiment.image_shape)
    labels = _labels(config, experiment.num_classes, problem["y"].shape[0])
    state = generate.restore_weights(experiment, workdir, step)
    params = generate.select_params(state, tuple(config.training.ema_rates), config.sampling.ema_rate)

    default_start = 10.0 if edit.task == "stroke" else param.sigma_max
    sigma_start = default_start if edit.sigma_start == -1 else edit.sigma_start
    sigmas = editing.editing_sigmas(edit.steps, sigma_start, param.sigma_min, param.rho)
    fn = experiment.fn

    def run(params, rng, y, mask, labels):
        if edit.task == "stroke":
            return editing.stroke_guided(fn, params, rng, y, sigmas, labels)
        transform, unknown = editing.task_problem(edit.task, y, mask, problem["patch"])
        return editing.edit(fn, params, rng, y, unknown, sigmas, transform, labels)

    y = jnp.asarray(problem["y"])
    result = jax.jit(run)(params, jax.random.PRNGKey(config.seed), y,
                          None if problem["mask"] is None else jnp.asarray(problem["mask"]),
                          None if labels is None else jnp.asarray(labels))
    images = np.asarray(samplers.to_uint8(result))
    stem = os.path.splitext(edit.images)[0] + f"_{edit.task}"
    if jax.process_index() == 0:
        arrays = {"images": images, "inputs": np.asarray(samplers.to_uint8(y))}
        if problem["mask"] is not None:
            arrays["masks"] = problem["mask"][..., 0]
        np.savez(stem + ".npz", **arrays)
        if len(images) == 1:
            Image.fromarray(images[0, ..., 0] if images.shape[-1] == 1 else images[0]).save(stem + ".png")
        else:
            save_image_grid(images, stem + ".png")
        logging.info("Edited %d images (%s, %d steps from sigma %.3g, checkpoint step %d): %s.png and .npz",
                     len(images), edit.task, len(sigmas), sigmas[0], int(state.step), stem)
    return stem
