"""Sample grids as PNG files."""

import math
import os

import numpy as np
from PIL import Image

# Small images (8x8 digits) are blown up so that a grid is readable on screen.
MIN_CELL_PIXELS = 32


def image_grid(images: np.ndarray, columns: int | None = None, padding: int = 1) -> np.ndarray:
    """uint8 NHWC images tiled into one HWC image with a dark border between cells."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    scale = max(1, math.ceil(MIN_CELL_PIXELS / max(h, w)))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    grid = np.zeros((rows * (h + padding) + padding, columns * (w + padding) + padding, c), np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = image
    return grid


def save_image_grid(images: np.ndarray, path: str, columns: int | None = None) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid = image_grid(np.asarray(images), columns)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
