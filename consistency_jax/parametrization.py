"""EDM and consistency-boundary preconditioning (SPEC section 1).

`ConsistencyFunction` turns a raw network F into f(x, sigma) = c_skip x + c_out
F(c_in x, c_noise(sigma)), which satisfies f(x, sigma_min) = x exactly. It holds
only the module and numbers; params are always an argument.
"""

import dataclasses
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

C_NOISE_KINDS = ("edm", "cm", "raw")


def c_noise(sigma: jax.Array, kind: str) -> jax.Array:
    """Noise label fed to the network: 'edm' ln(s)/4, 'cm' 1000 ln(s)/4, 'raw' s."""
    if kind == "edm":
        return jnp.log(sigma) / 4
    if kind == "cm":
        return 1000 * jnp.log(sigma) / 4
    if kind == "raw":
        return sigma
    raise ValueError(f"Unknown c_noise kind {kind!r}; valid: {', '.join(C_NOISE_KINDS)}.")


def edm_scalings(sigma: jax.Array, sigma_data: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(c_skip, c_out, c_in) of the EDM denoiser."""
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / jnp.sqrt(total), 1 / jnp.sqrt(total)


def consistency_scalings(sigma: jax.Array, sigma_min: float,
                         sigma_data: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(c_skip, c_out, c_in) with c_skip(sigma_min) = 1 and c_out(sigma_min) = 0."""
    shifted = sigma - sigma_min
    c_skip = sigma_data**2 / (shifted**2 + sigma_data**2)
    c_out = shifted * sigma_data / jnp.sqrt(sigma**2 + sigma_data**2)
    c_in = 1 / jnp.sqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out, c_in


class NetworkFunction(Protocol):
    """A network wrapped in a parametrization: what methods and samplers call.

    It holds only the module and numbers; params are always an argument.
    """

    sigma_min: float
    sigma_data: float

    def __call__(self, params: Any, x: jax.Array, sigma: jax.Array, labels: jax.Array | None = None,
                 *, train: bool = False, dropout_rng: jax.Array | None = None) -> jax.Array: ...

    def init(self, rng: jax.Array, image_shape: tuple[int, ...], with_labels: bool) -> Any: ...


@dataclasses.dataclass(frozen=True)
class ConsistencyFunction:
    """f_theta(x, sigma) around a network from the model registry."""

    model: nn.Module
    sigma_min: float
    sigma_data: float
    c_noise_kind: str = "edm"
    boundary: bool = True  # False: the EDM denoiser (diffusion teachers)

    def __call__(self, params: Any, x: jax.Array, sigma: jax.Array, labels: jax.Array | None = None,
                 *, train: bool = False, dropout_rng: jax.Array | None = None) -> jax.Array:
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
        if self.boundary:
            c_skip, c_out, c_in = consistency_scalings(sigma, self.sigma_min, self.sigma_data)
        else:
            c_skip, c_out, c_in = edm_scalings(sigma, self.sigma_data)
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
        out = self.model.apply({"params": params}, _bcast(c_in) * x, c_noise(sigma, self.c_noise_kind),
                               labels, train=train, rngs=rngs)
        return _bcast(c_skip) * x + _bcast(c_out) * out.astype(x.dtype)

    def init(self, rng: jax.Array, image_shape: tuple[int, ...], with_labels: bool) -> Any:
        """Network params for images of `image_shape` (H, W, C)."""
        x = jnp.zeros((1, *image_shape), jnp.float32)
        labels = jnp.zeros((1,), jnp.int32) if with_labels else None
        return self.model.init({"params": rng, "dropout": rng}, x, jnp.zeros((1,)), labels,
                               train=False)["params"]


def _bcast(v: jax.Array) -> jax.Array:
    return v[:, None, None, None]


# ---------------------------------------------------------------------------
# TrigFlow (Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time
# Consistency Models", section 3 and appendix B): x_t = cos(t) x0 + sin(t) z with
# z ~ N(0, sd^2 I), t in [0, pi/2]. The PF-ODE is dx_t/dt = sd F(x_t / sd, t) and
# both the diffusion denoiser and the consistency function are
#     f(x_t, t) = cos(t) x_t - sin(t) sd F(x_t / sd, t),
# which is the identity at t = 0. EDM's (x_sigma, sigma) maps to TrigFlow's
# (x_t, t) by tan(t) = sigma / sd and x_t = cos(t) x_sigma (appendix B.2, eq. 30).

TRIGFLOW_TIME_CONDITIONINGS = ("trigflow", "edm")


def trigflow_time(sigma: jax.Array, sigma_data: float) -> jax.Array:
    """The TrigFlow time of EDM's noise level: t = arctan(sigma / sd)."""
    return jnp.arctan2(sigma, sigma_data)


def edm_sigma(t: jax.Array, sigma_data: float) -> jax.Array:
    """EDM's noise level of a TrigFlow time: sigma = sd tan(t)."""
    return sigma_data * jnp.tan(t)


def trigflow_x(x_sigma: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = cos(t) x_sigma: EDM's x0 + sigma eps as a TrigFlow sample (same x0, same noise)."""
    return _bcast(jnp.cos(t)) * x_sigma


def edm_x(x_t: jax.Array, t: jax.Array) -> jax.Array:
    """x_sigma = x_t / cos(t), the inverse of `trigflow_x` (t < pi/2)."""
    return x_t / _bcast(jnp.cos(t))


def velocity_from_denoised(x_t: jax.Array, t: jax.Array, denoised: jax.Array) -> jax.Array:
    """The PF-ODE velocity dx_t/dt = sd F = (cos(t) x_t - D) / sin(t) of a denoiser's output D (t > 0)."""
    return (_bcast(jnp.cos(t)) * x_t - denoised) / _bcast(jnp.sin(t))


def denoised_from_velocity(x_t: jax.Array, t: jax.Array, velocity: jax.Array) -> jax.Array:
    """D = cos(t) x_t - sin(t) v: the data prediction of a velocity v = sd F, the inverse of the above."""
    return _bcast(jnp.cos(t)) * x_t - _bcast(jnp.sin(t)) * velocity


@dataclasses.dataclass(frozen=True)
class TrigFlowFunction:
    """A network F in the TrigFlow parametrization; also a NetworkFunction in EDM coordinates.

    `raw(params, x_t / sd, t)` is F itself, `velocity` is sd F (the PF-ODE) and
    `consistency(params, x_t, t)` is f = cos(t) x_t - sin(t) sd F. Called as a
    NetworkFunction, `fn(params, x_sigma, sigma)` takes EDM's coordinates like
    every other network function (samplers, teachers and other methods pass
    sigma), converts them, and returns f: TrigFlow's denoiser, whose boundary
    condition f(x, t=0) = x holds exactly.

    time_conditioning:
      'trigflow': the paper's identity time transformation, c_noise = time_scale * t
        (section 4.1; time_scale = 1 is the paper's c_noise(t) = t, tables 4 and 5).
      'edm': the network of an EDM denoiser read as TrigFlow: F(x_t / sd, t) =
        -F_edm(c_in x_sigma, c_noise(sd tan t)). EDM's preconditioning is exactly
        TrigFlow's with the opposite sign of c_out (c_in x_sigma = x_t / sd, c_skip
        x_sigma = cos(t) x_t, c_out = sd sin(t)), so an EDM-trained network (our
        EDM method, converted NVIDIA checkpoints) starts as the same denoiser. Its
        c_noise is ln(sigma)/4 ('edm'), 1000 ln(sigma)/4 ('cm') or sigma ('raw'), as
        `c_noise_kind` says; the paper warns that sin(t) d c_noise/dt = 1/cos(t)
        blows up near t = pi/2 with it (section 4.1).
    """

    model: nn.Module
    sigma_data: float
    time_conditioning: str = "trigflow"
    time_scale: float = 1.0  # 'trigflow': c_noise = time_scale * t
    c_noise_kind: str = "edm"  # 'edm' time conditioning: EDM's c_noise of sigma = sd tan(t)
    sigma_min: float = 0.0  # the NetworkFunction attribute: f is exact at sigma = t = 0

    def __post_init__(self):
        if self.time_conditioning not in TRIGFLOW_TIME_CONDITIONINGS:
            raise ValueError(f"Unknown TrigFlow time conditioning {self.time_conditioning!r}; valid: "
                             f"{', '.join(TRIGFLOW_TIME_CONDITIONINGS)}.")

    def noise_label(self, t: jax.Array) -> jax.Array:
        if self.time_conditioning == "trigflow":
            return self.time_scale * t
        return c_noise(edm_sigma(t, self.sigma_data), self.c_noise_kind)

    def raw(self, params: Any, x_scaled: jax.Array, t: jax.Array, labels: jax.Array | None = None,
            *, train: bool = False, dropout_rng: jax.Array | None = None) -> jax.Array:
        """F(x_t / sd, t) for x_scaled = x_t / sd and per-example t [B] (or a scalar)."""
        t = jnp.broadcast_to(jnp.asarray(t, jnp.promote_types(x_scaled.dtype, jnp.float32)), x_scaled.shape[:1])
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
        out = self.model.apply({"params": params}, x_scaled, self.noise_label(t), labels, train=train,
                               rngs=rngs).astype(x_scaled.dtype)
        return out if self.time_conditioning == "trigflow" else -out

    def velocity(self, params: Any, x_t: jax.Array, t: jax.Array, labels: jax.Array | None = None,
                 **kwargs: Any) -> jax.Array:
        """The PF-ODE dx_t/dt = sd F(x_t / sd, t)."""
        return self.sigma_data * self.raw(params, x_t / self.sigma_data, t, labels, **kwargs)

    def consistency(self, params: Any, x_t: jax.Array, t: jax.Array, labels: jax.Array | None = None,
                    **kwargs: Any) -> jax.Array:
        """f(x_t, t) = cos(t) x_t - sin(t) sd F(x_t / sd, t)."""
        t = jnp.broadcast_to(jnp.asarray(t, x_t.dtype), x_t.shape[:1])
        return denoised_from_velocity(x_t, t, self.velocity(params, x_t, t, labels, **kwargs))

    def __call__(self, params: Any, x: jax.Array, sigma: jax.Array, labels: jax.Array | None = None,
                 *, train: bool = False, dropout_rng: jax.Array | None = None) -> jax.Array:
        """f at EDM's (x_sigma, sigma): the denoised image, as every NetworkFunction returns."""
        sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])
        t = trigflow_time(sigma, self.sigma_data)
        return self.consistency(params, trigflow_x(x, t), t, labels, train=train, dropout_rng=dropout_rng)

    def init(self, rng: jax.Array, image_shape: tuple[int, ...], with_labels: bool) -> Any:
        x = jnp.zeros((1, *image_shape), jnp.float32)
        labels = jnp.zeros((1,), jnp.int32) if with_labels else None
        return self.model.init({"params": rng, "dropout": rng}, x, jnp.zeros((1,)), labels,
                               train=False)["params"]


def trigflow_of(fn: Any) -> TrigFlowFunction:
    """The TrigFlow form of a diffusion network function: itself, or an EDM denoiser read exactly as TrigFlow.

    A consistency-boundary function (iCT/ECT/SCT, sigma_min > 0) has no exact
    TrigFlow form, so it is refused with the reason.
    """
    if isinstance(fn, TrigFlowFunction):
        return fn
    if isinstance(fn, ConsistencyFunction) and not fn.boundary:
        return TrigFlowFunction(fn.model, fn.sigma_data, time_conditioning="edm", c_noise_kind=fn.c_noise_kind)
    raise ValueError(
        f"{type(fn).__name__}{' with the consistency boundary condition' if getattr(fn, 'boundary', False) else ''} "
        f"has no exact TrigFlow form: a TrigFlow teacher or initialisation must be an EDM denoiser (a diffusion run "
        f"of method 'edm', or a converted EDM checkpoint) or a TrigFlow network (methods 'scm_ct'/'scm_cd').")
