"""EDM's released networks convert into this framework and compute what EDM's own PyTorch code computes.

The fixture (tests/fixtures/edm_parity_files/) was made once by
tests/fixtures/make_edm_parity.py with NVlabs/edm's training/networks.py and
PyTorch, outside this repository: tiny EDMPrecond networks (DDPM++, NCSN++,
ADM) with every parameter random, exported as the README's recipe exports a
released pickle, and EDM's outputs for a few noisy images at sigma 0.002 ... 80
(with class labels, the null class included, for the conditional ones). The
converted JAX network must reproduce them to 1e-5. The manifest also holds the
state-dict shapes of the released networks themselves (no weights), which must
map onto this framework's full-size networks tensor for tensor.
"""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from consistency_jax import convert, parallel, teachers
from consistency_jax.evaluation import generate
from consistency_jax.methods import base as methods_base
from consistency_jax.models import create_model
from consistency_jax.parametrization import ConsistencyFunction
from tests.helpers import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "edm_parity_files")
NETWORKS = ("ddpmpp", "ncsnpp", "adm")
TOLERANCE = 1e-5  # absolute; EDM's outputs here are O(1) (see the manifest)


@pytest.fixture(scope="module")
def manifest():
    with open(os.path.join(FIXTURES, "manifest.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def expected():
    with np.load(os.path.join(FIXTURES, "expected.npz")) as data:
        return dict(data)


@pytest.fixture(scope="module")
def conversions(manifest):
    """name -> the converted fixture network (converted once, on first use)."""
    cache = {}

    def get(name):
        if name not in cache:
            # The ADM fixture has narrower attention heads than EDM's 64 channels (see make_edm_parity.py).
            heads = {"head_channels": manifest["fixture_head_channels"]} if name == "adm" else {}
            cache[name] = convert.convert_network(convert.load_export(os.path.join(FIXTURES, f"{name}.npz")), **heads)
        return cache[name]

    return get


def _inputs(expected, name):
    return {k: expected.get(f"{name}/{k}") for k in ("x", "sigma", "labels", "net_input", "noise_labels")}


@pytest.mark.parametrize("name", NETWORKS)
def test_converted_network_reproduces_edm(conversions, expected, name):
    conversion = conversions(name)
    model = create_model(conversion.model)
    io = _inputs(expected, name)
    # Through the EDM denoiser D(x, sigma) of the framework (the edm method's parametrization).
    fn = ConsistencyFunction(model, sigma_min=0.002, sigma_data=conversion.sigma_data, boundary=False)

    @jax.jit
    def outputs(params):
        # The U-Net alone, on EDMPrecond's c_in x and c_noise: its output at full sensitivity.
        raw = model.apply({"params": params}, io["net_input"], io["noise_labels"], io["labels"], train=False)
        return raw, fn(params, io["x"], io["sigma"], io["labels"])

    raw, denoised = outputs(conversion.params)
    np.testing.assert_allclose(np.asarray(raw), expected[f"{name}/raw"], rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(np.asarray(denoised), expected[f"{name}/denoised"], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("name,fields", [
    ("ddpmpp", dict(name="ncsnpp", embedding_type="positional", progressive_input="none", resample_filter=(1, 1),
                    model_channels=4, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,),
                    dropout=0.13, num_classes=0)),
    ("ncsnpp", dict(name="ncsnpp", embedding_type="fourier", progressive_input="residual",
                    resample_filter=(1, 3, 3, 1), num_res_blocks=2, num_classes=10)),
    ("adm", dict(name="adm", model_channels=4, channel_mult=(1, 2, 2), num_head_channels=4, num_classes=10,
                 dropout=0.1)),
])
def test_converted_config_describes_the_fixture_network(conversions, name, fields):
    conversion = conversions(name)
    assert {k: conversion.model[k] for k in fields} == fields
    assert conversion.image_shape == ((8, 8, 1) if name == "ddpmpp" else (8, 8, 3))
    assert conversion.sigma_data == 0.5
    # The DDPM++ fixture has CIFAR-10's augmentation labels (augment_dim=9): left out, and said so.
    assert any("map_augment" in note for note in conversion.notes) == (name == "ddpmpp")


@pytest.mark.parametrize("name,model_fields", [
    ("edm-cifar10-32x32-uncond-vp", dict(name="ncsnpp", embedding_type="positional", progressive_input="none",
                                         resample_filter=(1, 1), model_channels=128, channel_mult=(2, 2, 2),
                                         num_res_blocks=4, attn_resolutions=(16,), dropout=0.13)),
    ("edm-cifar10-32x32-uncond-ve", dict(name="ncsnpp", embedding_type="fourier", progressive_input="residual",
                                         resample_filter=(1, 3, 3, 1), model_channels=128, channel_mult=(2, 2, 2),
                                         num_res_blocks=4, attn_resolutions=(16,), dropout=0.13)),
    ("edm-imagenet-64x64-cond-adm", dict(name="adm", model_channels=192, channel_mult=(1, 2, 3, 4),
                                         num_res_blocks=3, attn_resolutions=(32, 16, 8), num_head_channels=64,
                                         num_classes=1000, dropout=0.1)),
])
def test_released_networks_map_tensor_for_tensor(manifest, name, model_fields):
    """Every tensor of the real state dict lands on the full-size network here, shapes checked (no weights)."""
    released = manifest["released"][name]
    # Zero-stride arrays: the shapes without the memory.
    state = {k: np.broadcast_to(np.float32(1), s) for k, s in released["state_dict_shapes"].items()}
    for key, shape in released["state_dict_shapes"].items():
        if key.endswith("resample_filter"):
            taps = np.asarray(released["init_kwargs"].get("resample_filter", [1, 1]), np.float32)
            state[key] = (np.outer(taps, taps) / taps.sum() ** 2).reshape(shape)
    network = convert.EDMNetwork("EDMPrecond", released["init_kwargs"], state)
    conversion = convert.convert_network(network)
    assert {k: conversion.model[k] for k in model_fields} == model_fields
    num_converted = sum(np.size(x) for x in jax.tree.leaves(conversion.params))
    augment = [s for k, s in released["state_dict_shapes"].items() if "map_augment" in k]
    null_row = 4 * model_fields["model_channels"] if model_fields.get("num_classes") else 0
    assert num_converted == released["num_params"] - sum(np.prod(s) for s in augment) + null_row


# ----------------------------------------------------------------------------
# The converted workdir: a teacher, and a run that --mode=sample reads.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The command line converts the DDPM++ fixture (8x8x1, like the digits) with configs/default.py's other fields."""
    path = str(tmp_path_factory.mktemp("converted") / "edm_ddpmpp")
    result = subprocess.run(
        [sys.executable, "-m", "consistency_jax.convert", f"--edm={os.path.join(FIXTURES, 'ddpmpp.npz')}",
         f"--workdir={path}", "--config=configs/default.py", "--config.training.ema_rates=(0.99,0.999)"],
        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"--config.method.teacher_workdir={path}" in result.stdout
    assert "--config.model.embedding_type=positional" in result.stdout  # configs/default.py has NCSN++
    return path


def test_converted_workdir_is_a_teacher(workdir, expected):
    """Loaded the way a distilling method loads its teacher, it computes EDM's denoiser."""
    config = default.get_config()
    config.method = methods_base.teacher_config_fields(ml_collections.ConfigDict({"name": "edm"}))
    config.method.teacher_workdir = workdir
    teacher = teachers.teacher_config(config)
    assert teacher.method.name == "edm" and teacher.model.embedding_type == "positional"
    teachers.check_compatible(teacher, (8, 8, 1), 0)
    fn = teachers.teacher_function(teacher)
    mesh = parallel.create_mesh(config.mesh, jax.devices()[:1])
    shapes = teachers.param_shapes(fn, (8, 8, 1), 0)
    io = _inputs(expected, "ddpmpp")
    denoise = jax.jit(fn)
    for ema_rate in (0.999, 0.0):  # an EMA and the raw params: both are EDM's weights
        config.method.teacher_ema_rate = ema_rate
        params = teachers.load_params(config, teacher, shapes, mesh)
        np.testing.assert_allclose(np.asarray(denoise(params, io["x"], io["sigma"])), expected["ddpmpp/denoised"],
                                   rtol=0, atol=TOLERANCE)
    with open(os.path.join(workdir, "converted_from.json")) as f:
        provenance = json.load(f)
    assert provenance["class"] == "EDMPrecond" and provenance["init_kwargs"]["augment_dim"] == 9


def test_sample_mode_reads_the_converted_workdir(workdir):
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))  # the converted config: a matching config
    config.sampling.num_samples = config.sampling.batch_size = 8
    config.sampling.num_steps = 1  # one Heun level: D(sigma_max z, sigma_max)
    images = np.load(generate.run_sample(config, workdir))["images"]
    assert images.shape == (8, 8, 8, 1) and images.std() > 0


# ----------------------------------------------------------------------------
# What does not convert stops with a message that says why.
# ----------------------------------------------------------------------------


def _fixture_network(name="ddpmpp"):
    return convert.load_export(os.path.join(FIXTURES, f"{name}.npz"))


def _with(network, class_name=None, state=None, **kwargs):
    return convert.EDMNetwork(class_name or network.class_name, {**network.init_kwargs, **kwargs},
                              state if state is not None else network.state_dict)


@pytest.mark.parametrize("change,message", [
    (dict(class_name="VPPrecond"), "Only EDM-preconditioned networks convert"),
    (dict(encoder_type="skip"), "encoder_type='skip'"),
    (dict(decoder_type="skip"), "decoder_type='skip'"),
    (dict(channel_mult_noise=2), "channel_mult_noise=2 with the positional embedding"),
    (dict(label_dropout=0.1), "label_dropout=0.1"),
    (dict(channel_mult_emb=2), "channel_mult_emb=2"),
    (dict(num_heads=2), "init_kwargs ['num_heads'] are not arguments of EDM's"),
    (dict(model_type="UNet2DModel"), "only SongUNet (DDPM++/NCSN++) and DhariwalUNet (ADM) convert"),
    (dict(num_blocks=2), "has no 'model.enc.8x8_block1.norm0.weight'"),
    (dict(attn_resolutions=[]), "have no place in the network"),
    (dict(resample_filter=[1, 3, 3, 1]), "is not the filter [1, 3, 3, 1] of the init_kwargs"),
])
def test_unconvertible_networks_are_refused(change, message):
    network = _with(_fixture_network(), **change)
    with pytest.raises(convert.ConversionError) as info:
        convert.convert_network(network)
    assert message in str(info.value)


def test_adm_heads_must_be_whole():
    with pytest.raises(convert.ConversionError, match="not a multiple of its 64-channel heads"):
        convert.convert_network(_fixture_network("adm"))  # 4- and 8-channel attention with EDM's 64-wide heads


def test_export_without_metadata_is_refused(tmp_path):
    np.savez(tmp_path / "bare.npz", **{"model.map_layer0.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(convert.ConversionError, match="has no 'edm_network' entry"):
        convert.load_export(str(tmp_path / "bare.npz"))
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(convert.ConversionError, match="cannot be read as an .npz file"):
        convert.load_export(str(tmp_path / "text.npz"))


def test_existing_checkpoints_are_not_overwritten(workdir, conversions):
    base = default.get_config()
    config, _ = convert.converted_config(base, conversions("ddpmpp"))
    with pytest.raises(convert.ConversionError, match="already has checkpoints"):
        convert.write_workdir(workdir, config, conversions("ddpmpp"), {})


def test_positional_embedding_endpoint_is_ddpmpp_and_default_is_adm():
    """DDPM++ (score_sde, EDM's SongUNet) spaces the frequencies to end at 1/10000; ADM stops one short."""
    from consistency_jax.models.layers import PositionalEmbedding

    c = np.array([0.7, -1.3], np.float32)
    for endpoint, denominator in ((True, 3), (False, 4)):
        freqs = 10000.0 ** (-np.arange(4) / denominator)
        want = np.concatenate([np.cos(np.outer(c, freqs)), np.sin(np.outer(c, freqs))], axis=1)
        got = PositionalEmbedding(8, endpoint=endpoint).apply({}, c)
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)
