"""Model registry: networks are chosen by `config.model.name`.

Every network is a Flax Linen module with the same call signature,

    module(x, noise_labels, class_labels=None, *, train: bool) -> array shaped like x

where `x` is the preconditioned input (NHWC), `noise_labels` the per-example
c_noise(sigma) values [B], and `class_labels` int32 [B] or None (the value
`num_classes` is the null class kept for classifier-free guidance). The module
never knows which method trains it; the other fields of `config.model` are the
module's own dataclass fields.

Some params are constants of the network (the Fourier frequencies): they are
stored with the others but never trained; `trainable_mask` tells them apart
(layers.FROZEN_PARAM_NAMES says why they live in 'params').

A network whose params must stay on a constraint set after every optimizer step
(EDM2's forced weight normalisation) defines a static `project_params(params)`;
`project_params` below applies it (Method.update calls it), other networks
leave the params as they are.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from consistency_jax import config_rules as rules
from consistency_jax.config_rules import ConfigError
from consistency_jax.models.layers import FROZEN_PARAM_NAMES


def _registry() -> dict[str, type[nn.Module]]:
    # Imported here so that importing the package does not build every network.
    from consistency_jax.models import adm, edm2, ncsnpp

    return {"ncsnpp": ncsnpp.NCSNpp, "adm": adm.ADM, "edm2": edm2.EDM2UNet}


def model_names() -> list[str]:
    return sorted(_registry())


def create_model(model_config: ml_collections.ConfigDict, **overrides: Any) -> nn.Module:
    """Builds the network named by `model_config.name` from the config's other fields."""
    registry = _registry()
    name = model_config.name
    if name not in registry:
        raise ValueError(f"Unknown model name {name!r}; valid names: {', '.join(sorted(registry))}.")
    cls = registry[name]
    fields = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")}
    kwargs = {k: v for k, v in model_config.items() if k != "name"}
    kwargs.update(overrides)
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(
            f"config.model has fields {unknown} that model {name!r} does not take; "
            f"valid fields: {', '.join(sorted(fields))}."
        )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return cls(**kwargs)


def create_model_for(config: ml_collections.ConfigDict) -> nn.Module:
    """The network of an experiment config; it embeds config.data.num_classes classes.

    The model takes its class count from the data, so `--config.data.num_classes`
    alone makes a run class-conditional. A config that also sets
    model.num_classes (to tie the two explicitly) must agree with the data.
    """
    data_classes = config.data.num_classes
    if "num_classes" not in _field_names(config.model.name):
        return create_model(config.model)
    model_classes = config.model.get("num_classes", data_classes)
    if model_classes != data_classes:
        raise ConfigError(
            f"config.model.num_classes={model_classes} differs from config.data.num_classes={data_classes}: the "
            f"network embeds the labels the data provides. Set both to the same value "
            f"(--config.model.num_classes={data_classes} --config.data.num_classes={data_classes}).")
    return create_model(config.model, num_classes=data_classes)


def _field_names(name: str) -> set[str]:
    cls = _registry()[name]
    return {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")}


# ----------------------------------------------------------------------------
# Rules of the networks' fields (config_rules.py). Each registered network needs
# a rule for every field it takes (tests/test_validation.py checks this).
# ----------------------------------------------------------------------------

_UNET_RULES = {
    "model_channels": rules.Int(ge=1),
    "channel_mult": rules.Numbers(rules.Int(ge=1), min_len=1),
    "num_res_blocks": rules.Int(ge=1),
    "attn_resolutions": rules.Numbers(rules.Int(ge=1), unique=True),
    "dropout": rules.Float(ge=0, lt=1),
    "embedding_type": rules.Choice(("fourier", "positional")),
    "fourier_scale": rules.Float(gt=0),
    "num_classes": rules.Int(ge=0),
    "dtype": rules.Choice(("float32", "bfloat16")),
    "remat": rules.Flag(),
    "attention_impl": rules.Choice(("xla", "dot_product_attention")),
}
_MODEL_RULES = {
    "ncsnpp": {**_UNET_RULES,
               "resample_filter": rules.Numbers(rules.Float(ge=0), min_len=1),
               "progressive_input": rules.Choice(("residual", "none")),
               "skip_rescale": rules.Flag(),
               "adaptive_double_norm": rules.Flag()},
    "adm": {**_UNET_RULES,
            "num_head_channels": rules.Int(ge=1),
            "scale_shift_norm": rules.Flag(),
            "resblock_updown": rules.Flag(),
            "adaptive_double_norm": rules.Flag(),
            "dropout_max_resolution": rules.Int(ge=0, why="0: dropout at every resolution")},
    "edm2": {
        "model_channels": rules.Int(ge=1),
        "channel_mult": rules.Numbers(rules.Int(ge=1), min_len=1),
        "channel_mult_noise": rules.Int(ge=0, why="0: channel_mult[0]"),
        "channel_mult_emb": rules.Int(ge=0, why="0: max(channel_mult)"),
        "num_blocks": rules.Int(ge=1),
        "attn_resolutions": rules.Numbers(rules.Int(ge=1), unique=True),
        "channels_per_head": rules.Int(ge=1),
        "label_balance": rules.Float(ge=0, le=1),
        "concat_balance": rules.Float(ge=0, le=1),
        "res_balance": rules.Float(ge=0, le=1),
        "attn_balance": rules.Float(ge=0, le=1),
        "clip_act": rules.Float(gt=0),
        "dropout": rules.Float(ge=0, lt=1),
        "dropout_res": rules.Int(ge=0, why="0: dropout at every resolution"),
        "num_classes": rules.Int(ge=0),
        "dtype": rules.Choice(("float32", "bfloat16")),
        "remat": rules.Flag(),
    },
}


def model_rules(name: str) -> dict[str, rules.Rule]:
    """{field: rule} for network `name`; `name` itself is checked against the registry."""
    return {"name": rules.Choice(model_names), **_MODEL_RULES.get(name, {})}


def check_model_config(config: ml_collections.ConfigDict) -> None:
    """config.model: a known network, only its own fields, valid values, and a U-Net that fits the images."""
    rules.check_fields(config, "model", model_rules(config.model.name))
    try:
        model = create_model(config.model)  # fields the network does not take, with the valid ones
    except ValueError as e:
        raise ConfigError(str(e)) from e
    create_model_for(config)
    levels = len(getattr(model, "channel_mult", ()))
    if levels:
        size = config.data.image_size
        if size % 2 ** (levels - 1):
            raise ConfigError(
                f"config.data.image_size={size} cannot be halved {levels - 1} times, as "
                f"config.model.channel_mult={tuple(model.channel_mult)} ({levels} resolutions) needs; use an image "
                f"size divisible by {2 ** (levels - 1)} or fewer channel_mult entries.")
        resolutions = [size // 2**level for level in range(levels)]
        unused = [r for r in getattr(model, "attn_resolutions", ()) if r not in resolutions]
        if unused:
            raise ConfigError(
                f"config.model.attn_resolutions={tuple(model.attn_resolutions)} names resolutions the network "
                f"does not have: {unused}; with {size}x{size} images and {levels} levels they are {resolutions}.")


def project_params(model: nn.Module | None, params: Any) -> Any:
    """The network's projection of its params after an optimizer step, if it has one (EDM2's forced WN)."""
    project = getattr(model, "project_params", None)
    return project(params) if project is not None else params


def trainable_mask(params: Any) -> Any:
    """A pytree of bools like `params`: False for the frozen params (layers.FROZEN_PARAM_NAMES).

    For optax masks (e.g. adamw's weight decay): a frozen param already has a
    zero gradient, but a transformation that adds a multiple of the param
    itself would still move it.
    """
    def trainable(path, _) -> bool:
        last = path[-1] if path else None
        return getattr(last, "key", None) not in FROZEN_PARAM_NAMES

    return jax.tree_util.tree_map_with_path(trainable, params)


def count_params(params: Any, *, trainable_only: bool = False) -> int:
    """Number of scalars in `params`; with trainable_only, without the frozen ones."""
    leaves = jax.tree_util.tree_leaves(params)
    flags = jax.tree_util.tree_leaves(trainable_mask(params)) if trainable_only else [True] * len(leaves)
    return sum(math.prod(leaf.shape) for leaf, keep in zip(leaves, flags) if keep)
