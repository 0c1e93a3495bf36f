"""TrigFlow diffusion training (Lu & Song 2024, appendix B and G.1): the teachers and initialisations of sCT/sCD.

x_t = cos(t) x0 + sin(t) z, z ~ N(0, sd^2 I); the network predicts the PF-ODE velocity
v_t = cos(t) z - sin(t) x0 as sd F(x_t / sd, c_noise(t)) (eq. 25) and is trained with

    E ||F(x_t / sd, t) - v_t / sd||^2,   ln(sd tan t) ~ N(p_mean, p_std^2),

which is EDM's loss (weight (sigma^2 + sd^2) / (sigma sd)^2 on ||D - x0||^2, the same
lognormal proposal of sigma = sd tan t) written in TrigFlow coordinates: D - x0 =
-sin(t) (sd F - v_t) and that weight is 1 / (sd sin t)^2. The paper trains its CIFAR-10
teacher "with the same settings of EDM" (G.1: FID 2.15 with 35 NFE), so this is that
objective; its ImageNet teachers follow EDM2 config G (adaptive loss weighting, not
here). The network is a TrigFlowFunction (c_noise(t) = time_scale * t by default;
parametrization.py), so sampling is EDM's Heun sampler on it in EDM coordinates, which
the paper notes is exactly its DPM-Solver-2S with Heun's intermediate time (G.1).
Everything else (sampler fields, proposal defaults -1.2 / 1.2) is the EDM method's.
"""

import jax
import jax.numpy as jnp
import ml_collections

from consistency_jax.methods import edm
from consistency_jax.parametrization import TRIGFLOW_TIME_CONDITIONINGS, TrigFlowFunction, trigflow_time


class TrigFlow(edm.EDM):
    name = "trigflow"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        fields = super().default_config()
        # c_noise(t) = time_scale * t (the paper's identity time transformation), or 'edm':
        # parametrization.c_noise of sigma = sd tan t, EDM's conditioning (methods/scm.py).
        fields.time_conditioning = "trigflow"
        fields.time_scale = 1.0
        return fields

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        super().check_config(config)
        fields = config.method
        if fields.time_conditioning not in TRIGFLOW_TIME_CONDITIONINGS:
            raise ValueError(f"config.method.time_conditioning={fields.time_conditioning!r}; valid: "
                             f"{', '.join(TRIGFLOW_TIME_CONDITIONINGS)}.")
        if not fields.time_scale > 0:
            raise ValueError(f"config.method.time_scale must be > 0, got {fields.time_scale}.")

    @classmethod
    def make_function(cls, config, model):
        fields = config.method
        return TrigFlowFunction(model, sigma_data=config.parametrization.sigma_data,
                                time_conditioning=fields.time_conditioning, time_scale=fields.time_scale,
                                c_noise_kind=config.parametrization.c_noise)

    def loss(self, params, method_state, batch, rng, step):
        x0, labels = batch["image"], batch.get("label")
        sigma_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
        fields, sd = self.fields, self.fn.sigma_data
        t = trigflow_time(jnp.exp(fields.p_mean + fields.p_std * jax.random.normal(sigma_rng, (x0.shape[0],))), sd)
        z = sd * jax.random.normal(noise_rng, x0.shape, x0.dtype)
        cos, sin = jnp.cos(t)[:, None, None, None], jnp.sin(t)[:, None, None, None]
        x_t, v_t = cos * x0 + sin * z, cos * z - sin * x0
        f = self.fn.raw(params, x_t / sd, t, labels, train=True, dropout_rng=dropout_rng)
        squared_error = jnp.sum(jnp.square(f - v_t / sd).reshape(x0.shape[0], -1), axis=-1)
        return jnp.mean(squared_error), {"squared_error": jnp.mean(squared_error)}
