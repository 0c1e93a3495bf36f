"""scikit-learn's 8x8 handwritten digits, the dataset the quickstart trains on.

The 1,797 images ship inside scikit-learn, so the quickstart needs no download.
A fixed permutation splits them into 1,500 training and 297 held-out images; the
held-out split is the "real data" reference in the quickstart's quality report.
"""

import numpy as np

NUM_TRAIN = 1500
_SPLIT_SEED = 0


def load_digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 [N, 8, 8, 1] in 0..255, labels int32 [N]) for 'train' or 'test'."""
    from sklearn.datasets import load_digits  # imported lazily: only the digits need sklearn

    if split not in ("train", "test"):
        raise ValueError(f"digits split must be 'train' or 'test', got {split!r}")
    digits = load_digits()
    # Pixel values are integers 0..16; map 16 to 255 so the images look like any other uint8 data.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    order = np.random.RandomState(_SPLIT_SEED).permutation(len(images))
    idx = order[:NUM_TRAIN] if split == "train" else order[NUM_TRAIN:]
    return images[idx], labels[idx]
