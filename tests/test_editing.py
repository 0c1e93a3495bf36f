"""Zero-shot editing (editing.py, evaluation/edit.py, --mode=edit) with a small consistency function."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from consistency_jax import checkpointing, editing, experiment, methods, parametrization
from consistency_jax.evaluation import edit as edit_files
from consistency_jax.models import create_model
from tests.helpers import jit_init, tiny_config

SIGMAS = editing.editing_sigmas(2, 80.0, 0.002, 7.0)


@pytest.fixture(scope="module")
def tiny_fn():
    """A consistency function on 8x8 RGB images with every weight random (nothing zero-initialised)."""
    fn = parametrization.ConsistencyFunction(create_model(tiny_config().model), 0.002, 0.5)
    params = jit_init(fn, 0, (8, 8, 3))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    return fn, params


Y = jax.random.uniform(jax.random.key(2), (2, 8, 8, 3), minval=-0.9, maxval=0.9)


def run(tiny_fn, task, y, mask=None, patch=1):
    fn, params = tiny_fn
    transform, unknown = editing.task_problem(task, y, mask, patch)
    return jax.jit(lambda p, y, u: editing.edit(fn, p, jax.random.key(3), y, u, SIGMAS, transform))(
        params, y, unknown)


def test_editing_sigmas_are_a_karras_grid_from_the_start():
    sigmas = editing.editing_sigmas(3, 80.0, 0.002, 7.0)
    grid = np.asarray([(0.002 ** (1 / 7) + i / 3 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7 for i in range(4)])
    np.testing.assert_allclose(sigmas, grid[::-1][:3], rtol=1e-5)
    assert sigmas[0] == pytest.approx(80.0)


def test_inpainting_keeps_known_pixels_exactly_and_fills_the_rest(tiny_fn):
    mask = jnp.zeros((2, 8, 8, 1), bool).at[:, 2:6, 3:7].set(True)
    out = run(tiny_fn, "inpaint", Y, mask)
    known = ~np.broadcast_to(np.asarray(mask), Y.shape)
    np.testing.assert_array_equal(np.asarray(out)[known], np.asarray(Y)[known])
    changed = np.abs(np.asarray(out - Y))[~known]
    assert changed.min() > 1e-4 and float(jnp.abs(out).max()) <= 1.0


def test_colourisation_keeps_the_gray_level_and_adds_colour(tiny_fn):
    gray = jnp.repeat(Y[..., :1], 3, axis=-1)
    out = run(tiny_fn, "colorize", gray)
    luma = np.asarray(editing.LUMA)
    np.testing.assert_allclose(np.asarray(out) @ luma, np.asarray(gray) @ luma, atol=1e-5)
    assert float(jnp.abs(out - out.mean(-1, keepdims=True)).max()) > 1e-3  # no longer gray


def test_super_resolution_keeps_the_patch_means(tiny_fn):
    low = Y[:, ::4, ::4]
    y = jnp.repeat(jnp.repeat(low, 4, axis=1), 4, axis=2)
    out = run(tiny_fn, "superres", y, patch=4)
    means = np.asarray(out).reshape(2, 2, 4, 2, 4, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(means, np.asarray(low), atol=1e-5)
    assert float(jnp.abs(out - y).max()) > 1e-3  # detail inside the patches


def test_stroke_guided_editing_starts_from_the_painting(tiny_fn):
    fn, params = tiny_fn
    sigmas = editing.editing_sigmas(2, 10.0, 0.002, 7.0)
    stroke = jax.jit(lambda p, y: editing.stroke_guided(fn, p, jax.random.key(4), y, sigmas))
    out, again = stroke(params, Y), stroke(params, Y)
    np.testing.assert_array_equal(out, again)
    assert out.shape == Y.shape and float(jnp.abs(out - Y).max()) > 1e-3


def test_only_consistency_samplers_can_edit():
    config = tiny_config()
    editing.check_editable(experiment.create_experiment(config, jax.devices()[:1]).method)  # iCT: fine
    config.method = methods.method_config("edm")
    with pytest.raises(ValueError, match="method 'edm' samples with its 'heun' sampler"):
        editing.check_editable(experiment.create_experiment(config, jax.devices()[:1]).method)


def test_edit_mode_reads_png_files_and_writes_results_beside_them(tmp_path):
    config = tiny_config()
    workdir = str(tmp_path / "run")
    exp = experiment.create_experiment(config, jax.devices()[:1])
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, async_save=False)
    checkpointer.save(1, exp.create_state(), {}, force=True)
    checkpointer.close()
    digit = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    hole = np.zeros((8, 8), np.uint8)
    hole[2:5, 1:6] = 255
    Image.fromarray(digit).save(tmp_path / "digit.png")
    Image.fromarray(hole).save(tmp_path / "hole.png")
    config.edit.images, config.edit.masks = str(tmp_path / "digit.png"), str(tmp_path / "hole.png")
    config.edit.steps = 2

    stem = edit_files.run_edit(config, workdir)
    assert stem == str(tmp_path / "digit_inpaint")
    result = np.asarray(Image.open(tmp_path / "digit_inpaint.png"))
    np.testing.assert_array_equal(result[hole == 0], digit[hole == 0])
    assert np.abs(result[hole > 0].astype(int) - digit[hole > 0]).max() > 0
    saved = np.load(tmp_path / "digit_inpaint.npz")
    assert saved["images"].shape == (1, 8, 8, 1) and saved["masks"].sum() == 15


def test_edit_inputs_of_the_wrong_size_are_refused(tmp_path):
    config = tiny_config()
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(tmp_path / "small.png")
    config.edit.images = str(tmp_path / "small.png")
    with pytest.raises(ValueError, match="holds 6x6 images; the model makes 8x8"):
        edit_files.prepare(config, (8, 8, 1))
    config.edit.task = "superres"
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(tmp_path / "tiny.png")
    config.edit.images = str(tmp_path / "tiny.png")
    with pytest.raises(ValueError, match="integer factor; got 3x3"):
        edit_files.prepare(config, (8, 8, 1))
    config.edit.task = "paint"
    with pytest.raises(edit_files.ConfigError, match="valid: inpaint, colorize, superres, stroke"):
        edit_files.check_edit_config(config)
