"""iCT: improved consistency training (Song & Dhariwal 2023), SPEC section 2.

The teacher is the student itself under stop-gradient (no EMA teacher): the
student sees x + sigma_{i+1} z, the teacher x + sigma_i z with the same z and
the same dropout rng, and the pseudo-Huber distance is weighted by
1 / (sigma_{i+1} - sigma_i).
"""

import jax
import jax.numpy as jnp
import ml_collections

from consistency_jax import config_rules as rules
from consistency_jax import schedules
from consistency_jax.methods import distances
from consistency_jax.methods.base import Method
from consistency_jax.parametrization import NetworkFunction


def ict_loss(params, batch: dict, rng: jax.Array, step: jax.Array, *, fn: NetworkFunction,
             total_steps: int, s0: int, s1: int, p_mean: float, p_std: float, huber_c: float,
             rho: float, sigma_max: float) -> tuple[jax.Array, dict]:
    """Mean over the batch of lambda(sigma_i) d(f(x + s_{i+1} z, s_{i+1}), sg f(x + s_i z, s_i))."""
    x = batch["image"]
    labels = batch.get("label")
    pair_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
    num_scales = schedules.ict_num_scales(step, total_steps, s0, s1)
    sigma_lo, sigma_hi = schedules.sample_ict_sigma_pairs(
        pair_rng, x.shape[0], num_scales, s1 + 1, p_mean, p_std, fn.sigma_min, sigma_max, rho)
    z = jax.random.normal(noise_rng, x.shape, x.dtype)
    student = fn(params, x + sigma_hi[:, None, None, None] * z, sigma_hi, labels, train=True,
                 dropout_rng=dropout_rng)
    teacher = fn(jax.lax.stop_gradient(params), x + sigma_lo[:, None, None, None] * z, sigma_lo, labels,
                 train=True, dropout_rng=dropout_rng)
    teacher = jax.lax.stop_gradient(teacher)
    distance = distances.pseudo_huber(student, teacher, huber_c)
    loss = jnp.mean(schedules.ict_loss_weight(sigma_lo, sigma_hi) * distance)
    return loss, {"num_scales": num_scales, "distance": jnp.mean(distance)}


class ICT(Method):
    name = "ict"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        fields = super().default_config()
        fields.s0 = 10  # curriculum: initial number of discretisation intervals
        fields.s1 = 1280  # curriculum: final number of intervals
        fields.curriculum_steps = -1  # K in N(k); -1: training.num_steps
        fields.p_mean = -1.1  # lognormal index distribution: mean of ln(sigma)
        fields.p_std = 2.0  # ... and its standard deviation
        fields.huber_c = -1.0  # pseudo-Huber c; -1: 0.00054 * sqrt(H * W * C)
        return fields

    @classmethod
    def config_rules(cls):
        return {**super().config_rules(),
                "s0": rules.Int(ge=1),
                "s1": rules.Int(ge="method.s0"),
                "curriculum_steps": rules.Int(ge=1, special={-1: "training.num_steps"}),
                "p_mean": rules.Float(),
                "p_std": rules.Float(gt=0),
                "huber_c": rules.Float(gt=0, special={-1.0: "0.00054 * sqrt(H * W * C)"})}

    def loss(self, params, method_state, batch, rng, step):
        fields, param = self.fields, self.config.parametrization
        return ict_loss(params, batch, rng, step, fn=self.fn,
                        total_steps=curriculum_steps(self.config), s0=fields.s0, s1=fields.s1,
                        p_mean=fields.p_mean, p_std=fields.p_std,
                        huber_c=huber_c(self.config, self.image_shape), rho=param.rho,
                        sigma_max=param.sigma_max)


def curriculum_steps(config: ml_collections.ConfigDict) -> int:
    k = config.method.curriculum_steps
    return config.training.num_steps if k < 0 else k


def huber_c(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int]) -> float:
    c = config.method.huber_c
    return distances.default_huber_c(image_shape) if c < 0 else c
