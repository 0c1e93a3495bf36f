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


def ema_update(ema: Any, params: Any, rate: float | jax.Array) -> Any:
    """rate * ema + (1 - rate) * params, written as ema + (1 - rate) * (params - ema).

    The same average, but a leaf equal to its EMA (a frozen param such as the
    Fourier frequencies) stays bit-identical; the other form drifts by rounding.
    """
    return jax.tree.map(lambda e, p: e + (1 - rate) * (p - e), ema, params)


def update_emas(ema_params: tuple[Any, ...], params: Any, rates: tuple[float | jax.Array, ...]) -> tuple[Any, ...]:
    return tuple(ema_update(ema, params, rate) for ema, rate in zip(ema_params, rates))
