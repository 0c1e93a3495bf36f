"""The FID Inception computes what the reference evaluators compute, weight for weight.

The references are pytorch-fid's FID Inception (FIDInceptionA/C/E_1/E_2, the
TF graph's network in PyTorch) and a GraphDef with the 2015-12-05 graph's node
names and ops, executed by TensorFlow. Both ran once, in
tests/fixtures/make_inception_parity.py, on seeded random weights (batch-norm
statistics included) and recorded pool3 and the logits. Here the same weight
files are rebuilt (tests/fixtures/inception_parity.py), read by the framework's
own loaders, and the framework's network must reproduce the recorded outputs.
A swapped pooling mode, a transposed kernel, a wrong batch-norm epsilon or a
mis-mapped tensor changes the outputs far beyond the tolerance.
"""

import hashlib
import os

import jax
import numpy as np
import pytest

from consistency_jax.evaluation import inception, inception_weights
from tests.fixtures import inception_parity

# Relative to the largest reference value; the references agree with each other to 3e-7 (see the fixture script).
RELATIVE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def expected():
    with np.load(inception_parity.EXPECTED) as recorded:
        return dict(recorded)


@pytest.fixture(scope="module")
def inputs():
    images, small = inception_parity.images(), inception_parity.small_images()
    digest = hashlib.sha256(images.tobytes() + small.tobytes()).hexdigest()
    assert digest == inception_parity.load_manifest()["images_sha256"], "not the images the references saw"
    return images, small


@pytest.fixture(scope="module")
def forward():
    return jax.jit(inception.InceptionV3().apply)


def _assert_matches(actual, reference, what):
    actual, reference = np.asarray(actual), np.asarray(reference)
    scale = np.abs(reference).max()
    error = np.abs(actual - reference).max() / scale
    # The check means something only if the features tell the images apart by far more than the tolerance.
    assert np.abs(reference - reference.mean(0)).max() / scale > 100 * RELATIVE_TOLERANCE
    assert error <= RELATIVE_TOLERANCE, f"{what}: max |difference| / max |reference| = {error:.2e}"
    np.testing.assert_allclose(actual, reference, rtol=RELATIVE_TOLERANCE, atol=RELATIVE_TOLERANCE * scale)


def test_matches_pytorch_fid_through_the_pth_loader(tmp_path, inputs, expected, forward):
    path = inception_parity.rebuild_pth(str(tmp_path / "pt_inception_parity.pth"))
    variables = inception_weights.load_inception_variables(path)
    os.remove(path)  # 95 MB; pytest keeps recent tmp_path folders
    out = forward(variables, inputs[0])
    _assert_matches(out["pool"], expected["pytorch_fid_pool"], "pool3 vs pytorch-fid")
    _assert_matches(out["logits"], expected["pytorch_fid_logits"], "logits vs pytorch-fid")


def test_matches_the_tf_graph_through_the_graph_def_loader(tmp_path, inputs, expected, forward):
    path = inception_parity.rebuild_graph_def(str(tmp_path / inception_weights.TF_GRAPH_FILE))
    variables = inception_weights.load_inception_variables(path)
    os.remove(path)
    images, small = inputs
    out = forward(variables, images)
    _assert_matches(out["pool"], expected["tf_pool"], "pool3 vs the TF graph")
    _assert_matches(out["logits"], expected["tf_logits"], "logits vs the TF graph")
    # 32x32 images: the graph's own ResizeBilinear (legacy, no half-pixel centres) against the framework's.
    out = forward(variables, small)
    _assert_matches(out["pool"], expected["tf_small_pool"], "pool3 of resized images vs the TF graph")
    _assert_matches(out["logits"], expected["tf_small_logits"], "logits of resized images vs the TF graph")
