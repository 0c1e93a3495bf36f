"""Feature extractors: the networks whose feature space the metrics are computed in.

Every metric goes through one interface, so swapping the network is a config
change (`config.eval.feature_extractor`):

    extractor(images uint8 [N, H, W, C] in 0..255) -> {'pool': [N, D], 'logits': [N, K] or None}

'inception' is the standard FID Inception-v3 (pool3, 2048-d; 1008 logits for
IS); 'digits' is a small classifier trained on the 8x8 digits (the
quickstart's quality report, see digits_features.py).
"""

from typing import Any, Callable, Protocol

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from consistency_jax.evaluation import digits_features, inception, inception_weights

EXTRACTORS = ("digits", "inception")
_BATCH_AXIS = "batch"


class FeatureExtractor(Protocol):
    name: str

    def __call__(self, images_uint8_nhwc: np.ndarray) -> dict[str, np.ndarray | None]: ...


def _evaluation_devices() -> list[jax.Device]:
    # One host: every device. Several hosts: each evaluates on its own devices,
    # so the features come back to numpy without a cross-host gather.
    return jax.devices() if jax.process_count() == 1 else jax.local_devices()


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class JaxFeatureExtractor:
    """Runs `apply_fn(variables, images) -> {'pool', 'logits'}` jitted, in fixed-size batches sharded over devices.

    The last batch is padded to the full size, so there is one compilation and
    the batch always divides over the devices.
    """

    def __init__(self, name: str, apply_fn: Callable[[Any, jax.Array], dict], variables: Any, *, batch_size: int,
                 details: dict[str, Any] | None = None):
        self.name = name
        self.details = details or {}  # facts worth reporting next to the metrics (e.g. classifier accuracy)
        devices = _evaluation_devices()
        self._num_devices = len(devices)
        self._batch_size = _round_up(batch_size, self._num_devices)
        mesh = Mesh(np.asarray(devices), (_BATCH_AXIS,))
        self._data_sharding = NamedSharding(mesh, PartitionSpec(_BATCH_AXIS))
        self._variables = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
        self._apply = jax.jit(apply_fn, out_shardings=self._data_sharding)

    def __call__(self, images_uint8_nhwc: np.ndarray) -> dict[str, np.ndarray | None]:
        images = np.asarray(images_uint8_nhwc)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"Feature extractors take uint8 NHWC images in 0..255, got {images.dtype} {images.shape}.")
        # Small sets run as one smaller batch rather than padding up to the full batch size.
        batch_size = min(self._batch_size, _round_up(len(images), self._num_devices))
        outputs: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            real = len(batch)
            if real < batch_size:
                padding = np.zeros((batch_size - real, *batch.shape[1:]), np.uint8)
                batch = np.concatenate([batch, padding])
            result = self._apply(self._variables, jax.device_put(batch, self._data_sharding))
            for key, value in result.items():
                if value is not None:
                    outputs.setdefault(key, []).append(np.asarray(value, np.float32)[:real])
        if not outputs:
            raise ValueError("Feature extractor got no images.")
        features = {key: np.concatenate(parts) for key, parts in outputs.items()}
        return {"pool": features["pool"], "logits": features.get("logits")}


def inception_extractor(weights_location: str | None, *, batch_size: int = 200,
                        allow_download: bool = True) -> JaxFeatureExtractor:
    """The FID Inception-v3 with weights from `weights_location` (a directory or file; None: ~/.cache)."""
    path = inception_weights.find_weights(weights_location, allow_download=allow_download)
    variables = inception_weights.load_inception_variables(path)
    return JaxFeatureExtractor("inception", inception.InceptionV3().apply, variables, batch_size=batch_size)


def digits_extractor(cache_dir: str, *, batch_size: int = 512) -> JaxFeatureExtractor:
    """The digits classifier's features; trained once on the training digits and cached in cache_dir."""
    variables, held_out_accuracy = digits_features.load_or_train_classifier(cache_dir)
    return JaxFeatureExtractor(
        "digits",
        digits_features.DigitsClassifier().apply,
        variables,
        batch_size=batch_size,
        details={"classifier_held_out_accuracy": held_out_accuracy},
    )


def create_feature_extractor(eval_config, *, cache_dir: str, data_config=None) -> JaxFeatureExtractor:
    """The extractor named by eval_config.feature_extractor ('digits' or 'inception')."""
    name = eval_config.feature_extractor
    if name == "inception":
        return inception_extractor(eval_config.get("inception_dir"))
    if name == "digits":
        if data_config is not None and (data_config.image_size, data_config.num_channels) != (8, 1):
            raise ValueError(
                "The 'digits' feature extractor is a classifier of 8x8 grayscale digits; data is "
                f"{data_config.image_size}x{data_config.image_size}x{data_config.num_channels}. "
                "Set config.eval.feature_extractor='inception'."
            )
        return digits_extractor(cache_dir)
    raise ValueError(f"Unknown config.eval.feature_extractor {name!r}; valid: {', '.join(EXTRACTORS)}.")
