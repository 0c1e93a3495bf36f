"""EDM diffusion training (Karras et al. 2022, "Elucidating the design space of diffusion models").

The teacher that CD distils and the initialisation that ECT/SCT tune: the EDM
denoiser D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (no consistency
boundary condition), trained with ln(sigma) ~ N(p_mean, p_std^2) and the
weight (sigma^2 + sd^2) / (sigma sd)^2 on ||D(x + sigma z, sigma) - x||^2
(summed over the image, averaged over the batch), SPEC section 1. Reference:
NVlabs/edm training/loss.py (EDMLoss) and generate.py (edm_sampler).

Sampling is EDM's Heun sampler: `sampling.num_steps` (or each of
`eval.steps`) noise levels on the Karras grid from parametrization.sigma_max
to sigma_min with parametrization.rho, then 0; 2N - 1 network evaluations
(18 levels = 35 on CIFAR-10). `heun_s_churn` > 0 gives the stochastic sampler.
"""

import jax
import jax.numpy as jnp
import ml_collections

from consistency_jax import config_rules as rules
from consistency_jax import samplers
from consistency_jax.methods.base import Method
from consistency_jax.parametrization import ConsistencyFunction


class EDM(Method):
    name = "edm"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        fields = super().default_config()
        fields.p_mean = -1.2  # ln(sigma) ~ N(p_mean, p_std^2) during training
        fields.p_std = 1.2
        # EDM's stochastic sampler (Algorithm 2); s_churn = 0 is the deterministic Heun sampler.
        fields.heun_s_churn = 0.0
        fields.heun_s_tmin = 0.0  # churn only at noise levels in [s_tmin, s_tmax]
        fields.heun_s_tmax = float("inf")
        fields.heun_s_noise = 1.0  # scale of the churn noise
        return fields

    @classmethod
    def config_rules(cls):
        return {**super().config_rules(),
                "p_mean": rules.Float(),
                "p_std": rules.Float(gt=0),
                "heun_s_churn": rules.Float(ge=0),
                "heun_s_tmin": rules.Float(ge=0, le="method.heun_s_tmax"),
                "heun_s_tmax": rules.Float(ge=0, allow_inf=True),
                "heun_s_noise": rules.Float(ge=0)}

    @classmethod
    def check_sampler(cls, config: ml_collections.ConfigDict, num_steps: int) -> None:
        if num_steps < 1:
            raise ValueError(f"The Heun sampler needs at least 1 noise level, got {num_steps} steps.")

    @classmethod
    def make_function(cls, config, model):
        param = config.parametrization
        return ConsistencyFunction(model, sigma_min=param.sigma_min, sigma_data=param.sigma_data,
                                   c_noise_kind=param.c_noise, boundary=False)

    def loss(self, params, method_state, batch, rng, step):
        x, labels = batch["image"], batch.get("label")
        sigma_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
        fields, sigma_data = self.fields, self.fn.sigma_data
        sigma = jnp.exp(fields.p_mean + fields.p_std * jax.random.normal(sigma_rng, (x.shape[0],)))
        noisy = x + sigma[:, None, None, None] * jax.random.normal(noise_rng, x.shape, x.dtype)
        denoised = self.fn(params, noisy, sigma, labels, train=True, dropout_rng=dropout_rng)
        weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
        squared_error = jnp.sum(jnp.square(denoised - x).reshape(x.shape[0], -1), axis=-1)
        return jnp.mean(weight * squared_error), {"squared_error": jnp.mean(squared_error)}

    def sampler(self, num_steps: int) -> samplers.Sampler:
        param, fields = self.config.parametrization, self.fields
        sigmas = samplers.edm_sigmas(num_steps, param.sigma_min, param.sigma_max, param.rho)
        churn = dict(s_churn=fields.heun_s_churn, s_tmin=fields.heun_s_tmin, s_tmax=fields.heun_s_tmax,
                     s_noise=fields.heun_s_noise)

        def sample(params, rng, shape, labels):
            return samplers.heun_sample(self.fn, params, rng, shape, sigmas, labels, **churn)

        return samplers.Sampler(key=("heun", sigmas, tuple(sorted(churn.items()))), sample=sample, sigmas=sigmas,
                                network_evaluations=2 * num_steps - 1)
