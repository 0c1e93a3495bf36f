"""Metric maths (Frechet distance, IS, precision/recall), the digits feature space, references, extractors."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.special
import scipy.stats

from consistency_jax.data import digits
from consistency_jax.evaluation import (
    digits_features,
    extractors,
    frechet,
    inception_weights,
    metrics,
    reference_stats,
)


def _random_spd(rng, dim):
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def _frechet_by_eigh(mu1, s1, mu2, s2):
    """Independent formula: tr (S1 S2)^1/2 = sum sqrt(eig(S1^1/2 S2 S1^1/2)), all symmetric."""
    w, v = scipy.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = scipy.linalg.eigvalsh(root1 @ s2 @ root1)
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(middle, 0, None)))


# ----------------------------------------------------------------------------- Frechet distance


def test_frechet_distance_of_1d_gaussians_is_closed_form():
    # N(1, 2^2) vs N(-2, 3^2): (1 + 2)^2 + (2 - 3)^2 = 10.
    assert frechet.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]])) == (
        pytest.approx(10.0, rel=1e-12)
    )


def test_frechet_distance_of_diagonal_and_scaled_gaussians_is_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    a, b = rng.uniform(0.1, 3.0, size=16), rng.uniform(0.1, 3.0, size=16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # Full (non-diagonal) covariance S and 4 S: tr(S + 4S - 2 * 2S) = tr(S).
    s = _random_spd(rng, 16)
    assert frechet.frechet_distance(mu1, s, mu1, 4 * s) == pytest.approx(np.trace(s), rel=1e-9)


def test_frechet_distance_matches_scipy_eigh_on_random_features():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 32)) @ rng.normal(size=(32, 32))
    y = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32)) + 0.5
    mu1, s1 = frechet.feature_statistics(x)
    mu2, s2 = frechet.feature_statistics(y)
    np.testing.assert_allclose(mu1, x.mean(0))
    np.testing.assert_allclose(s1, np.cov(x.T))
    assert frechet.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_frechet_by_eigh(mu1, s1, mu2, s2), rel=1e-8)


def test_frechet_distance_of_a_set_against_itself_is_zero():
    features = np.random.default_rng(2).normal(size=(300, 64))
    stats = frechet.feature_statistics(features)
    assert abs(frechet.frechet_distance(*stats, *stats)) < 1e-8


def test_frechet_distance_handles_singular_covariances():
    # Fewer samples than dimensions: rank-deficient covariances, where sqrtm leaves round-off imaginary parts.
    rng = np.random.default_rng(3)
    mu1, s1 = frechet.feature_statistics(rng.normal(size=(20, 40)))
    mu2, s2 = frechet.feature_statistics(rng.normal(size=(20, 40)) + 1.0)
    value = frechet.frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(value, float) and np.isfinite(value)
    assert value == pytest.approx(_frechet_by_eigh(mu1, s1, mu2, s2), rel=1e-3)


def test_frechet_distance_rejects_invalid_input():
    with pytest.raises(ValueError, match="imaginary"):  # sqrtm(-I) = i I: not a covariance
        frechet.frechet_distance(np.zeros(3), -np.eye(3), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="one D"):
        frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="N >= 2"):
        frechet.feature_statistics(np.zeros((1, 3)))


# ----------------------------------------------------------------------------- Inception Score


def test_inception_score_of_uniform_logits_is_one():
    mean, std = metrics.inception_score(np.zeros((100, 1008)))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_balanced_predictions_is_the_number_of_classes():
    logits = 50.0 * np.eye(8)[np.arange(240) % 8]  # each split of 24 holds the 8 classes 3 times
    mean, _ = metrics.inception_score(logits)
    assert mean == pytest.approx(8.0, rel=1e-6)


def test_inception_score_matches_entropy_formula():
    logits = np.random.default_rng(4).normal(scale=3.0, size=(250, 12))
    scores = []
    for part in np.array_split(scipy.special.softmax(logits, axis=1), 10):
        # exp(E KL(p(y|x) || p(y))) = exp(H(p(y)) - E H(p(y|x)))
        marginal_entropy = scipy.stats.entropy(part.mean(0))
        scores.append(np.exp(marginal_entropy - scipy.stats.entropy(part, axis=1).mean()))
    mean, std = metrics.inception_score(logits)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-8)


# ----------------------------------------------------------------------------- precision / recall


def _brute_force_precision_recall(real, fake, k):
    def radii(x):
        return np.sort(scipy.spatial.distance.cdist(x, x), axis=1)[:, k]  # column 0 is the point itself

    precision = np.mean(np.any(scipy.spatial.distance.cdist(fake, real) <= radii(real)[None], axis=1))
    recall = np.mean(np.any(scipy.spatial.distance.cdist(real, fake) <= radii(fake)[None], axis=1))
    return precision, recall


def test_precision_recall_matches_brute_force(monkeypatch):
    monkeypatch.setattr(metrics, "_ROW_BLOCK", 64)  # several blocks, a ragged last one
    rng = np.random.default_rng(5)
    real = rng.normal(size=(300, 6))
    fake = rng.normal(loc=0.7, scale=0.6, size=(250, 6))
    precision, recall = metrics.precision_recall(real, fake, k=3)
    expected = _brute_force_precision_recall(real, fake, 3)
    assert (precision, recall) == pytest.approx(expected, abs=1e-6)
    assert 0.05 < precision < 0.999 and 0.05 < recall < 0.999  # a case that can tell right from wrong


def test_precision_recall_of_same_and_disjoint_sets():
    real = np.random.default_rng(6).normal(size=(200, 4))
    assert metrics.precision_recall(real, real) == (1.0, 1.0)
    assert metrics.precision_recall(real, real + 100.0) == (0.0, 0.0)
    with pytest.raises(ValueError, match="one D"):
        metrics.precision_recall(real, real[:, :3])


# ----------------------------------------------------------------------------- digits feature space


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("digits_cache"))


@pytest.fixture(scope="module")
def digits_extractor(digits_cache):
    return extractors.digits_extractor(digits_cache)


def test_digits_classifier_is_accurate_cached_and_deterministic(digits_cache, digits_extractor, tmp_path):
    variables, accuracy = digits_features.load_or_train_classifier(digits_cache)  # the cached one
    assert accuracy > 0.95
    assert digits_extractor.details["classifier_held_out_accuracy"] == accuracy
    cached = [f for f in os.listdir(digits_cache) if f.startswith("digits_classifier_")]
    assert len(cached) == 1
    retrained, _ = digits_features.load_or_train_classifier(str(tmp_path))  # trained again from scratch
    jax.tree.map(np.testing.assert_array_equal, variables, retrained)


def test_digits_features_are_identical_after_reload(digits_cache, digits_extractor):
    images, _ = digits.load_digits_split("test")
    reloaded = extractors.digits_extractor(digits_cache)
    first, second = digits_extractor(images), reloaded(images)
    np.testing.assert_array_equal(first["pool"], second["pool"])
    assert first["pool"].shape == (len(images), digits_features.FEATURES)
    assert first["logits"].shape == (len(images), 10)


def test_digits_features_separate_real_digits_from_noise(digits_extractor):
    train, _ = digits.load_digits_split("train")
    test, _ = digits.load_digits_split("test")
    noise = np.random.default_rng(7).integers(0, 256, size=test.shape, dtype=np.uint8)
    train_stats = frechet.feature_statistics(digits_extractor(train)["pool"])
    real_fd = frechet.frechet_distance(*frechet.feature_statistics(digits_extractor(test)["pool"]), *train_stats)
    noise_fd = frechet.frechet_distance(*frechet.feature_statistics(digits_extractor(noise)["pool"]), *train_stats)
    assert real_fd < 0.1 * noise_fd


def test_extractor_batches_and_shards_like_a_direct_call(digits_cache):
    variables, _ = digits_features.load_or_train_classifier(digits_cache)
    # 37 images in batches of 16 over the 8 test devices: two full batches and a padded one.
    extractor = extractors.JaxFeatureExtractor(
        "digits", digits_features.DigitsClassifier().apply, variables, batch_size=16
    )
    images, _ = digits.load_digits_split("test")
    images = images[:37]
    direct = digits_features.DigitsClassifier().apply(variables, jnp.asarray(images))
    features = extractor(images)
    np.testing.assert_allclose(features["pool"], np.asarray(direct["pool"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(features["logits"], np.asarray(direct["logits"]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        extractor(images.astype(np.float32))


# ----------------------------------------------------------------------------- the factory


def _eval_config(name, inception_dir=None):
    return ml_collections.ConfigDict({"feature_extractor": name, "inception_dir": inception_dir})


def _data_config(name="digits", image_size=8, num_channels=1):
    return ml_collections.ConfigDict(
        {"name": name, "image_size": image_size, "num_channels": num_channels, "path": None, "data_dir": None}
    )


def test_create_feature_extractor_by_name(digits_cache, tmp_path, monkeypatch):
    extractor = extractors.create_feature_extractor(_eval_config("digits"), cache_dir=digits_cache,
                                                    data_config=_data_config())
    assert extractor.name == "digits"
    with pytest.raises(ValueError, match="digits, inception"):
        extractors.create_feature_extractor(_eval_config("clip"), cache_dir=digits_cache)
    with pytest.raises(ValueError, match="inception"):
        extractors.create_feature_extractor(_eval_config("digits"), cache_dir=digits_cache,
                                            data_config=_data_config("cifar10", 32, 3))

    def no_internet(url, destination):
        raise OSError("network unreachable")

    monkeypatch.setattr(inception_weights, "_download", no_internet)
    with pytest.raises(FileNotFoundError) as error:
        extractors.create_feature_extractor(_eval_config("inception", str(tmp_path)), cache_dir=digits_cache)
    message = str(error.value)
    for expected in (inception_weights.TF_GRAPH_URL, inception_weights.TF_GRAPH_ARCHIVE,
                     inception_weights.PTH_FILE, str(tmp_path), "network unreachable"):
        assert expected in message


# ----------------------------------------------------------------------------- references and metrics


def test_reference_statistics_are_computed_cached_and_reloaded(digits_extractor, tmp_path):
    reference = reference_stats.reference_statistics(digits_extractor, _data_config(), str(tmp_path), "test")
    images, _ = digits.load_digits_split("test")
    mu, sigma = frechet.feature_statistics(digits_extractor(images)["pool"])
    np.testing.assert_allclose(reference.mu, mu)
    np.testing.assert_allclose(reference.sigma, sigma)
    assert reference.num_examples == len(images) and reference.extractor == "digits"
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".npz")
    reloaded = reference_stats.reference_statistics(digits_extractor, _data_config(), str(tmp_path), "test")
    np.testing.assert_array_equal(reloaded.sigma, reference.sigma)
    np.testing.assert_array_equal(reloaded.features, reference.features)
    assert (reloaded.num_examples, reloaded.source) == (reference.num_examples, reference.source)
    limited = reference_stats.reference_statistics(digits_extractor, _data_config(), str(tmp_path), "train", 100)
    assert limited.num_examples == 100


def test_compute_metrics_of_the_reference_set_itself(digits_extractor, tmp_path):
    reference = reference_stats.reference_statistics(digits_extractor, _data_config(), str(tmp_path), "test")
    images, _ = digits.load_digits_split("test")
    results = metrics.compute_metrics(digits_extractor, images, reference)
    assert abs(results["fid"]) < 1e-6
    assert (results["precision"], results["recall"]) == (1.0, 1.0)
    assert results["num_samples"] == len(images)
    assert 5.0 < results["is"] <= 10.0  # a 98%-accurate 10-class classifier on balanced real digits
    noise = np.random.default_rng(8).integers(0, 256, size=images.shape, dtype=np.uint8)
    assert metrics.compute_metrics(digits_extractor, noise, reference)["fid"] > 10.0
    foreign = reference_stats.ReferenceStats(reference.mu, reference.sigma, None, 1, "inception", "x")
    with pytest.raises(ValueError, match="feature spaces"):
        metrics.compute_metrics(digits_extractor, images, foreign)


class _StubInception:
    """Stands in for the Inception extractor: features are a fixed function of the pixels."""

    name = "inception"

    def __call__(self, images):
        flat = images.reshape(len(images), -1).astype(np.float32)
        return {"pool": flat[:, :16] + 0.5 * flat[:, 16:32], "logits": None}


def test_load_adm_reference_batches(tmp_path):
    rng = np.random.default_rng(9)
    images = rng.integers(0, 256, size=(50, 4, 4, 3), dtype=np.uint8)
    mu, sigma = rng.normal(size=16), _random_spd(rng, 16)
    with_stats = str(tmp_path / "with_stats.npz")
    np.savez(with_stats, arr_0=images, mu=mu, sigma=sigma)
    loaded = reference_stats.load_adm_reference(with_stats)
    np.testing.assert_array_equal(loaded.mu, mu)
    np.testing.assert_array_equal(loaded.sigma, sigma)
    assert loaded.features is None and loaded.extractor == "inception"
    with_features = reference_stats.load_adm_reference(with_stats, _StubInception())
    np.testing.assert_array_equal(with_features.mu, mu)  # the file's statistics win
    np.testing.assert_array_equal(with_features.features, _StubInception()(images)["pool"])
    images_only = str(tmp_path / "images_only.npz")
    np.savez(images_only, arr_0=images)
    computed = reference_stats.load_adm_reference(images_only, _StubInception())
    expected_mu, expected_sigma = frechet.feature_statistics(_StubInception()(images)["pool"])
    np.testing.assert_allclose(computed.mu, expected_mu)
    np.testing.assert_allclose(computed.sigma, expected_sigma)
    with pytest.raises(ValueError, match="arr_0"):
        reference_stats.load_adm_reference(images_only)

    class Digits(_StubInception):
        name = "digits"

    with pytest.raises(ValueError, match="Inception statistics"):
        reference_stats.load_adm_reference(with_stats, Digits())


def test_adm_reference_features_are_computed_once_and_cached(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(30, 4, 4, 3), dtype=np.uint8)
    path = str(tmp_path / "VIRTUAL_test.npz")
    np.savez(path, arr_0=images, mu=rng.normal(size=16), sigma=_random_spd(rng, 16))
    calls = []

    class Counting(_StubInception):
        def __call__(self, batch):
            calls.append(len(batch))
            return super().__call__(batch)

    first = reference_stats.cached_adm_reference(path, Counting(), str(tmp_path / "cache"))
    second = reference_stats.cached_adm_reference(path, Counting(), str(tmp_path / "cache"))
    assert calls == [30]  # the second load reads the cache
    np.testing.assert_array_equal(second.features, first.features)
    np.testing.assert_array_equal(second.sigma, first.sigma)
    assert second.source == first.source == "ADM reference VIRTUAL_test.npz"
    # A changed file is not served from the stale cache.
    np.savez(path, arr_0=images[:20], mu=rng.normal(size=16), sigma=_random_spd(rng, 16))
    os.utime(path, ns=(1, 1))
    assert len(reference_stats.cached_adm_reference(path, Counting(), str(tmp_path / "cache")).features) == 20


@pytest.mark.parametrize("reference,extractor,message", [
    ("test", "digits", "valid: 'train'"),
    ("{tmp}/missing.npz", "inception", "is not a file"),
    ("{tmp}/ref.npz", "digits", "feature_extractor='digits'"),
])
def test_eval_reference_is_checked_before_anything_runs(tmp_path, reference, extractor, message):
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2), sigma=np.eye(2))
    config = ml_collections.ConfigDict({"reference": reference.format(tmp=tmp_path), "feature_extractor": extractor})
    with pytest.raises(ValueError, match=message):
        reference_stats.check_reference(config)
    reference_stats.check_reference(ml_collections.ConfigDict({"reference": "train", "feature_extractor": "digits"}))
    reference_stats.check_reference(ml_collections.ConfigDict({"reference": str(tmp_path / "ref.npz"),
                                                               "feature_extractor": "inception"}))
