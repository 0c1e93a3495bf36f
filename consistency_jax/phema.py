"""EDM2's power-function EMA and its post-hoc reconstruction (Karras et al. 2024, section 3 and appendix C).

Reference: NVlabs/edm2 training/phema.py (std_to_exp, power_function_beta, power_function_correlation,
solve_posthoc_coefficients) and reconstruct_phema.py; locuslab/ect branch `imgnet` training/phema.py (the
same, with sigma_rel profiles 0.010, 0.050, 0.100 tracked while tuning).

A power-function EMA averages the weights of steps tau <= t with density proportional to tau^gamma; its width
is given as sigma_rel, the standard deviation of that density relative to t (EDM2 Equation 123). It is an
ordinary EMA whose rate changes with the step: after update number t (t = 1, 2, ...) its decay is
beta(t) = (1 - 1/t)^(gamma + 1) (Equation 127, with time counted in optimizer steps: the ratio of images
EDM2 uses is the same at a constant batch size). beta(1) = 0, so it starts at the current params.

Enable it with `config.training.ema_sigma_rels` (one EMA per sigma_rel, kept in the train state after those
of `training.ema_rates`; sample from one with `sampling.ema_sigma_rel`). Post-hoc reconstruction: the
checkpoints of a run that keeps power-function EMAs at two or more sigma_rel (EDM2 stores two) at several
steps hold enough to rebuild the EMA of any other sigma_rel afterwards as a least-squares combination of
the stored ones (`posthoc_params`; keep the checkpoints with `training.keep_every`).
"""

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

MAX_SIGMA_REL = float(np.sqrt(1 / 12))  # sigma_rel of gamma = 0 (the plain average); larger ones do not exist


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of a power-function EMA with relative std sigma_rel (EDM2 Algorithm 2).

    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)); with s = sigma_rel^-2 that is the cubic
    gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0, whose largest real root is gamma.
    """
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}), got {sigma_rel}.")
    s = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def power_ema_decay(step: jax.Array, sigma_rel: float) -> jax.Array:
    """beta of the update that follows `step` completed updates (so the EMA covers steps 1..step+1)."""
    t = jnp.asarray(step, jnp.float32) + 1
    return jnp.power(1 - 1 / t, sigma_rel_to_gamma(sigma_rel) + 1)


def profile_inner_products(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """Inner products of the normalised power-function profiles p(tau) = (g + 1) tau^g / t^(g + 1) on [0, t].

    integral p_a p_b = (g_a + 1)(g_b + 1) / (g_a + g_b + 1) * min(t_a, t_b)^(g_a + g_b + 1) / (t_a^(g_a+1) t_b^(g_b+1)),
    broadcast over the arguments (EDM2 Equation 151).
    """
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    t_min = np.minimum(t_a, t_b)
    log_value = ((gamma_a + gamma_b + 1) * np.log(t_min) - (gamma_a + 1) * np.log(t_a)
                 - (gamma_b + 1) * np.log(t_b))
    return (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1) * np.exp(log_value)


def posthoc_coefficients(in_steps: Sequence[float], in_sigma_rels: Sequence[float], out_step: float,
                         out_sigma_rels: Sequence[float]) -> np.ndarray:
    """[num_in, num_out] weights: sum_i w_ij * EMA_i is the least-squares fit of the output profile j.

    Solves the normal equations A w = b of the profiles' inner products (EDM2 Algorithm 3), then rescales
    each column to sum to 1 so that the result is an average of the stored weights.
    """
    in_steps = np.asarray(in_steps, np.float64)
    in_gammas = np.asarray([sigma_rel_to_gamma(s) for s in in_sigma_rels], np.float64)
    out_gammas = np.asarray([sigma_rel_to_gamma(s) for s in out_sigma_rels], np.float64)
    gram = profile_inner_products(in_steps[:, None], in_gammas[:, None], in_steps[None, :], in_gammas[None, :])
    target = profile_inner_products(in_steps[:, None], in_gammas[:, None], np.float64(out_step), out_gammas[None, :])
    weights = np.linalg.solve(gram, target)
    return weights / weights.sum(axis=0, keepdims=True)


def combine(pytrees: Sequence[Any], weights: Sequence[float]) -> Any:
    """sum_i weights[i] * pytrees[i], accumulated in float32."""
    total = None
    for tree, w in zip(pytrees, weights):
        scaled = jax.tree.map(lambda x, w=float(w): x.astype(jnp.float32) * w, tree)
        total = scaled if total is None else jax.tree.map(jnp.add, total, scaled)
    return total


def posthoc_params(experiment, workdir: str, sigma_rel: float, step: int | None = None) -> Any:
    """The power-function EMA with `sigma_rel` at checkpoint `step` (default: the latest), rebuilt post hoc.

    Uses the power-function EMAs (config.training.ema_sigma_rels) of every checkpoint in
    <workdir>/checkpoints at or before `step`; its accuracy grows with the number of checkpoints kept
    (training.keep_every) and with two or more stored sigma_rel. Returns params for generate/evaluate.
    """
    from consistency_jax import checkpointing  # the training stack; the maths above needs none of it

    train = experiment.config.training
    stored = tuple(train.ema_sigma_rels)
    if not stored:
        raise ValueError("Post-hoc EMA needs power-function EMAs in the checkpoints: this run's "
                         "config.training.ema_sigma_rels is empty.")
    offset = len(train.ema_rates)
    # Read-only: the run may be saving beside it (a writable manager would delete its save in progress).
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        steps = sorted(checkpointer.all_steps())
        out_step = steps[-1] if step is None else step
        if out_step not in steps:
            raise ValueError(f"No checkpoint at step {out_step} in {workdir}/checkpoints; steps: {steps}.")
        in_steps = [s for s in steps if 0 < s <= out_step]
        pairs = [(s, k) for s in in_steps for k in range(len(stored))]
        coefficients = posthoc_coefficients([s for s, _ in pairs], [stored[k] for _, k in pairs], out_step,
                                            [sigma_rel])[:, 0]
        abstract = experiment.abstract_state()
        total = None
        for s in in_steps:
            _, fields = checkpointer.restore_fields({"ema_params": abstract.ema_params}, s)
            emas = fields["ema_params"][offset:]
            part = combine(emas, [coefficients[pairs.index((s, k))] for k in range(len(stored))])
            total = part if total is None else jax.tree.map(jnp.add, total, part)
    finally:
        checkpointer.close()
    return total
