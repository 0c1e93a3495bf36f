"""Statistics of real data that samples are compared against: computed and cached, or loaded from ADM's files.

A reference is tied to the feature space it was computed in (`extractor`),
so a digits reference can never be compared with Inception features.

`config.eval.reference` picks it for --mode=eval, evaluations during
training and the JSON report: 'train' (the training set, the default) or the
path of an ADM evaluator reference batch (.npz, e.g.
VIRTUAL_imagenet64_labeled.npz from openai/guided-diffusion's evaluations/),
the reference the ADM, CM and iCT papers report ImageNet FIDs against.
"""

import dataclasses
import hashlib
import os
from typing import Any

import numpy as np
from absl import logging

from consistency_jax.evaluation import frechet


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
    """mu [D] and sigma [D, D] (float64) of real features; the features themselves when kept (precision/recall)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None
    num_examples: int  # 0 when unknown (statistics loaded without their images)
    extractor: str  # the feature extractor's name
    source: str  # where the images came from, for reports

    @classmethod
    def from_features(cls, features: np.ndarray, *, extractor: str, source: str) -> "ReferenceStats":
        mu, sigma = frechet.feature_statistics(features)
        return cls(mu, sigma, np.asarray(features, np.float32), len(features), extractor, source)

    def save(self, path: str) -> None:
        arrays = {"mu": self.mu, "sigma": self.sigma, "num_examples": self.num_examples,
                  "extractor": self.extractor, "source": self.source}
        if self.features is not None:
            arrays["features"] = self.features
        partial = path + ".partial.npz"  # written whole, then renamed: a reader never sees half a file
        np.savez(partial, **arrays)
        os.replace(partial, path)

    @classmethod
    def load(cls, path: str) -> "ReferenceStats":
        with np.load(path) as stored:
            features = stored["features"] if "features" in stored.files else None
            return cls(stored["mu"], stored["sigma"], features, int(stored["num_examples"]),
                       str(stored["extractor"]), str(stored["source"]))


def _dataset_tag(data_config) -> str:
    tag = f"{data_config.name}{data_config.image_size}"
    location = f"{data_config.get('path')}|{data_config.get('data_dir')}"
    return f"{tag}_{hashlib.sha1(location.encode()).hexdigest()[:8]}"


def _load_real_images(data_config, split: str, num_examples: int | None) -> np.ndarray:
    if data_config.name == "digits":
        from consistency_jax.data import digits

        return digits.load_digits_split(split)[0][:num_examples]
    # Imported here: the pipeline is heavier (grain, tfds) and only needed for other datasets.
    from consistency_jax.data.pipeline import load_eval_images

    return load_eval_images(data_config, split, num_examples)[0]


def reference_statistics(extractor, data_config, cache_dir: str, split: str,
                         num_examples: int | None = None) -> ReferenceStats:
    """Statistics of up to `num_examples` real images of `split` (None: all), cached as .npz in cache_dir."""
    count = "all" if num_examples is None else str(num_examples)
    path = os.path.join(cache_dir, f"reference_{extractor.name}_{_dataset_tag(data_config)}_{split}_{count}.npz")
    if os.path.exists(path):
        try:
            return ReferenceStats.load(path)
        except Exception as e:  # noqa: BLE001 -- a damaged cache file is recomputed, not fatal
            logging.warning("The cached reference statistics %s cannot be read (%s: %s); computing them again.",
                            path, type(e).__name__, e)
    images = _load_real_images(data_config, split, num_examples)
    features = extractor(images)["pool"]
    stats = ReferenceStats.from_features(
        features, extractor=extractor.name, source=f"{data_config.name} {split} ({len(images)} images)"
    )
    os.makedirs(cache_dir, exist_ok=True)
    stats.save(path)
    return stats


def load_adm_reference(path: str, extractor=None) -> ReferenceStats:
    """An ADM evaluator reference batch (.npz): its 'mu'/'sigma', and with an extractor the features of its
    images 'arr_0' (needed for precision/recall, and for the statistics when the file has none).

    ADM's statistics are Inception pool3 ones, so the extractor, if given, must be 'inception'.
    """
    if extractor is not None and extractor.name != "inception":
        raise ValueError(f"ADM reference batches hold Inception statistics; the extractor is {extractor.name!r}.")
    with np.load(path) as stored:
        keys = set(stored.files)
        has_stats = {"mu", "sigma"} <= keys
        if not has_stats and not ("arr_0" in keys and extractor is not None):
            raise ValueError(
                f"{path} has keys {sorted(keys)}: an ADM reference batch needs 'mu' and 'sigma', or images "
                "'arr_0' together with an Inception feature extractor."
            )
        features = extractor(stored["arr_0"])["pool"] if "arr_0" in keys and extractor is not None else None
        source = f"ADM reference {os.path.basename(path)}"
        if not has_stats:
            return ReferenceStats.from_features(features, extractor="inception", source=source)
        mu, sigma = np.asarray(stored["mu"], np.float64), np.asarray(stored["sigma"], np.float64)
    num_examples = len(features) if features is not None else 0  # 0: the file's statistics do not say
    return ReferenceStats(mu, sigma, features, num_examples, "inception", source)


TRAINING_SET = "train"  # config.eval.reference: statistics of the training split


def check_reference(eval_config) -> None:
    """Raises ValueError when config.eval.reference is neither 'train' nor a usable ADM reference batch."""
    reference = eval_config.reference
    if reference == TRAINING_SET:
        return
    valid = f"valid: {TRAINING_SET!r} (the training set) or the path of an ADM reference batch .npz"
    if not isinstance(reference, str) or not reference.endswith(".npz"):
        raise ValueError(f"config.eval.reference={reference!r}; {valid}.")
    if not os.path.isfile(reference):
        raise ValueError(f"config.eval.reference={reference!r} is not a file; {valid}.")
    if eval_config.feature_extractor != "inception":
        raise ValueError(f"config.eval.reference={reference!r} is an ADM reference batch of Inception statistics, "
                         f"but config.eval.feature_extractor={eval_config.feature_extractor!r}; set it to "
                         f"'inception' or use config.eval.reference={TRAINING_SET!r}.")


def evaluation_reference(extractor, config, cache_dir: str) -> ReferenceStats:
    """The reference that config.eval.reference names, cached in cache_dir (see check_reference)."""
    reference = config.eval.reference
    if reference == TRAINING_SET:
        return reference_statistics(extractor, config.data, cache_dir, split="train", num_examples=None)
    return cached_adm_reference(reference, extractor, cache_dir)


def cached_adm_reference(path: str, extractor: Any, cache_dir: str) -> ReferenceStats:
    """load_adm_reference with the features of its images cached: they take one Inception pass over them."""
    stat = os.stat(path)
    identity = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    stem = os.path.splitext(os.path.basename(path))[0]
    cached = os.path.join(cache_dir, f"reference_adm_{stem}_{hashlib.sha1(identity.encode()).hexdigest()[:8]}.npz")
    if os.path.exists(cached):
        return ReferenceStats.load(cached)
    stats = load_adm_reference(path, extractor)
    os.makedirs(cache_dir, exist_ok=True)
    stats.save(cached)
    return stats
