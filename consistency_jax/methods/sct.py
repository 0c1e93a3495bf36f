"""SCT: stable consistency tuning (Wang, Geng, Li 2024, arXiv 2410.18958), SPEC section 4.

ECT (methods/ect.py) with a variance-reduced target. ECT's teacher input x_r = x + r z is a one-sample
estimate of where the probability-flow ODE through x_t = x + t z lands at r; SCT replaces the sample's own
x by the posterior mean E[x | x_t] estimated over a reference batch with the score identity,

    x0_hat(x_t) = sum_j softmax_j(-||x_t - x0_j||^2 / (2 t^2)) x0_j,
    x_r = x_t - (t - r) (x_t - x0_hat) / t,

the reference batch including the sample's own x0 (so a small t, where the softmax is one-hot on it, gives
ECT's x_r back). For class-conditional data the softmax runs over the samples of the same class only (all of
them when the sample's label was dropped to the null class for guidance training).

The reference batch is the whole global batch. Inside the jitted train step the batch is one global
jax.Array sharded over the mesh axes ('data', 'fsdp'), so the [B, B] logits are a global computation: XLA's
SPMD partitioner all-gathers the reference images to every device (one all-gather of B * H * W * C floats
per step; ImageNet-64 at B = 1024: 48 MiB in float32) and each device computes its B / devices rows
(2 B^2 H W C / devices flops, small next to the network). tests/test_ect.py checks that the compiled step
on a sharded batch contains the all-gather and gives the single-device result.

The SCT authors' repository (G-U-N/Stable-Consistency-Tuning) holds only a README ("Code and weights will be
released soon") in the snapshot read for this port, so this follows SPEC section 4's estimator. The rest of
SCT's recipe (its smoother schedule, multistep/phased training) is not public; its edge-skipping multistep
sampling is read as samplers.edge_skipping_sample (`sampler_eta`, unconfirmed), and classifier-free guidance
is `label_dropout` / `guidance_scale` (methods/ect.py).
"""

import jax
import jax.numpy as jnp

from consistency_jax.methods.ect import ECT


def posterior_mean(x0: jax.Array, z: jax.Array, t: jax.Array, labels: jax.Array | None = None,
                   unconditional: jax.Array | None = None) -> jax.Array:
    """x0_hat for x_t^i = x0^i + t_i z^i over the reference batch {x0^j} (the batch itself).

    With `labels` (the true classes), row i averages over the samples of its own class only, except the
    rows marked `unconditional` (labels dropped for guidance training), which average over all.

    Computed without forming x_t: the logit -||x_t^i - x0^j||^2 / (2 t_i^2) equals, up to a per-row constant
    that the softmax ignores, -(||x0^i - x0^j||^2 + 2 t_i z^i . (x0^i - x0^j)) / (2 t_i^2), whose diagonal
    is exactly 0. The expanded form ||x_t||^2 - 2 x_t . x0 + ||x0||^2 would lose the own sample's small
    distance t^2 ||z||^2 in float32 cancellation at small t. Matmuls in full float32 (Precision.HIGHEST: TPU
    matmuls default to bfloat16 passes).
    """
    b = x0.shape[0]
    x = x0.reshape(b, -1).astype(jnp.float32)
    e = z.reshape(b, -1).astype(jnp.float32)
    highest = jax.lax.Precision.HIGHEST
    gram = jnp.matmul(x, x.T, precision=highest)
    norms = jnp.diagonal(gram)
    data_distance = norms[:, None] + norms[None, :] - 2 * gram  # ||x0^i - x0^j||^2
    data_distance = jnp.where(jnp.eye(b, dtype=bool), 0.0, jnp.maximum(data_distance, 0.0))
    noise_dot = jnp.matmul(e, x.T, precision=highest)  # z^i . x0^j
    cross = jnp.diagonal(noise_dot)[:, None] - noise_dot  # z^i . (x0^i - x0^j)
    t = t.astype(jnp.float32)[:, None]
    logits = -(data_distance + 2 * t * cross) / (2 * t**2)
    if labels is not None:
        same = labels[:, None] == labels[None, :]
        if unconditional is not None:
            same = same | unconditional[:, None]
        logits = jnp.where(same, logits, -jnp.inf)  # the diagonal is always allowed
    weights = jax.nn.softmax(logits, axis=-1)  # subtracts the row maximum
    return jnp.matmul(weights, x, precision=highest).reshape(x0.shape).astype(x0.dtype)


def variance_reduced_target_input(x0: jax.Array, z: jax.Array, t: jax.Array, r: jax.Array,
                                  labels: jax.Array | None = None,
                                  unconditional: jax.Array | None = None) -> jax.Array:
    """x_r = x_t - (t - r) (x_t - x0_hat) / t, with x_t = x0 + t z."""
    x_t = x0 + t[:, None, None, None] * z
    x0_hat = posterior_mean(x0, z, t, labels, unconditional)
    return x_t - ((t - r) / t)[:, None, None, None] * (x_t - x0_hat)


class SCT(ECT):
    name = "sct"

    def target_input(self, x, z, t, r, labels, dropped):
        return variance_reduced_target_input(x, z, t, r, labels, dropped)
