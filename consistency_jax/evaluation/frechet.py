"""Frechet distance between Gaussians fitted to feature sets (FID when the features are Inception's).

    d^2 = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))

computed in float64 the way the TF (TTUR), pytorch-fid and ADM evaluators do,
so numbers agree with theirs: scipy's matrix square root of S1 S2; if that is
not finite (near-singular product), retry with 1e-6 added to both diagonals;
drop the imaginary part that round-off leaves, but refuse a large one.
"""

import warnings

import numpy as np
import scipy.linalg

_SINGULAR_OFFSET = 1e-6
_MAX_IMAGINARY = 1e-3  # on the diagonal of sqrtm(S1 S2); the standard evaluators' tolerance


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) in float64 of features [N, D], covariance with N - 1 as np.cov."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature_statistics needs features [N >= 2, D], got shape {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"Frechet distance needs means [D] and covariances [D, D] of one D; got {mu1.shape}, "
            f"{sigma1.shape}, {mu2.shape}, {sigma2.shape}."
        )
    with warnings.catch_warnings():
        # Singular products are common (dead ReLU features, N < D) and handled below; don't warn on each call.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(dim) * _SINGULAR_OFFSET
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest = np.max(np.abs(np.diagonal(covmean).imag))
        if largest > _MAX_IMAGINARY:
            raise ValueError(f"Frechet distance: sqrtm(S1 S2) has an imaginary part of {largest:.3g}; "
                             "the covariances are not valid (positive semi-definite) estimates.")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
