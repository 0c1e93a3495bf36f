"""A small digits classifier whose penultimate layer is the quickstart's feature space.

Inception features mean little on 8x8 grayscale digits, so the quickstart's
quality report measures the Frechet distance in the feature space of this
classifier instead. It is trained on the training digits only (the held-out
split is the "real" reference), with a fixed seed and recipe so that every run
and every experiment measures in the same space; the trained parameters are
cached in a directory (the workdir) and reloaded bit-for-bit.
"""

import hashlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from consistency_jax.data import digits

NUM_CLASSES = 10
# The recipe: changing any of it changes the cache file name (see _cache_path).
SEED = 0
HIDDEN = 128
FEATURES = 64
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 1e-4
BATCH_SIZE = 100
EPOCHS = 40


class DigitsClassifier(nn.Module):
    """uint8 [N, 8, 8, 1] -> {'pool': [N, FEATURES] (penultimate ReLU layer), 'logits': [N, 10]}."""

    @nn.compact
    def __call__(self, images: jnp.ndarray) -> dict[str, jnp.ndarray]:
        if images.shape[1:] != (8, 8, 1):
            raise ValueError(f"The digits classifier takes [N, 8, 8, 1] images, got shape {images.shape}.")
        x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
        x = nn.relu(nn.Dense(HIDDEN)(x))
        pool = nn.relu(nn.Dense(FEATURES)(x))
        return {"pool": pool, "logits": nn.Dense(NUM_CLASSES)(pool)}


def _loss(params, images, labels):
    logits = DigitsClassifier().apply({"params": params}, images)["logits"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_classifier(images: np.ndarray, labels: np.ndarray, seed: int = SEED) -> dict:
    """Trains on (images uint8 [N, 8, 8, 1], labels) with minibatch AdamW; the same seed gives the same params."""
    init_key, shuffle_key = jax.random.split(jax.random.PRNGKey(seed))
    params = DigitsClassifier().init(init_key, jnp.zeros((1, 8, 8, 1), jnp.uint8))["params"]
    optimizer = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = len(images) // BATCH_SIZE
    # Every epoch's shuffle up front: the whole run is one scan, compiled once.
    order = jax.vmap(lambda key: jax.random.permutation(key, len(images)))(jax.random.split(shuffle_key, EPOCHS))
    batches = order[:, : steps_per_epoch * BATCH_SIZE].reshape(-1, BATCH_SIZE)

    @jax.jit
    def run(params, images, labels, batches):
        def step(carry, batch):
            params, opt_state = carry
            grads = jax.grad(_loss)(params, images[batch], labels[batch])
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), batches)
        return params

    params = run(params, jnp.asarray(images), jnp.asarray(labels), batches)
    return {"params": jax.device_get(params)}


def accuracy(variables: dict, images: np.ndarray, labels: np.ndarray) -> float:
    logits = DigitsClassifier().apply(variables, jnp.asarray(images))["logits"]
    return float(np.mean(np.argmax(np.asarray(logits), axis=-1) == labels))


def _cache_path(cache_dir: str) -> str:
    recipe = f"{SEED}-{HIDDEN}-{FEATURES}-{LEARNING_RATE}-{WEIGHT_DECAY}-{BATCH_SIZE}-{EPOCHS}-{digits.NUM_TRAIN}"
    return os.path.join(cache_dir, f"digits_classifier_{hashlib.sha1(recipe.encode()).hexdigest()[:10]}.npz")


def load_or_train_classifier(cache_dir: str) -> tuple[dict, float]:
    """(variables, held-out accuracy): loaded from cache_dir, or trained on the training split and saved there."""
    path = _cache_path(cache_dir)
    if os.path.exists(path):
        try:
            with np.load(path) as stored:
                flat = {tuple(key.split("/")): stored[key] for key in stored.files if key != "test_accuracy"}
                return traverse_util.unflatten_dict(flat), float(stored["test_accuracy"])
        except Exception as e:  # noqa: BLE001 -- a damaged cache file is rebuilt, not fatal
            logging.warning("The cached digits classifier %s cannot be read (%s: %s); training it again.", path,
                            type(e).__name__, e)
    variables = train_classifier(*digits.load_digits_split("train"))
    test_accuracy = accuracy(variables, *digits.load_digits_split("test"))
    os.makedirs(cache_dir, exist_ok=True)
    flat = {"/".join(key): np.asarray(value) for key, value in traverse_util.flatten_dict(variables).items()}
    partial = path + ".partial.npz"  # written whole, then renamed: a reader never sees half a file
    np.savez(partial, test_accuracy=test_accuracy, **flat)
    os.replace(partial, path)
    return variables, test_accuracy
