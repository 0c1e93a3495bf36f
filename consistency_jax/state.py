"""The train state: everything a run needs to continue exactly where it stopped."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from consistency_jax import phema


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: optax.OptState
    # One pytree per EMA: those of config.training.ema_rates, then the power-function EMAs of
    # config.training.ema_sigma_rels (consistency_jax/phema.py).
    ema_params: tuple[Any, ...]
    # What the method keeps beside the params (methods/base.py): EMA target, frozen
    # teacher, discriminator and its optimizer state, ...; {} for iCT.
    method_state: Any
    rng: jax.Array  # base key; step k uses fold_in(rng, k), so resuming needs no rng bookkeeping


def create_train_state(params: Any, optimizer: optax.GradientTransformation, num_emas: int, rng: jax.Array,
                       method_state: Any) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      ema_params=tuple(params for _ in range(num_emas)), method_state=method_state, rng=rng)


def ema_decays(step: jax.Array, ema_rates: tuple[float, ...],
               ema_sigma_rels: tuple[float, ...] = ()) -> tuple[jax.Array | float, ...]:
    """The decay of every EMA for the update after `step` completed steps, in ema_params order.

    Exponential EMAs decay at their fixed rate; a power-function EMA's rate follows the step.
    """
    return (*ema_rates, *(phema.power_ema_decay(step, s) for s in ema_sigma_rels))


def update_emas(ema_params: tuple[Any, ...], params: Any, rates: tuple[jax.Array | float, ...]) -> tuple[Any, ...]:
    return tuple(jax.tree.map(lambda e, p, r=rate: r * e + (1 - r) * p, ema, params)
                 for ema, rate in zip(ema_params, rates))
