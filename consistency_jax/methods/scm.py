"""sCT and sCD: continuous-time consistency models (Lu & Song 2024, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", ICLR 2025), with JAX's forward-mode `jax.jvp`.

TrigFlow (parametrization.TrigFlowFunction): x_t = cos(t) x0 + sin(t) z, z ~ N(0, sd^2 I),
f(x_t, t) = cos(t) x_t - sin(t) sd F(x_t / sd, t). Each step follows the paper's Algorithm 1:

    tau ~ N(p_mean, p_std^2), t = arctan(e^tau / sd), x_t = cos(t) x0 + sin(t) z
    dx_t/dt = cos(t) z - sin(t) x0                          (sCT: the data-based estimate)
            = sd F_teacher(x_t / sd, t)                     (sCD: the frozen teacher's PF-ODE)
    r = min(1, step / H)                                    (tangent warm-up)
    g = -cos^2(t) (sd F- - dx_t/dt) - r cos(t) sin(t) (x_t + sd dF-/dt)   (JVP rearrangement)
    g = g / (||g|| + c)                                     (tangent normalisation)
    L = e^{w(t)} / D ||F_theta(x_t / sd, t) - F-(x_t / sd, t) - g||^2 - w(t)   (adaptive weighting)

F- is F_theta under stop-gradient: every term of g is computed from the stopped
params, so the gradient reaches theta only through the first F_theta and w only
through the weighting network. cos(t) sin(t) sd dF-/dt is ONE `jax.jvp` of F- at
(x_t / sd, t) with the tangent (cos(t) sin(t) dx_t/dt, cos(t) sin(t) sd) (section
5.1, "JVP rearrangement"), with the same dropout rng as the F_theta pass. The JVP's
primal pass repeats F_theta's forward pass with equal inputs, and XLA merges the two
(the compiled quickstart step has the same 178 convolutions as a variant that takes
F_theta from the JVP's primal output), so the step costs a forward pass, a tangent
pass and a backward pass. With
`jvp_dtype='float32'` the JVP pass runs the network in float32 while F_theta runs
in the model's compute dtype (bfloat16): FastGen's precision_amp_jvp.

The weighting w_phi(t) is a linear layer on a positional embedding of the
network's noise label (EDM2's logvar head; FastGen's `logvar_linear`), trained
jointly with theta: one gradient of L with respect to (theta, phi), one global
gradient clipping over both, and the run's optimizer applied to each (its state
for phi lives in method_state beside phi, so both are checkpointed and sharded
with the train state). That is exactly one optimizer over (theta, phi), as the
paper's "(theta, phi) <- (theta, phi) - eta grad L" and FastGen (the head is part
of its network) do. The metrics 'loss' and 'grad_norm' cover both.

Sampling (appendix G.2): from x = sd z at t_max = arctan(sigma_max / sd) (sigma_max =
80 gives t_max = 1.5645), x0 = f(x, t); 2 steps re-noise to x = cos(t) x0 + sin(t) sd z
at t_mid = 1.1 (config.sampling.mid_sigma = sd tan(1.1) = 0.98238) and apply f again
(Song et al. 2023's multistep sampler in TrigFlow coordinates). The report lists the
sigmas sd tan(t) of the times visited.

Sources: the paper (Algorithm 1, sections 4-5, appendices B, D, G; tables 4, 7) and
NVIDIA's PyTorch FastGen (NVlabs/FastGen), read for what the paper leaves open:
fastgen/methods/consistency_model/sCM.py (SCMModel, TrigFlowPrecond),
fastgen/configs/methods/config_scm.py, fastgen/configs/experiments/EDM/config_sct_cifar10.py,
config_scd_cifar10.py, config_scd_in64.py, fastgen/configs/experiments/EDM2/config_scm_xl.py,
fastgen/networks/noise_schedule.py (EDMNoiseSchedule, TrigNoiseSchedule) and
fastgen/networks/EDM/network.py (logvar_linear, the attention JVP). Where FastGen
differs from the paper this file follows the paper, with the FastGen behaviour as an
option where it matters:
  - tangent norm: FastGen divides by the RMS (||g|| / sqrt(D), `g_norm_spatial_invariance`)
    instead of the paper's ||g||: tangent_normalization='rms' (paper: 'l2').
  - FastGen multiplies each example's MSE by 1 / (sd tan t) (`prior_weighting_enabled`) on top
    of the cos(t) that already carries the paper's prior weighting lambda(t) = 1/(sd tan t)
    (appendix D), and divides by D twice (`divide_x_0_spatial_dim`); both only shift what
    w_phi learns by log(sd tan t) and log D: mse_prior_weighting=True reproduces the first.
  - FastGen draws sigma from a lognormal truncated to [0.002, 80] (800 for CIFAR-10 sCT);
    the paper (and this file) does not truncate.
  - FastGen's student forward and its JVP use different dropout masks (two calls, one
    RNG stream); here they share the dropout rng, so F_theta - F- is exactly zero in value.
  - FastGen fine-tunes EDM-parametrized networks through TrigFlowPrecond; the paper trains
    TrigFlow-native networks (c_noise(t) = t, positional embedding, adaptive double
    normalisation). Both are here: time_conditioning='trigflow' (paper) or 'edm'
    (an EDM denoiser read exactly as TrigFlow: F = -F_edm, see TrigFlowFunction).
  - FastGen's ImageNet-64 recipes put their 2-step intermediate point at EDM sigma 1.1;
    the paper's t_mid = 1.1 is TrigFlow time (sigma = 0.982).
"""

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from consistency_jax import samplers, teachers
from consistency_jax.methods import base
from consistency_jax.models.layers import PositionalEmbedding, zeros_init
from consistency_jax.parametrization import (
    TRIGFLOW_TIME_CONDITIONINGS,
    TrigFlowFunction,
    edm_sigma,
    trigflow_of,
    trigflow_time,
)

TANGENT_NORMALIZATIONS = ("l2", "rms", "clip", "none")
JVP_DTYPES = ("", "float32", "bfloat16", "float64")


class AdaptiveWeighting(nn.Module):
    """w_phi(t): a linear layer on a positional embedding of the noise label; starts at w = 0 (weight 1)."""

    features: int = 128

    @nn.compact
    def __call__(self, noise_labels: jax.Array) -> jax.Array:
        emb = PositionalEmbedding(self.features)(noise_labels)
        return nn.Dense(1, kernel_init=zeros_init, name="linear")(emb)[:, 0]


def _bcast(v: jax.Array) -> jax.Array:
    return v[:, None, None, None]


def sample_times(rng: jax.Array, batch_size: int, p_mean: float, p_std: float, sigma_data: float) -> jax.Array:
    """The proposal of Algorithm 1: tau ~ N(p_mean, p_std^2), t = arctan(e^tau / sd) (sd tan t is lognormal)."""
    return trigflow_time(jnp.exp(p_mean + p_std * jax.random.normal(rng, (batch_size,))), sigma_data)


def tangent_warmup(step: jax.Array, warmup_steps: int) -> jax.Array:
    """r = min(1, step / H); H = 0 turns the warm-up off."""
    if warmup_steps <= 0:
        return jnp.ones((), jnp.float32)
    return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)


def rearranged_tangent(f_minus: jax.Array, jvp_out: jax.Array, x_t: jax.Array, dxt_dt: jax.Array, t: jax.Array,
                       sigma_data: float, r: jax.Array | float = 1.0) -> jax.Array:
    """g = cos(t) df-/dt with the warm-up r on its second term (Algorithm 1):

        g = -cos^2(t) (sd F- - dx_t/dt) - r (cos(t) sin(t) x_t + jvp_out),

    where jvp_out = cos(t) sin(t) sd dF-/dt is the rearranged JVP. With r = 1 this
    is cos(t) times df-/dt for f = cos(t) x_t - sin(t) sd F (eq. 6).
    """
    cos, sin = _bcast(jnp.cos(t)), _bcast(jnp.sin(t))
    return -cos**2 * (sigma_data * f_minus - dxt_dt) - r * (cos * sin * x_t + jvp_out)


def normalize_tangent(g: jax.Array, kind: str, c: float) -> tuple[jax.Array, jax.Array]:
    """(the normalised tangent, ||g|| per example): 'l2' g/(||g||+c) (paper), 'rms' g/(||g||/sqrt(D)+c)
    (FastGen), 'clip' clip(g, -1, 1) (the paper's alternative), 'none'."""
    norm = jnp.sqrt(jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=-1))
    if kind == "l2":
        return g / _bcast(norm + c), norm
    if kind == "rms":
        return g / _bcast(norm / math.sqrt(g[0].size) + c), norm
    if kind == "clip":
        return jnp.clip(g, -1.0, 1.0), norm
    if kind == "none":
        return g, norm
    raise ValueError(f"Unknown tangent normalization {kind!r}; valid: {', '.join(TANGENT_NORMALIZATIONS)}.")


class SCM(base.Method):
    """What sCT and sCD share; `distillation` picks the PF-ODE estimate."""

    name: ClassVar[str] = "scm"
    distillation: ClassVar[bool] = False

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        fields = super().default_config()
        # The proposal of t: ln(sd tan t) ~ N(p_mean, p_std^2). Paper: CIFAR-10 (-1.0, 1.4),
        # ImageNet-64 (-1.0, 1.6), ImageNet-512 (-0.8, 1.6); its ECT comparison (-1.0, 1.8).
        fields.p_mean = -1.0
        fields.p_std = 1.4
        fields.tangent_warmup_steps = 10_000  # H: r = min(1, step / H) on the unstable tangent term; 0: off
        # 'l2': g / (||g|| + c) (paper); 'rms': g / (||g|| / sqrt(D) + c) (FastGen);
        # 'clip': clip(g, -1, 1) (the paper's alternative); 'none'.
        fields.tangent_normalization = "l2"
        fields.tangent_norm_c = 0.1  # c (all the paper's runs)
        fields.adaptive_weighting = True  # train w_phi(t) jointly; False: every t weighs 1
        fields.weighting_channels = 128  # positional-embedding features of w_phi
        # FastGen's extra 1 / (sd tan t) on each example's MSE (see the module docstring).
        fields.mse_prior_weighting = False
        # 'trigflow': c_noise(t) = time_scale * t (the paper); 'edm': the network of an EDM
        # denoiser, conditioned on parametrization.c_noise of sigma = sd tan(t) (fine-tuning
        # EDM-parametrized checkpoints, as FastGen does; the paper's teachers are TrigFlow).
        fields.time_conditioning = "trigflow"
        fields.time_scale = 1.0  # the time-conditioning scale: c_noise = time_scale * t (paper: 1)
        # The compute dtype of the JVP pass: '' the model's; 'float32' runs the tangent in float32
        # while F_theta runs in the model's dtype (FastGen's precision_amp_jvp for bf16 training).
        fields.jvp_dtype = ""
        return base.teacher_config_fields(fields)

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        fields = config.method
        if not fields.p_std > 0:
            raise ValueError(f"config.method.p_std must be > 0, got {fields.p_std}.")
        if fields.tangent_warmup_steps < 0:
            raise ValueError(f"config.method.tangent_warmup_steps must be >= 0 (0: no warm-up), got "
                             f"{fields.tangent_warmup_steps}.")
        if fields.tangent_normalization not in TANGENT_NORMALIZATIONS:
            raise ValueError(f"config.method.tangent_normalization={fields.tangent_normalization!r}; valid: "
                             f"{', '.join(TANGENT_NORMALIZATIONS)}.")
        if fields.tangent_normalization in ("l2", "rms") and not fields.tangent_norm_c > 0:
            raise ValueError(f"config.method.tangent_norm_c must be > 0 with tangent_normalization="
                             f"{fields.tangent_normalization!r}, got {fields.tangent_norm_c}.")
        if fields.weighting_channels < 2 or fields.weighting_channels % 2:
            raise ValueError(f"config.method.weighting_channels must be an even number >= 2, got "
                             f"{fields.weighting_channels}.")
        if fields.time_conditioning not in TRIGFLOW_TIME_CONDITIONINGS:
            raise ValueError(f"config.method.time_conditioning={fields.time_conditioning!r}; valid: "
                             f"{', '.join(TRIGFLOW_TIME_CONDITIONINGS)}.")
        if not fields.time_scale > 0:
            raise ValueError(f"config.method.time_scale must be > 0, got {fields.time_scale}.")
        if fields.jvp_dtype not in JVP_DTYPES:
            raise ValueError(f"config.method.jvp_dtype={fields.jvp_dtype!r}; valid: '' (the model's compute "
                             f"dtype), {', '.join(repr(d) for d in JVP_DTYPES[1:])}.")
        if fields.jvp_dtype and "dtype" not in config.model:
            raise ValueError(f"config.method.jvp_dtype={fields.jvp_dtype!r} needs a network with a `dtype` field; "
                             f"{config.model.name!r} has none.")

    @classmethod
    def check_sampler(cls, config: ml_collections.ConfigDict, num_steps: int) -> None:
        sigmas = samplers.sampling_sigmas(config, num_steps)
        if any(s <= 0 for s in sigmas) or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
            raise ValueError(f"The {num_steps}-step sCM sampler needs decreasing positive sigmas (sigma_max, then "
                             f"config.sampling.mid_sigma or config.sampling.sigmas), got {sigmas}.")

    @classmethod
    def make_function(cls, config: ml_collections.ConfigDict, model: nn.Module) -> TrigFlowFunction:
        fields = config.method
        return TrigFlowFunction(model, sigma_data=config.parametrization.sigma_data,
                                time_conditioning=fields.time_conditioning, time_scale=fields.time_scale,
                                c_noise_kind=config.parametrization.c_noise)

    def __init__(self, config, fn, image_shape, num_classes, teacher_fn=None):
        super().__init__(config, fn, image_shape, num_classes, teacher_fn)
        self.weighting = AdaptiveWeighting(self.fields.weighting_channels)
        jvp_dtype = self.fields.jvp_dtype
        self.jvp_fn = fn if not jvp_dtype else dataclasses.replace(fn, model=fn.model.clone(dtype=jvp_dtype))
        self.teacher_trigflow = None
        if teacher_fn is not None:
            try:
                self.teacher_trigflow = trigflow_of(teacher_fn)
            except ValueError as e:
                raise teachers.TeacherError(f"config.method.teacher_workdir: {e}") from e
            if self.starts_from_teacher:
                _require_same_time_conditioning(fn, self.teacher_trigflow)

    @property
    def starts_from_teacher(self) -> bool:
        """The paper initialises the CM from the teacher's (EMA) params whenever it has one."""
        return self.teacher_trigflow is not None

    # -- State --------------------------------------------------------------

    def init_params(self, params: Any, teacher_params: Any | None) -> Any:
        if teacher_params is None or not self.starts_from_teacher:
            return params
        teachers.require_same_shapes(params, teacher_params)
        return teacher_params

    def init_state(self, params: Any, teacher_params: Any | None) -> Any:
        state = {}
        if self.fields.adaptive_weighting:
            weighting = self.weighting.init(jax.random.PRNGKey(0), jnp.zeros((1,)))["params"]
            state["weighting"] = weighting
            state["weighting_opt_state"] = self._optimizer().init(weighting)
        if self.distillation:
            state["teacher"] = teacher_params
        return state

    def _optimizer(self) -> optax.GradientTransformation:
        # The run's optimizer, for w_phi's state (imported here: experiment imports the methods).
        from consistency_jax.experiment import create_optimizer

        return create_optimizer(self.config.optimizer, self.config.training.num_steps)

    # -- Training -----------------------------------------------------------

    def ode_velocity(self, method_state: Any, x0: jax.Array, z: jax.Array, x_t: jax.Array, t: jax.Array,
                     labels: jax.Array | None) -> jax.Array:
        """dx_t/dt: cos(t) z - sin(t) x0 (sCT), the teacher's sd F(x_t / sd, t) in sCD."""
        return _bcast(jnp.cos(t)) * z - _bcast(jnp.sin(t)) * x0

    def loss(self, params, method_state, batch, rng, step):
        x0, labels = batch["image"], batch.get("label")
        t_rng, z_rng, dropout_rng = jax.random.split(rng, 3)
        t = sample_times(t_rng, x0.shape[0], self.fields.p_mean, self.fields.p_std, self.fn.sigma_data)
        z = self.fn.sigma_data * jax.random.normal(z_rng, x0.shape, x0.dtype)
        r = tangent_warmup(step, self.fields.tangent_warmup_steps)
        return self.objective(params, method_state, x0, z, t, labels, dropout_rng, r)

    def objective(self, params: Any, method_state: Any, x0: jax.Array, z: jax.Array, t: jax.Array,
                  labels: jax.Array | None, dropout_rng: jax.Array | None,
                  r: jax.Array | float) -> tuple[jax.Array, dict]:
        """L(theta, phi) of Algorithm 1 for given x0, noise z ~ N(0, sd^2 I), times t [B] and warm-up r."""
        fields, fn = self.fields, self.fn
        sd = fn.sigma_data
        x_t = _bcast(jnp.cos(t)) * x0 + _bcast(jnp.sin(t)) * z
        dxt_dt = jax.lax.stop_gradient(self.ode_velocity(method_state, x0, z, x_t, t, labels))

        f_theta = fn.raw(params, x_t / sd, t, labels, train=True, dropout_rng=dropout_rng)
        f_minus = jax.lax.stop_gradient(f_theta)
        jvp_out = self.tangent_jvp(params, x_t, t, dxt_dt, labels, dropout_rng)
        g = rearranged_tangent(f_minus, jvp_out, x_t, dxt_dt, t, sd, r)
        g, g_norm = normalize_tangent(g, fields.tangent_normalization, fields.tangent_norm_c)
        g = jax.lax.stop_gradient(g)

        mse = jnp.mean(jnp.square(f_theta - f_minus - g).reshape(x0.shape[0], -1), axis=-1)  # ||.||^2 / D
        if fields.mse_prior_weighting:
            mse = mse / edm_sigma(t, sd)
        metrics = {"mse": jnp.mean(mse), "tangent_norm": jnp.mean(g_norm), "tangent_warmup": jnp.asarray(r)}
        if fields.adaptive_weighting:
            w = self.weighting.apply({"params": method_state["weighting"]}, fn.noise_label(t))
            per_example = jnp.exp(w) * mse - w
            metrics["weighting"] = jnp.mean(w)
        else:
            per_example = mse
        return jnp.mean(per_example), metrics

    def tangent_jvp(self, params: Any, x_t: jax.Array, t: jax.Array, dxt_dt: jax.Array,
                    labels: jax.Array | None, dropout_rng: jax.Array | None) -> jax.Array:
        """cos(t) sin(t) sd dF-/dt: one jax.jvp of F- at (x_t / sd, t) along (cos sin dx_t/dt, cos sin sd)."""
        sd, frozen = self.fn.sigma_data, jax.lax.stop_gradient(params)
        dtype = jnp.dtype(self.fields.jvp_dtype) if self.fields.jvp_dtype else x_t.dtype

        def f_minus(x_scaled, time):
            return self.jvp_fn.raw(frozen, x_scaled, time, labels, train=True, dropout_rng=dropout_rng)

        cs = jnp.cos(t) * jnp.sin(t)
        primals = ((x_t / sd).astype(dtype), t.astype(dtype))
        tangents = ((_bcast(cs) * dxt_dt).astype(dtype), (cs * sd).astype(dtype))
        _, out = jax.jvp(f_minus, primals, tangents)
        return jax.lax.stop_gradient(out.astype(x_t.dtype))

    def update(self, state: Any, batch: dict, rng: jax.Array,
               optimizer: optax.GradientTransformation) -> tuple[Any, dict]:
        """One step on (theta, phi) together: one gradient, one global clipping, the run's optimizer on each."""
        if not self.fields.adaptive_weighting:
            return super().update(state, batch, rng, optimizer)
        method_state = state.method_state

        def objective(params, weighting):
            return self.loss(params, {**method_state, "weighting": weighting}, batch, rng, state.step)

        (loss, metrics), (grads, weighting_grads) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
            state.params, method_state["weighting"])
        grad_norm = optax.global_norm((grads, weighting_grads))
        clip = self.config.optimizer.grad_clip_norm
        if clip > 0:
            # The optimizer's own clip_by_global_norm sees each part alone; clipping here by the joint norm
            # makes the pair behave as one optimizer over (theta, phi) (its clipping is then a no-op).
            scale = jnp.where(grad_norm < clip, 1.0, clip / grad_norm)
            grads, weighting_grads = jax.tree.map(lambda g: g * scale, (grads, weighting_grads))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        weighting_updates, weighting_opt_state = optimizer.update(
            weighting_grads, method_state["weighting_opt_state"], method_state["weighting"])
        new_method_state = {**method_state, "weighting": optax.apply_updates(method_state["weighting"],
                                                                              weighting_updates),
                            "weighting_opt_state": weighting_opt_state}
        new_method_state = self.after_update(new_method_state, params, state.step)
        new_state = state.replace(params=params, opt_state=opt_state, method_state=new_method_state)
        return new_state, {**metrics, "loss": loss, "grad_norm": grad_norm}

    # -- Sampling -----------------------------------------------------------

    def sampler(self, num_steps: int) -> samplers.Sampler:
        sd = self.fn.sigma_data
        sigmas = samplers.sampling_sigmas(self.config, num_steps)
        times = tuple(math.atan2(s, sd) for s in sigmas)

        def sample(params, rng, shape, labels):
            return trigflow_consistency_sample(self.fn, params, rng, shape, times, labels)

        return samplers.Sampler(key=("trigflow_consistency", times, sd), sample=sample, sigmas=sigmas,
                                network_evaluations=num_steps)


def trigflow_consistency_sample(fn: TrigFlowFunction, params: Any, rng: jax.Array, shape: tuple[int, ...],
                                times: tuple[float, ...], labels: jax.Array | None = None) -> jax.Array:
    """x0 = f(sd z, t_0); then x0 = f(cos(t) x0 + sin(t) sd z, t) for each later t (decreasing times)."""
    sd = fn.sigma_data
    keys = jax.random.split(rng, len(times))
    x0 = fn.consistency(params, sd * jax.random.normal(keys[0], shape), times[0], labels)
    for t, key in zip(times[1:], keys[1:]):
        x_t = math.cos(t) * x0 + math.sin(t) * sd * jax.random.normal(key, shape)
        x0 = fn.consistency(params, x_t, t, labels)
    return x0


def _require_same_time_conditioning(student: TrigFlowFunction, teacher: TrigFlowFunction) -> None:
    """A student that starts from the teacher's params must read them with the teacher's time conditioning."""
    mine = (student.time_conditioning, student.time_scale if student.time_conditioning == "trigflow"
            else student.c_noise_kind)
    theirs = (teacher.time_conditioning, teacher.time_scale if teacher.time_conditioning == "trigflow"
              else teacher.c_noise_kind)
    if mine != theirs:
        fix = ("config.method.time_conditioning='edm' and config.parametrization.c_noise="
               f"{teacher.c_noise_kind!r}" if teacher.time_conditioning == "edm" else
               f"config.method.time_conditioning='trigflow' and config.method.time_scale={teacher.time_scale}")
        raise teachers.TeacherError(
            f"The student starts from the teacher's params, so it must condition on time as the teacher does: the "
            f"teacher is {theirs[0]!r} ({theirs[1]!r}), this run {mine[0]!r} ({mine[1]!r}). Set {fix}.")


class SCMCT(SCM):
    """sCT: consistency training; an optional teacher_workdir is only the initialisation (theta <- theta_pretrain)."""

    name = "scm_ct"
    teacher = "optional"
    distillation = False


class SCMCD(SCM):
    """sCD: consistency distillation from a frozen diffusion teacher (kept in method_state)."""

    name = "scm_cd"
    teacher = "required"
    distillation = True

    def ode_velocity(self, method_state, x0, z, x_t, t, labels):
        return self.teacher_trigflow.velocity(method_state["teacher"], x_t, t, labels).astype(x_t.dtype)
