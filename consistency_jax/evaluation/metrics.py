"""Sample-quality metrics in a feature space: FID, Inception Score, improved precision/recall.

Definitions follow the evaluators whose numbers papers publish (TTUR / ADM):
- FID: Frechet distance of pool features' Gaussians (frechet.py);
- IS: exp(E_x KL(p(y|x) || p(y))) over 10 consecutive splits, mean and std;
- precision/recall (Kynkaanniemi et al. 2019, k = 3): a sample is inside a
  set's manifold if it lies within the k-th nearest-neighbour radius of some
  member of that set; precision = fake samples inside the real manifold,
  recall = real samples inside the fake manifold.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from consistency_jax.evaluation import frechet
from consistency_jax.evaluation.extractors import FeatureExtractor
from consistency_jax.evaluation.reference_stats import ReferenceStats

_ROW_BLOCK = 1024  # rows of the distance matrix computed at once; bounds memory to block x N floats


def inception_score(logits: np.ndarray, num_splits: int = 10) -> tuple[float, float]:
    """(mean, std) of exp(E KL(p(y|x) || p(y))) over `num_splits` consecutive splits of logits [N, K]."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or len(logits) < num_splits:
        raise ValueError(f"inception_score needs logits [N >= num_splits={num_splits}, K], got {logits.shape}.")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    scores = []
    for part in np.array_split(log_p, num_splits):
        log_marginal = np.log(np.exp(part).mean(axis=0))
        kl = np.sum(np.exp(part) * (part - log_marginal), axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


@jax.jit
def _squared_distances(rows: jax.Array, columns: jax.Array) -> jax.Array:
    norms = jnp.sum(rows**2, axis=1)[:, None] + jnp.sum(columns**2, axis=1)[None, :]
    return jnp.maximum(norms - 2.0 * rows @ columns.T, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_distance(rows: jax.Array, columns: jax.Array, k: int) -> jax.Array:
    # k + 1 smallest: each row's own distance (0) is among them.
    return -jax.lax.top_k(-_squared_distances(rows, columns), k + 1)[0][:, -1]


@jax.jit
def _inside_any_ball(rows: jax.Array, centres: jax.Array, squared_radii: jax.Array) -> jax.Array:
    return jnp.any(_squared_distances(rows, centres) <= squared_radii[None, :], axis=1)


def _by_row_blocks(fn, rows: np.ndarray, *args) -> np.ndarray:
    return np.concatenate([np.asarray(fn(rows[i : i + _ROW_BLOCK], *args)) for i in range(0, len(rows), _ROW_BLOCK)])


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall with k-nearest-neighbour manifolds."""
    real = jnp.asarray(real_features, jnp.float32)
    fake = jnp.asarray(fake_features, jnp.float32)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1] or min(len(real), len(fake)) <= k:
        raise ValueError(
            f"precision_recall needs features [N > k={k}, D] of one D, got {real.shape} and {fake.shape}."
        )
    real_radii = _by_row_blocks(functools.partial(_kth_distance, k=k), real, real)
    fake_radii = _by_row_blocks(functools.partial(_kth_distance, k=k), fake, fake)
    precision = _by_row_blocks(_inside_any_ball, fake, real, real_radii).mean()
    recall = _by_row_blocks(_inside_any_ball, real, fake, fake_radii).mean()
    return float(precision), float(recall)


def compute_metrics(extractor: FeatureExtractor, images_uint8: np.ndarray, reference: ReferenceStats) -> dict:
    """FID against the reference; IS when the extractor has logits; precision/recall when the reference has features."""
    if reference.extractor != extractor.name:
        raise ValueError(
            f"Reference statistics were computed with the {reference.extractor!r} features, but the extractor "
            f"is {extractor.name!r}: distances across feature spaces mean nothing."
        )
    features = extractor(images_uint8)
    mu, sigma = frechet.feature_statistics(features["pool"])
    results = {
        "fid": frechet.frechet_distance(mu, sigma, reference.mu, reference.sigma),
        "num_samples": len(features["pool"]),
    }
    if features["logits"] is not None:
        results["is"], results["is_std"] = inception_score(features["logits"])
    if reference.features is not None:
        results["precision"], results["recall"] = precision_recall(reference.features, features["pool"])
    return results
