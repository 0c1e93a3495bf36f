"""Method registry: a method is a pure loss plus the configs that use it.

`create_loss(config, fn, image_shape)` returns

    loss(params, batch, rng, step) -> (scalar loss, dict of scalar metrics)

a pure function: everything that changes during training (params, and for
methods that need them, teacher or target params) is an argument; what it
closes over is the static network wrapper and config numbers.
"""

from typing import Callable

import ml_collections

from consistency_jax.parametrization import ConsistencyFunction

LossFn = Callable


def _registry() -> dict:
    from consistency_jax.methods import ict

    return {"ict": ict}


def method_names() -> list[str]:
    return sorted(_registry())


def get_method(name: str):
    registry = _registry()
    if name not in registry:
        raise ValueError(f"Unknown method name {name!r}; valid names: {', '.join(sorted(registry))}.")
    return registry[name]


def create_loss(config: ml_collections.ConfigDict, fn: ConsistencyFunction,
                image_shape: tuple[int, int, int]) -> LossFn:
    return get_method(config.method.name).make_loss(config, fn, image_shape)
