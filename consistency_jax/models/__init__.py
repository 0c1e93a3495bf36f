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
