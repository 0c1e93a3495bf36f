"""The train state: everything a run needs to continue exactly where it stopped."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: optax.OptState
    ema_params: tuple[Any, ...]  # one pytree per rate in config.training.ema_rates
    # What the method keeps beside the params (methods/base.py): EMA target, frozen
    # teacher, discriminator and its optimizer state, ...; {} for iCT.
    method_state: Any
    rng: jax.Array  # base key; step k uses fold_in(rng, k), so resuming needs no rng bookkeeping


def create_train_state(params: Any, optimizer: optax.GradientTransformation, num_emas: int, rng: jax.Array,
                       method_state: Any) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      ema_params=tuple(params for _ in range(num_emas)), method_state=method_state, rng=rng)


def update_emas(ema_params: tuple[Any, ...], params: Any, rates: tuple[float, ...]) -> tuple[Any, ...]:
    return tuple(jax.tree.map(lambda e, p, r=rate: r * e + (1 - r) * p, ema, params)
                 for ema, rate in zip(ema_params, rates))
