"""Converts NVIDIA EDM's released networks into a workdir of this framework.

    python -m consistency_jax.convert --edm=edm-cifar10-32x32-uncond-vp.npz --workdir=runs/edm_cifar10_uncond_vp

EDM (Karras et al. 2022, github.com/NVlabs/edm) publishes its networks as
Python pickles that need EDM's own code and PyTorch to open. Export one first,
in EDM's environment (the README's "EDM checkpoints" section has the recipe):
the .npz then holds every tensor of the network's state dict under its PyTorch
name and, under `edm_network`, the network's class and init_kwargs. Reading it
needs numpy only.

What converts: EDMPrecond (the edm-*.pkl releases) around
- SongUNet, DDPM++ (edm-*-vp) or NCSN++ (edm-*-ve): onto models/ncsnpp.py;
- DhariwalUNet, ADM (edm-imagenet-64x64-cond-adm): onto models/adm.py.
Not VPPrecond, VEPrecond or iDDPMPrecond (the baseline-*.pkl files): their
preconditioning is not one of this framework's parametrizations.

The workdir it writes is what a trained EDM run of this framework leaves:
`config.json` (method 'edm', the network as config.model, the image shape and
classes as config.data, EDM's sigma_data), a checkpoint at step 0 whose params
and every EMA are the EDM network's weights, and `converted_from.json` (the
source file's hash, EDM's init_kwargs, what was left out). Use it as
`--config.method.teacher_workdir=<workdir>` (CD distils it, ECT/SCT start from
it), or sample and evaluate it with `--mode=sample/eval` and a config whose
config.model equals the converted one (the converter prints the overrides a
config needs).

The rest of config.json comes from `--config` (default: configs/default.py),
so pass the experiment config you will sample with, e.g. a CIFAR-10 EDM
config; `--config.a.b=value` overrides work as in main.

Tensor mapping, and why it is exact (EDM: training/networks.py):
- Conv2d [out, in, kh, kw] -> kernel [kh, kw, in, out]; Linear and 1x1 convs
  -> Dense kernels [in, out]; GroupNorm weight -> scale.
- Attention: EDM's qkv conv interleaves the channels as (head, channel, q/k/v)
  (UNetBlock.forward reshapes to [N*heads, C/heads, 3, HW]); the Dense here
  orders them (q/k/v, head, channel). Rows are permuted accordingly.
- Class labels: EDM feeds one-hot vectors (all zeros when dropped) to a Linear;
  here an embedding of num_classes + 1 rows, the last the null class. SongUNet
  scales the one-hot by sqrt(label_dim) and has a bias: row c =
  sqrt(L) W[:, c] + b, null row = b. DhariwalUNet has no bias: row c =
  W[:, c], null row = 0.
- `map_augment` (augmentation labels, CIFAR-10's augment_dim=9) is left out:
  EDM skips it when sampling (augment_labels=None), which is what every use
  here amounts to. `use_fp16` is left out: it is EDM's compute precision, not
  part of the weights (config.model.dtype keeps float32).
"""

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

EXPORT_KEY = "edm_network"  # the JSON entry of the exported .npz: {"class": ..., "init_kwargs": ...}

# EDM's constructor defaults (training/networks.py), for arguments that init_kwargs do not record.
PRECOND_DEFAULTS = dict(label_dim=0, use_fp16=False, sigma_min=0.0, sigma_max=math.inf, sigma_data=0.5,
                        model_type="DhariwalUNet")
SONG_UNET_DEFAULTS = dict(augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4,
                          num_blocks=4, attn_resolutions=[16], dropout=0.10, label_dropout=0,
                          embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                          decoder_type="standard", resample_filter=[1, 1])
DHARIWAL_UNET_DEFAULTS = dict(augment_dim=0, model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4,
                              num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0)
# DhariwalUNet's attention heads are 64 channels wide (block_kwargs channels_per_head=64).
DHARIWAL_HEAD_CHANNELS = 64
# SongUNet's FourierEmbedding scale (its frequencies come from the checkpoint; the field is informational).
SONG_UNET_FOURIER_SCALE = 16.0


class ConversionError(ValueError):
    """The exported network cannot be converted; the message says why and what is supported."""


@dataclasses.dataclass(frozen=True)
class EDMNetwork:
    """An exported EDM network: class name, constructor arguments, state dict (numpy, PyTorch names)."""

    class_name: str
    init_kwargs: dict[str, Any]
    state_dict: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Conversion:
    """What the converter makes of an EDMNetwork."""

    model: ml_collections.ConfigDict  # config.model: the network's fields in this framework
    image_shape: tuple[int, int, int]  # (H, W, C)
    num_classes: int
    sigma_data: float
    sigma_range: tuple[float, float]  # EDMPrecond's (sigma_min, sigma_max): the noise levels it supports
    params: Any  # the network's params (nested dicts of numpy arrays)
    notes: tuple[str, ...]  # what was left out, and why


# ----------------------------------------------------------------------------
# Reading the export.
# ----------------------------------------------------------------------------


def load_export(path: str) -> EDMNetwork:
    """Reads an .npz written by the README's export recipe (numpy only; no pickle, no torch)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path} cannot be read as an .npz file: {type(e).__name__}: {e}") from e
    if EXPORT_KEY not in arrays:
        raise ConversionError(
            f"{path} has no '{EXPORT_KEY}' entry: export the network with the README's recipe (section \"EDM "
            f"checkpoints\"), which stores EDM's class name and init_kwargs beside the state dict.")
    try:
        meta = json.loads(str(arrays.pop(EXPORT_KEY)))
        class_name, init_kwargs = meta["class"], dict(meta["init_kwargs"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"The '{EXPORT_KEY}' entry of {path} is not the JSON "
                              f'{{"class": ..., "init_kwargs": {{...}}}} the export recipe writes: {e}') from e
    return EDMNetwork(class_name, init_kwargs, arrays)


# ----------------------------------------------------------------------------
# init_kwargs -> config.model.
# ----------------------------------------------------------------------------


def _with_defaults(kwargs: dict[str, Any], defaults: dict[str, Any], what: str) -> dict:
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ConversionError(f"init_kwargs {unknown} are not arguments of EDM's EDMPrecond or {what} (known: "
                              f"{sorted({*PRECOND_DEFAULTS, 'img_resolution', 'img_channels', *defaults})}); "
                              f"this converter follows NVlabs/edm training/networks.py.")
    return {**defaults, **kwargs}


def _refuse(condition: bool, message: str) -> None:
    if condition:
        raise ConversionError(message)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What the init_kwargs say: the network here, and what the state dict must hold."""

    model: ml_collections.ConfigDict
    model_type: str  # 'SongUNet' or 'DhariwalUNet'
    label_dim: int
    image_shape: tuple[int, int, int]
    sigma_data: float
    sigma_range: tuple[float, float]
    head_channels: int
    notes: tuple[str, ...]


def plan_model(network: EDMNetwork, head_channels: int = DHARIWAL_HEAD_CHANNELS) -> _Plan:
    """The network's description here: model fields, image shape, classes, sigma_data; refuses what has no match.

    `head_channels` is DhariwalUNet's attention head width; EDM fixes it at 64
    (only the parity fixture, tests/fixtures/make_edm_parity.py, uses another).
    """
    _refuse(network.class_name != "EDMPrecond",
            f"Only EDM-preconditioned networks convert (class EDMPrecond: the edm-*.pkl releases); this one is "
            f"{network.class_name}. VPPrecond, VEPrecond and iDDPMPrecond (the baseline-*.pkl files) use "
            f"preconditionings this framework does not implement; if this is a bare SongUNet or DhariwalUNet "
            f"(net.model), export the EDMPrecond network around it (pickle['ema']) instead.")
    unet_args = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max",
                 "sigma_data", "model_type")
    kwargs = dict(network.init_kwargs)
    precond = {**PRECOND_DEFAULTS, **{k: kwargs.pop(k) for k in unet_args if k in kwargs}}
    for required in ("img_resolution", "img_channels"):
        _refuse(required not in precond, f"init_kwargs lack {required!r}; export the EDMPrecond network's "
                                         f"init_kwargs as the README's recipe does.")
    model_type = precond["model_type"]
    _refuse(model_type not in ("SongUNet", "DhariwalUNet"),
            f"model_type={model_type!r}: only SongUNet (DDPM++/NCSN++) and DhariwalUNet (ADM) convert.")
    label_dim = int(precond["label_dim"])
    if model_type == "SongUNet":
        unet = _with_defaults(kwargs, SONG_UNET_DEFAULTS, "SongUNet")
        model = _song_unet_model(unet, label_dim)
    else:
        unet = _with_defaults(kwargs, DHARIWAL_UNET_DEFAULTS, "DhariwalUNet")
        model = _dhariwal_unet_model(unet, label_dim, head_channels)
    _refuse(unet["channel_mult_emb"] != 4,
            f"channel_mult_emb={unet['channel_mult_emb']}: the networks here have a 4 x model_channels embedding.")
    _refuse(unet["label_dropout"] != 0,
            f"label_dropout={unet['label_dropout']} (classifier-free guidance training) has no counterpart here. "
            f"It does not change what the trained network computes: to sample or distil it, export again with "
            f"the key removed from init_kwargs.")
    notes = []
    if unet["augment_dim"]:
        notes.append(f"map_augment (augment_dim={unet['augment_dim']}) left out: EDM samples with "
                     f"augment_labels=None, which skips it.")
    if precond["use_fp16"]:
        notes.append("use_fp16=True left out: EDM's compute precision; config.model.dtype stays float32.")
    return _Plan(model=model, model_type=model_type, label_dim=label_dim,
                 image_shape=(int(precond["img_resolution"]),) * 2 + (int(precond["img_channels"]),),
                 sigma_data=float(precond["sigma_data"]),
                 sigma_range=(float(precond["sigma_min"]), float(precond["sigma_max"])),
                 head_channels=head_channels, notes=tuple(notes))


def _song_unet_model(unet: dict[str, Any], label_dim: int) -> ml_collections.ConfigDict:
    encoders = {"standard": "none", "residual": "residual"}
    _refuse(unet["encoder_type"] not in encoders,
            f"encoder_type={unet['encoder_type']!r}: models/ncsnpp.py has the 'standard' (DDPM++) and 'residual' "
            f"(NCSN++) encoders of EDM's released networks, not 'skip'.")
    _refuse(unet["decoder_type"] != "standard",
            f"decoder_type={unet['decoder_type']!r}: models/ncsnpp.py has EDM's 'standard' decoder only.")
    embedding = unet["embedding_type"]
    _refuse(embedding not in ("positional", "fourier"), f"embedding_type={embedding!r} is not EDM's.")
    noise_mult = 2 if embedding == "fourier" else 1
    _refuse(unet["channel_mult_noise"] != noise_mult,
            f"channel_mult_noise={unet['channel_mult_noise']} with the {embedding} embedding: models/ncsnpp.py "
            f"embeds the noise in {noise_mult} x model_channels features (EDM's DDPM++ 1, NCSN++ 2).")
    model = ml_collections.ConfigDict()
    model.name = "ncsnpp"
    model.model_channels = int(unet["model_channels"])
    model.channel_mult = tuple(int(m) for m in unet["channel_mult"])
    model.num_res_blocks = int(unet["num_blocks"])
    model.attn_resolutions = tuple(int(r) for r in unet["attn_resolutions"])
    model.dropout = float(unet["dropout"])
    model.embedding_type = embedding
    if embedding == "fourier":
        model.fourier_scale = SONG_UNET_FOURIER_SCALE
    model.resample_filter = tuple(int(t) for t in unet["resample_filter"])
    model.progressive_input = encoders[unet["encoder_type"]]
    model.skip_rescale = True  # SongUNet: skip_scale sqrt(0.5) everywhere
    model.num_classes = label_dim
    return model


def _dhariwal_unet_model(unet: dict[str, Any], label_dim: int, head_channels: int) -> ml_collections.ConfigDict:
    model = ml_collections.ConfigDict()
    model.name = "adm"
    model.model_channels = int(unet["model_channels"])
    model.channel_mult = tuple(int(m) for m in unet["channel_mult"])
    model.num_res_blocks = int(unet["num_blocks"])
    model.attn_resolutions = tuple(int(r) for r in unet["attn_resolutions"])
    model.num_head_channels = head_channels
    model.dropout = float(unet["dropout"])
    model.embedding_type = "positional"
    model.scale_shift_norm = True
    model.num_classes = label_dim
    return model


# ----------------------------------------------------------------------------
# State dict -> params.
# ----------------------------------------------------------------------------


class _StateDict:
    """The exported tensors, handed out by PyTorch name; remembers which ones were used."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self._arrays = {k: v for k, v in arrays.items() if k.startswith("model.")}
        self._other = sorted(set(arrays) - set(self._arrays))
        self._used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return f"model.{name}" in self._arrays

    def take(self, name: str) -> np.ndarray:
        key = f"model.{name}"
        if key not in self._arrays:
            raise ConversionError(f"The state dict has no {key!r}, which the network its init_kwargs describe "
                                  f"has: the tensors and the init_kwargs do not belong together.")
        self._used.add(key)
        return np.asarray(self._arrays[key], np.float32)

    def skip(self, prefix: str) -> None:
        self._used.update(k for k in self._arrays if k.startswith(f"model.{prefix}"))

    def unused(self) -> list[str]:
        return self._other + sorted(set(self._arrays) - self._used)


def _conv(sd: _StateDict, name: str) -> dict[str, np.ndarray]:
    return {"kernel": sd.take(f"{name}.weight").transpose(2, 3, 1, 0), "bias": sd.take(f"{name}.bias")}


def _dense(sd: _StateDict, name: str) -> dict[str, np.ndarray]:
    weight = sd.take(f"{name}.weight")
    return {"kernel": weight.reshape(weight.shape[:2]).T, "bias": sd.take(f"{name}.bias")}


def _norm(sd: _StateDict, name: str) -> dict[str, np.ndarray]:
    return {"scale": sd.take(f"{name}.weight"), "bias": sd.take(f"{name}.bias")}


def _check_filter(sd: _StateDict, name: str, taps: tuple[int, ...]) -> None:
    """EDM stores each resampling filter as a buffer: it must be the one init_kwargs name."""
    f = np.asarray(taps, np.float32)
    expected = np.outer(f, f) / f.sum() ** 2
    found = sd.take(f"{name}.resample_filter")
    if found.shape[-2:] != expected.shape or not np.allclose(found.reshape(expected.shape), expected):
        raise ConversionError(f"model.{name}.resample_filter is not the filter {list(taps)} of the init_kwargs.")


def _res_block(sd: _StateDict, name: str, taps: tuple[int, ...]) -> dict[str, Any]:
    """EDM's UNetBlock without its attention -> layers.ResBlock."""
    block = {"norm0": _norm(sd, f"{name}.norm0"), "conv0": _conv(sd, f"{name}.conv0"),
             "emb_proj": _dense(sd, f"{name}.affine"), "norm1": _norm(sd, f"{name}.norm1"),
             "conv1": _conv(sd, f"{name}.conv1")}
    if f"{name}.conv0.resample_filter" in sd:
        _check_filter(sd, f"{name}.conv0", taps)
    if f"{name}.skip.resample_filter" in sd:
        _check_filter(sd, f"{name}.skip", taps)
    if f"{name}.skip.weight" in sd:  # DhariwalUNet's up/down blocks resample the skip without a conv
        block["skip"] = _conv(sd, f"{name}.skip")
    return block


def _attention(sd: _StateDict, name: str, num_heads: int) -> dict[str, Any]:
    """The attention half of EDM's UNetBlock -> layers.AttentionBlock (qkv rows reordered, see the docstring)."""
    qkv = _dense(sd, f"{name}.qkv")
    channels = qkv["kernel"].shape[0]
    if channels % num_heads:
        raise ConversionError(f"model.{name}: {channels} channels do not split into {num_heads} heads.")
    head = channels // num_heads
    # EDM output channel (h, c, j) -> here (j, h, c).
    kernel = qkv["kernel"].reshape(channels, num_heads, head, 3).transpose(0, 3, 1, 2).reshape(channels, -1)
    bias = qkv["bias"].reshape(num_heads, head, 3).transpose(2, 0, 1).reshape(-1)
    return {"norm": _norm(sd, f"{name}.norm2"), "qkv": {"kernel": kernel, "bias": bias},
            "proj": _dense(sd, f"{name}.proj")}


def _song_unet_params(sd: _StateDict, plan: _Plan) -> dict[str, Any]:
    model = plan.model
    taps = model.resample_filter
    params: dict[str, Any] = {"emb_dense0": _dense(sd, "map_layer0"), "emb_dense1": _dense(sd, "map_layer1")}
    if plan.label_dim:
        weight, bias = sd.take("map_label.weight"), sd.take("map_label.bias")
        rows = math.sqrt(plan.label_dim) * weight.T + bias  # the one-hot input is scaled by sqrt(label_dim)
        params["label_embed"] = {"embedding": np.concatenate([rows, bias[None]], axis=0)}
    sd.skip("map_augment.")
    if model.embedding_type == "fourier":  # EDM's random frequencies, a buffer there, a frozen param here
        params["noise_embed"] = {"freqs": sd.take("map_noise.freqs")}
    levels = len(model.channel_mult)
    for level in range(levels):
        res = plan.image_shape[0] >> level
        if level == 0:
            params["enc_conv_in"] = _conv(sd, f"enc.{res}x{res}_conv")
        else:
            # Here a down block is named after the resolution it starts from, as an up block is.
            params[f"enc{res * 2}_down"] = _res_block(sd, f"enc.{res}x{res}_down", taps)
            if model.progressive_input == "residual":
                _check_filter(sd, f"enc.{res}x{res}_aux_residual", taps)
                params[f"enc{res}_aux_residual"] = _conv(sd, f"enc.{res}x{res}_aux_residual")
        for idx in range(model.num_res_blocks):
            name = f"enc.{res}x{res}_block{idx}"
            params[f"enc{res}_block{idx}"] = _res_block(sd, name, taps)
            if res in model.attn_resolutions:
                params[f"enc{res}_attn{idx}"] = _attention(sd, name, num_heads=1)
    for level in reversed(range(levels)):
        res = plan.image_shape[0] >> level
        if level == levels - 1:
            params[f"mid{res}_block0"] = _res_block(sd, f"dec.{res}x{res}_in0", taps)
            params[f"mid{res}_attn"] = _attention(sd, f"dec.{res}x{res}_in0", num_heads=1)
            params[f"mid{res}_block1"] = _res_block(sd, f"dec.{res}x{res}_in1", taps)
        else:
            params[f"dec{res // 2}_up"] = _res_block(sd, f"dec.{res}x{res}_up", taps)
        for idx in range(model.num_res_blocks + 1):
            name = f"dec.{res}x{res}_block{idx}"
            params[f"dec{res}_block{idx}"] = _res_block(sd, name, taps)
            if idx == model.num_res_blocks and res in model.attn_resolutions:
                params[f"dec{res}_attn"] = _attention(sd, name, num_heads=1)
    res = plan.image_shape[0]
    params["out_norm"] = _norm(sd, f"dec.{res}x{res}_aux_norm")
    params["out_conv"] = _conv(sd, f"dec.{res}x{res}_aux_conv")
    return params


def _dhariwal_unet_params(sd: _StateDict, plan: _Plan) -> dict[str, Any]:
    model = plan.model
    taps = (1, 1)  # DhariwalUNet's UNetBlock default
    heads = lambda channels: channels // plan.head_channels  # noqa: E731
    params: dict[str, Any] = {"emb_dense0": _dense(sd, "map_layer0"), "emb_dense1": _dense(sd, "map_layer1")}
    if plan.label_dim:
        weight = sd.take("map_label.weight")  # no bias, no input scaling
        params["label_embed"] = {"embedding": np.concatenate([weight.T, np.zeros_like(weight.T[:1])], axis=0)}
    sd.skip("map_augment.")
    levels = len(model.channel_mult)
    for level, mult in enumerate(model.channel_mult):
        res = plan.image_shape[0] >> level
        channels = model.model_channels * mult
        if level == 0:
            params["enc_conv_in"] = _conv(sd, f"enc.{res}x{res}_conv")
        else:
            params[f"enc{res * 2}_down"] = _res_block(sd, f"enc.{res}x{res}_down", taps)
        for idx in range(model.num_res_blocks):
            name = f"enc.{res}x{res}_block{idx}"
            params[f"enc{res}_block{idx}"] = _res_block(sd, name, taps)
            if res in model.attn_resolutions:
                params[f"enc{res}_attn{idx}"] = _attention(sd, name, heads(channels))
    for level in reversed(range(levels)):
        res = plan.image_shape[0] >> level
        channels = model.model_channels * model.channel_mult[level]
        if level == levels - 1:
            params[f"mid{res}_block0"] = _res_block(sd, f"dec.{res}x{res}_in0", taps)
            params[f"mid{res}_attn"] = _attention(sd, f"dec.{res}x{res}_in0", heads(channels))
            params[f"mid{res}_block1"] = _res_block(sd, f"dec.{res}x{res}_in1", taps)
        else:
            params[f"dec{res // 2}_up"] = _res_block(sd, f"dec.{res}x{res}_up", taps)
        for idx in range(model.num_res_blocks + 1):
            name = f"dec.{res}x{res}_block{idx}"
            params[f"dec{res}_block{idx}"] = _res_block(sd, name, taps)
            if res in model.attn_resolutions:
                params[f"dec{res}_attn{idx}"] = _attention(sd, name, heads(channels))
    params["out_norm"] = _norm(sd, "out_norm")
    params["out_conv"] = _conv(sd, "out_conv")
    return params


def _check_attention_heads(plan: _Plan) -> None:
    """EDM floors channels / 64 (and has no attention below 64 channels); the ADM here needs whole heads."""
    model = plan.model
    levels = len(model.channel_mult)
    for level, mult in enumerate(model.channel_mult):
        res = plan.image_shape[0] >> level
        channels = model.model_channels * mult
        if (res in model.attn_resolutions or level == levels - 1) and channels % plan.head_channels:
            raise ConversionError(
                f"DhariwalUNet has {channels} channels with attention at {res}x{res}, not a multiple of its "
                f"{plan.head_channels}-channel heads; models/adm.py needs whole heads.")


def convert_network(network: EDMNetwork, head_channels: int = DHARIWAL_HEAD_CHANNELS) -> Conversion:
    """The network's config.model and params; every tensor of the state dict is used or named in the notes."""
    plan = plan_model(network, head_channels)
    sd = _StateDict(network.state_dict)
    if plan.model_type == "SongUNet":
        params = _song_unet_params(sd, plan)
    else:
        _check_attention_heads(plan)
        params = _dhariwal_unet_params(sd, plan)
    unused = sd.unused()
    if unused:
        raise ConversionError(f"{len(unused)} tensors of the state dict have no place in the network that the "
                              f"init_kwargs describe, e.g. {unused[:5]}: the tensors and init_kwargs do not "
                              f"belong together, or the network is a variant this converter does not know.")
    _check_shapes(params, plan)
    return Conversion(model=plan.model, image_shape=plan.image_shape, num_classes=plan.label_dim,
                      sigma_data=plan.sigma_data, sigma_range=plan.sigma_range, params=params, notes=plan.notes)


def param_shapes(model_config: ml_collections.ConfigDict, image_shape: tuple[int, int, int],
                 num_classes: int) -> Any:
    """Shapes of the params of config.model's network (traced, nothing computed)."""
    from consistency_jax.models import create_model

    model = create_model(model_config)
    x = jnp.zeros((1, *image_shape), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if num_classes else None
    init = lambda rng: model.init(rng, x, jnp.zeros((1,)), labels, train=False)["params"]  # noqa: E731
    return jax.eval_shape(init, jax.random.PRNGKey(0))


def _check_shapes(params: Any, plan: _Plan) -> None:
    """The converted tree must be exactly the network's: same arrays, same shapes."""
    expected = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(
        param_shapes(plan.model, plan.image_shape, plan.label_dim))}
    got = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    if expected != got:
        differences = [f"{name}: converted {got.get(name, 'absent')} vs network {expected.get(name, 'absent')}"
                       for name in sorted({*expected, *got}) if expected.get(name) != got.get(name)]
        raise ConversionError(f"The converted params do not fit {plan.model.name} ({len(differences)} "
                              f"arrays differ), e.g. " + "; ".join(differences[:5]))


# ----------------------------------------------------------------------------
# The workdir.
# ----------------------------------------------------------------------------

# Datasets of this framework that EDM's released networks were trained on, by (H, W, C) and classes.
_DATASETS = {((32, 32, 3), 0): "cifar10", ((32, 32, 3), 10): "cifar10",
             ((64, 64, 3), 1000): "imagenet_resized/64x64"}


def converted_config(base: ml_collections.ConfigDict, conversion: Conversion) -> tuple[ml_collections.ConfigDict,
                                                                                       list[str]]:
    """`base` with method 'edm', the converted network, its data shape and preconditioning.

    Returns the config and the `--config.model.*` overrides that `base` needs
    to describe the converted network (empty when it already does).
    """
    from consistency_jax import methods
    from consistency_jax.models import create_model

    config = ml_collections.ConfigDict(base.to_dict())
    if config.method.name != "edm":
        config.method = methods.method_config("edm")
    model = ml_collections.ConfigDict(conversion.model.to_dict())
    if base.model.name == model.name:
        # Fields that do not change the weights (compute dtype, remat, attention kernel) stay the base's.
        for field in ("dtype", "remat", "attention_impl"):
            if field in base.model:
                model[field] = base.model[field]
    # What base's network has (its fields over the module's defaults) against the converted one.
    base_network = create_model(base.model)
    same_network = base.model.name == model.name
    overrides = [f"--config.model.{k}={_flag_value(v)}" for k, v in model.items()
                 if not same_network or (k != "name" and getattr(base_network, k) != v)]
    config.model = model
    data = config.data
    if (data.image_size, data.image_size, data.num_channels) != conversion.image_shape or \
            data.num_classes != conversion.num_classes:
        data.name = _DATASETS.get((conversion.image_shape, conversion.num_classes), "folder")
        data.image_size, data.num_channels = conversion.image_shape[0], conversion.image_shape[2]
        data.num_classes = conversion.num_classes
    param = config.parametrization
    param.sigma_data = conversion.sigma_data
    param.c_noise = "edm"  # EDMPrecond: c_noise = ln(sigma) / 4
    # EDM's sampler keeps to the noise levels the network supports (generate.py edm_sampler).
    low, high = conversion.sigma_range
    param.sigma_min, param.sigma_max = max(param.sigma_min, low), min(param.sigma_max, high)
    return config, overrides


def _flag_value(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "'(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")'"
    return str(value)


def write_workdir(workdir: str, config: ml_collections.ConfigDict, conversion: Conversion,
                  provenance: dict[str, Any]) -> None:
    """config.json, converted_from.json and a step-0 checkpoint whose params and EMAs are the EDM weights."""
    from consistency_jax import checkpointing

    directory = os.path.join(workdir, "checkpoints")
    if os.path.exists(directory) and os.listdir(directory):
        raise ConversionError(f"{workdir} already has checkpoints; convert into a new directory.")
    os.makedirs(workdir, exist_ok=True)
    params = jax.tree.map(jnp.asarray, conversion.params)
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "ema_params": tuple(params for _ in config.training.ema_rates)}
    checkpointer = checkpointing.Checkpointer(directory, keep=1)
    try:
        checkpointer.save(0, state, {}, force=True)
        checkpointer.wait()
    finally:
        checkpointer.close()
    with open(os.path.join(workdir, "converted_from.json"), "w") as f:
        json.dump(provenance, f, indent=2)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))


def convert(export_path: str, workdir: str, base: ml_collections.ConfigDict) -> list[str]:
    """Converts an exported EDM network into `workdir`; returns the config.model overrides `base` needs."""
    network = load_export(export_path)
    conversion = convert_network(network)
    config, overrides = converted_config(base, conversion)
    from consistency_jax import methods

    methods.check_method_config(config)  # the data are not needed (nor read) to convert
    with open(export_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    provenance = {"source": os.path.abspath(export_path), "sha256": digest, "class": network.class_name,
                  "init_kwargs": network.init_kwargs, "notes": list(conversion.notes),
                  "num_params": int(sum(np.size(x) for x in jax.tree.leaves(conversion.params)))}
    write_workdir(workdir, config, conversion, provenance)
    return overrides


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py")

FLAGS = flags.FLAGS
flags.DEFINE_string("edm", None, "The exported EDM network (.npz; see the README's \"EDM checkpoints\" recipe).")
flags.DEFINE_string("workdir", None, "The new workdir to write (config.json, checkpoints/0, converted_from.json).")
config_flags.DEFINE_config_file(
    "config", None, "Experiment config whose other fields config.json takes (default: configs/default.py); "
    "its network, data shape and preconditioning are replaced by the EDM network's.", lock_config=False)


def _base_config() -> ml_collections.ConfigDict:
    if FLAGS.config is not None:
        return FLAGS.config
    if not os.path.exists(_DEFAULT_CONFIG):
        raise app.UsageError("Pass --config=<an experiment config file>: configs/default.py was not found.")
    spec = importlib.util.spec_from_file_location("consistency_jax_default_config", _DEFAULT_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every stage of a save at INFO
    try:
        overrides = convert(FLAGS.edm, FLAGS.workdir, _base_config())
    except ConversionError as e:
        raise app.UsageError(str(e)) from e
    print(f"Converted {FLAGS.edm} into {FLAGS.workdir}.\n"
          f"Use it as a teacher or initialisation: --config.method.teacher_workdir={FLAGS.workdir}")
    if overrides:
        print("To sample or evaluate it with --mode=sample/eval, the config needs the converted network: "
              + " ".join(overrides))


if __name__ == "__main__":
    flags.mark_flags_as_required(["edm", "workdir"])
    app.run(main)
