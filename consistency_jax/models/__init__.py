"""Model registry: networks are chosen by `config.model.name`.

Every network is a Flax Linen module with the same call signature,

    module(x, noise_labels, class_labels=None, *, train: bool) -> array shaped like x

where `x` is the preconditioned input (NHWC), `noise_labels` the per-example
c_noise(sigma) values [B], and `class_labels` int32 [B] or None (the value
`num_classes` is the null class kept for classifier-free guidance). The module
never knows which method trains it; the other fields of `config.model` are the
module's own dataclass fields.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import ml_collections

from consistency_jax import config_rules as rules
from consistency_jax.config_rules import ConfigError


def _registry() -> dict[str, type[nn.Module]]:
    # Imported here so that importing the package does not build every network.
    from consistency_jax.models import adm, ncsnpp

    return {"ncsnpp": ncsnpp.NCSNpp, "adm": adm.ADM}


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
               "skip_rescale": rules.Flag()},
    "adm": {**_UNET_RULES,
            "num_head_channels": rules.Int(ge=1),
            "scale_shift_norm": rules.Flag()},
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
