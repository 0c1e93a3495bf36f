"""Noise grids, discretisation curricula and noise-level distributions (SPEC sections 1-2).

Everything here works on traced values, so that a curriculum that changes the
grid size with the step runs inside one jitted train step without recompiling.
Grid indices are 0-based: index 0 is SPEC's sigma_1, the smallest sigma.
"""

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import erf


def karras_sigma(index: jax.Array, num_scales: jax.Array, sigma_min: float, sigma_max: float,
                 rho: float) -> jax.Array:
    """sigma_{index+1} of the N-point Karras grid, for traced index and N."""
    frac = index / jnp.maximum(num_scales - 1, 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + frac * (hi - lo)) ** rho


def karras_sigmas(num_scales: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> jax.Array:
    """The whole N-point grid, ascending."""
    return karras_sigma(jnp.arange(num_scales, dtype=jnp.float32), num_scales, sigma_min, sigma_max, rho)


def ict_num_scales(step: jax.Array, total_steps: int, s0: int = 10, s1: int = 1280) -> jax.Array:
    """iCT's exponential curriculum N(k) = min(s0 * 2^floor(k / K'), s1) + 1."""
    # K' = floor(K / (log2(floor(s1 / s0)) + 1)), the log not rounded (SPEC section 2).
    steps_per_stage = max(math.floor(total_steps / (math.log2(s1 // s0) + 1)), 1)
    stage = jnp.asarray(step, jnp.int32) // steps_per_stage
    # s0 * 2^stage passes s1 after ceil(log2(s1 / s0)) doublings; clipping there keeps it from overflowing int32.
    scales = s0 * jnp.left_shift(1, jnp.minimum(stage, math.ceil(math.log2(s1 / s0))))
    return jnp.minimum(scales, s1) + 1


CT_CURRICULA = ("cm", "act")


def ct_num_scales(step: jax.Array, total_steps: int, s0: int = 2, s1: int = 150, code: str = "cm") -> jax.Array:
    """The original CT sqrt curriculum N(k), as the consistency-models code or the ACT code rounds it.

    'cm' (cm/script_util.py, jcm/losses.py): N = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1, from s0 to
    s1 + 1 points. 'act' (kong13661/ACT train_cifar10.py, `bins`): N = round(sqrt(k/K (s1^2 - s0^2) + s0^2)),
    from s0 to s1 points, held at s1 past K.
    """
    if code not in CT_CURRICULA:
        raise ValueError(f"Unknown CT curriculum {code!r}; valid: {', '.join(CT_CURRICULA)}.")
    k = jnp.asarray(step, jnp.float32)
    if code == "act":
        n = jnp.minimum(jnp.round(jnp.sqrt(k / total_steps * (s1**2 - s0**2) + s0**2)), s1)
    else:
        n = jnp.ceil(jnp.sqrt(k / total_steps * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1
    return n.astype(jnp.int32)


def ct_target_ema_decay(num_scales: jax.Array, s0: int = 2, mu0: float = 0.9) -> jax.Array:
    """EMA rate of the original CT target network, mu(k) = exp(s0 ln(mu0) / N(k))."""
    return jnp.exp(s0 * math.log(mu0) / jnp.asarray(num_scales, jnp.float32))


def lognormal_interval_logits(sigmas: jax.Array, num_scales: jax.Array, p_mean: float,
                              p_std: float) -> jax.Array:
    """Unnormalised log-probabilities of the intervals (sigma_i, sigma_{i+1}).

    P(i) ~ erf((ln s_{i+1} - Pm)/(sqrt2 Ps)) - erf((ln s_i - Pm)/(sqrt2 Ps)). `sigmas`
    holds a padded grid (length >= num_scales); intervals past num_scales - 1 get -inf.
    """
    cdf = erf((jnp.log(sigmas) - p_mean) / (math.sqrt(2.0) * p_std))
    mass = cdf[1:] - cdf[:-1]
    valid = jnp.arange(mass.shape[0]) < num_scales - 1
    return jnp.where(valid, jnp.log(jnp.maximum(mass, 1e-30)), -jnp.inf)


def sample_ict_sigma_pairs(rng: jax.Array, batch_size: int, num_scales: jax.Array, max_scales: int,
                           p_mean: float, p_std: float, sigma_min: float, sigma_max: float,
                           rho: float) -> tuple[jax.Array, jax.Array]:
    """Draws iCT's (sigma_i, sigma_{i+1}) pairs, one per example, from the lognormal distribution."""
    grid = karras_sigma(jnp.arange(max_scales, dtype=jnp.float32), num_scales, sigma_min, sigma_max, rho)
    # Past num_scales the formula extrapolates beyond sigma_max; those intervals are masked out.
    logits = lognormal_interval_logits(grid, num_scales, p_mean, p_std)
    index = jax.random.categorical(rng, logits, shape=(batch_size,))
    return grid[index], grid[index + 1]


def ict_loss_weight(sigma_lo: jax.Array, sigma_hi: jax.Array) -> jax.Array:
    """iCT's lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i)."""
    return 1.0 / (sigma_hi - sigma_lo)


def ect_stage(step: jax.Array, steps_per_stage: int) -> jax.Array:
    """ECT's stage = floor(iteration / d): the gap t - r shrinks by q at every stage."""
    return jnp.asarray(step, jnp.int32) // steps_per_stage


def ect_r(t: jax.Array, stage: jax.Array, q: float, k: float = 8.0, b: float = 1.0) -> jax.Array:
    """ECT's r(t) = max(t (1 - n(t) / q^(stage + 1)), 0) with n(t) = 1 + k sigmoid(-b t) (SPEC section 4).

    k = 8, b = 1 in both published setups (locuslab/ect training/loss.py t_to_r_sigmoid). A q^-(stage+1)
    that underflows to 0 in float32 (q = 256 after ~17 stages) gives r = t, the limit.
    """
    n = 1 + k * jax.nn.sigmoid(-b * t)
    decay = jnp.power(jnp.float32(q), -(jnp.asarray(stage, jnp.float32) + 1))
    return jnp.maximum(t * (1 - n * decay), 0.0)
