"""Multistep consistency models (Heek, Hoogeboom & Salimans 2024, "Multistep Consistency Models"), SPEC section 5.

Diffusion time t in [0, 1] (the VP cosine schedule of consistency_jax/vp.py, truncated to
[parametrization.sigma_min, parametrization.sigma_max]) is split into S = `segments` equal segments. In
segment [t_step, t_step + 1/S] the model learns to jump, along the teacher's ODE, from z_t to the start
z_{t_step}; it is parametrised to predict the x for which DDIM_{t->t_step}(x, z_t) lands there. Sampling
(the paper's Algorithm 2) is S DDIM steps between segment boundaries: S = 1 is a consistency model,
S = T (one teacher step per segment) is a diffusion model.

Training step (the paper's Algorithm 1), per example:
    T(i) = exp(ln T0 + clip(i / K, 0, 1) (ln T1 - ln T0))    teacher steps at iteration i (64 -> 1280 over K = 100k)
    N = max(round(T(i) / S), 1) steps per segment, T = S N   (so that the segments hold whole steps)
    step ~ U{0..S-1}, n ~ U{1..N},  t_step = step / S,  t = t_step + n / T,  s = t - 1/T
    z_t = alpha_t x + std_t eps
    x_teacher = x (CT) or teacher(z_t, t) (CD),  x_var = xvar_frac ||x_teacher - x||^2 / d
    z_s = aDDIM_{t->s}(x_teacher, z_t, x_var)                 (CT: x_var = 0, plain DDIM)
    x_ref = sg f(z_s, s),  z_ref = DDIM_{s->t_step}(x_ref, z_s)   (z_ref = z_s when s = t_step, i.e. n = 1)
    L = (SNR(t) + 1) * pseudo_huber(f(z_t, t) - invDDIM_{t->t_step}(z_ref, z_t))
The reference pass uses the student's own params under stop-gradient (no EMA target: Algorithm 1 calls
the same f) and the same dropout rng as the student pass (the paper's "synchronized dropout").
At n = 1 the target is invDDIM_{t->s}(z_s, z_t): x itself for CT, so a segment's last step is a
diffusion loss and the objective cannot collapse; with one step per segment (S = T) every term is one,
and multistep CT is x-prediction diffusion training with weight SNR + 1 (the paper's eq. 9).

Network: the framework's networks take (x_sigma, sigma); a VP model is called at (z_t / alpha_t,
sigma_t = std_t / alpha_t) (vp.py). The parametrization is the EDM denoiser (no consistency boundary:
the paper's model is a diffusion-style x-predictor, "such as a v-prediction one"; with
parametrization.sigma_data = 1 the EDM denoiser is exactly v-prediction), so a multistep model, its
EDM teacher and its initialisation share one network and one checkpoint format.

Two registered methods: `multistep_ct` (consistency training; a teacher_workdir is optional and only
initialises the params, as the paper starts every run from a pretrained diffusion model) and
`multistep_cd` (consistency distillation: the frozen teacher, an EDM denoiser from teacher_workdir, is
kept in the method state and takes the aDDIM step).

From the paper (arXiv 2403.06807v3, Algorithm 1, section 3.2 and appendix A.1; no code was published):
T0 = 64, T1 = 1280 over 100k iterations, xvar_frac (eta) = 0.75, pseudo-Huber "epsilon" 1e-4,
weight SNR(t) + 1, batch 2048, 200k iterations. Unconfirmed, and therefore config fields:
- distance_norm: the paper's ||x_diff|| under a pseudo-Huber loss with "huber epsilon" 1e-4 (ImageNet)
  and 1 (text-to-image, "essentially a scalar-scaled l2 squared loss for the normalized [-1, 1]
  domain"); that remark only holds for a per-dimension-normalised norm, so the default is
  sqrt(mean(d^2) + eps^2) - eps ('rms'); 'sum' is iCT's whole-image norm.
- the schedule's truncation (here sigma_min/sigma_max of config.parametrization; Google's simple
  diffusion code clips the log-SNR to [-15, 15]) and logsnr_shift (the paper's ImageNet-64 schedule is
  an "interpolated cosine schedule from noise resolution 32 to 64", which it calls practically identical
  to the plain cosine schedule; an interpolated shift is not implemented).
- T = S round(T(i) / S) when T(i) is not a multiple of S (Algorithm 1 leaves it open).
"""

import math

import jax
import jax.numpy as jnp
import ml_collections

from consistency_jax import config_rules as rules
from consistency_jax import samplers, teachers, vp
from consistency_jax.methods import base, distances, edm
from consistency_jax.methods.base import Method
from consistency_jax.parametrization import NetworkFunction

DISTANCE_NORMS = ("rms", "sum")
# 'snr_plus_one': (SNR(t) + 1) = 1 / std_t^2, the paper's; 'sqrt_snr_plus_one': 1 / std_t, which makes
# the x-space norm the norm of the v-space difference (v = alpha eps - std x).
WEIGHTINGS = ("snr_plus_one", "sqrt_snr_plus_one")


# ----------------------------------------------------------------------------
# The teacher-step annealing and the time draw.
# ----------------------------------------------------------------------------


def teacher_steps(step: jax.Array, start: int, end: int, anneal_steps: int) -> jax.Array:
    """T(i) = exp(ln start + clip(i / anneal_steps, 0, 1) (ln end - ln start)); anneal_steps = 0: `end` throughout."""
    frac = 1.0 if anneal_steps <= 0 else jnp.clip(jnp.asarray(step, jnp.float32) / anneal_steps, 0.0, 1.0)
    return jnp.exp(math.log(start) + frac * (math.log(end) - math.log(start)))


def steps_per_segment(step: jax.Array, segments: int, start: int, end: int, anneal_steps: int) -> jax.Array:
    """round(T(i) / S), at least 1: the teacher steps inside one segment (int32)."""
    per_segment = jnp.round(teacher_steps(step, start, end, anneal_steps) / segments)
    return jnp.maximum(per_segment, 1).astype(jnp.int32)


def draw_times(rng: jax.Array, batch_size: int, segments: int, per_segment: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(t_step, t, s, n) per example: segment ~ U{0..S-1}, n ~ U{1..N}, t = t_step + n / T, s = t - 1 / T."""
    segment_rng, n_rng = jax.random.split(rng)
    segment = jax.random.randint(segment_rng, (batch_size,), 0, segments)
    n = jax.random.randint(n_rng, (batch_size,), 1, per_segment + 1)
    total = (per_segment * segments).astype(jnp.float32)
    t_step = segment.astype(jnp.float32) / segments
    # s from n - 1 rather than t - 1/T, so that s = t_step exactly when n = 1.
    t, s = t_step + n.astype(jnp.float32) / total, t_step + (n - 1).astype(jnp.float32) / total
    return t_step, t, s, n


# ----------------------------------------------------------------------------
# The loss.
# ----------------------------------------------------------------------------


def distance(a: jax.Array, b: jax.Array, eps: float, norm: str) -> jax.Array:
    """Pseudo-Huber sqrt(||a - b||^2 + eps^2) - eps per example; 'rms': the norm divided by sqrt(d)."""
    if norm == "sum":
        return distances.pseudo_huber(a, b, eps)
    # sqrt(sum + (eps sqrt d)^2) - eps sqrt d = sqrt(d) (sqrt(mean + eps^2) - eps).
    root_d = math.sqrt(math.prod(a.shape[1:]))
    return distances.pseudo_huber(a, b, eps * root_d) / root_d


def loss_weight(level: vp.Level, weighting: str) -> jax.Array:
    """SNR(t) + 1 = 1 / std_t^2 ('snr_plus_one'), or its square root."""
    return 1.0 / jnp.square(level.std) if weighting == "snr_plus_one" else 1.0 / level.std


def multistep_loss(params, teacher_params, batch: dict, rng: jax.Array, step: jax.Array, *, fn: NetworkFunction,
                   teacher_fn: NetworkFunction | None, schedule: vp.CosineSchedule, segments: int,
                   teacher_steps_start: int, teacher_steps_end: int, anneal_steps: int, xvar_frac: float,
                   huber_eps: float, distance_norm: str, weighting: str) -> tuple[jax.Array, dict]:
    """Mean over the batch of the multistep consistency loss (module docstring); CD when teacher_fn is given."""
    x, labels = batch["image"], batch.get("label")
    time_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
    per_segment = steps_per_segment(step, segments, teacher_steps_start, teacher_steps_end, anneal_steps)
    t_step, t, s, n = draw_times(time_rng, x.shape[0], segments, per_segment)
    sigma_step, sigma_t, sigma_s = schedule.sigma(t_step), schedule.sigma(t), schedule.sigma(s)
    level_step, level_t, level_s = (vp.Level.of_sigma(v) for v in (sigma_step, sigma_t, sigma_s))

    def f(p, z, level, sigma):
        # The network is sigma-space: it takes x_sigma = z / alpha at sigma = std / alpha.
        return fn(p, vp.to_sigma_space(z, level), sigma, labels, train=True, dropout_rng=dropout_rng)

    eps = jax.random.normal(noise_rng, x.shape, x.dtype)
    z_t = level_t.alpha[:, None, None, None] * x + level_t.std[:, None, None, None] * eps
    metrics = {}
    if teacher_fn is None:
        x_teacher, x_var = x, jnp.zeros(x.shape[0])
    else:
        x_teacher = teacher_fn(teacher_params, vp.to_sigma_space(z_t, level_t), sigma_t, labels)
        x_var = xvar_frac * jnp.mean(jnp.square(x_teacher - x).reshape(x.shape[0], -1), axis=-1)
        metrics["x_var"] = jnp.mean(x_var)
    z_s = vp.addim(x_teacher, z_t, level_t, level_s, x_var)
    x_ref = jax.lax.stop_gradient(f(jax.lax.stop_gradient(params), z_s, level_s, sigma_s))
    # At s = t_step the reference is z_s itself (DDIM_{s->s} is the identity; no network output enters).
    z_ref = jnp.where((n == 1)[:, None, None, None], z_s, vp.ddim(x_ref, z_s, level_s, level_step))
    target = vp.inv_ddim(z_ref, z_t, level_t, level_step)
    x_hat = f(params, z_t, level_t, sigma_t)
    dist = distance(x_hat, jax.lax.stop_gradient(target), huber_eps, distance_norm)
    loss = jnp.mean(loss_weight(level_t, weighting) * dist)
    metrics.update(distance=jnp.mean(dist), teacher_steps=(per_segment * segments).astype(jnp.float32))
    return loss, metrics


# ----------------------------------------------------------------------------
# The methods.
# ----------------------------------------------------------------------------


class MultistepConsistency(Method):
    """Shared by multistep CT and CD; not registered itself."""

    distills = False

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        fields = super().default_config()
        fields.segments = 8  # S: student steps (segments of [0, 1]); sample with eval.steps = S
        fields.teacher_steps_start = 64  # T(i) anneals exponentially from this ...
        fields.teacher_steps_end = 1280  # ... to this ...
        fields.anneal_steps = 100_000  # ... over this many iterations (the paper's 100k); 0: `end` throughout
        fields.huber_eps = 1e-4  # pseudo-Huber epsilon (the paper's "huber epsilon")
        fields.distance_norm = "rms"  # 'rms' (per-dimension norm) or 'sum' (whole image); unconfirmed
        fields.weighting = "snr_plus_one"  # 'snr_plus_one' (paper) or 'sqrt_snr_plus_one'
        fields.logsnr_shift = 0.0  # shifted cosine schedule, 2 ln(noise_res / image_res); unconfirmed
        base.teacher_config_fields(fields)
        # Start from the teacher's params (the paper starts every run from a pretrained diffusion model).
        fields.init_from_teacher = True
        return fields

    @classmethod
    def config_rules(cls) -> dict[str, rules.Rule]:
        return {**super().config_rules(),
                "segments": rules.Int(ge=1),
                "teacher_steps_start": rules.Int(ge=1),
                "teacher_steps_end": rules.Int(ge=1),
                "anneal_steps": rules.Int(ge=0, why="0: teacher_steps_end throughout"),
                "huber_eps": rules.Float(gt=0),
                "distance_norm": rules.Choice(DISTANCE_NORMS),
                "weighting": rules.Choice(WEIGHTINGS),
                "logsnr_shift": rules.Float(),
                "init_from_teacher": rules.Flag()}

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        fields, param = config.method, config.parametrization
        _require(isinstance(fields.segments, int) and fields.segments >= 1,
                 f"config.method.segments must be an integer >= 1, got {fields.segments!r}.")
        _require(1 <= fields.teacher_steps_start <= fields.teacher_steps_end,
                 f"config.method.teacher_steps_start ({fields.teacher_steps_start}) and teacher_steps_end "
                 f"({fields.teacher_steps_end}) must satisfy 1 <= start <= end.")
        _require(fields.anneal_steps >= 0, f"config.method.anneal_steps must be >= 0, got {fields.anneal_steps}.")
        _require(fields.huber_eps > 0, f"config.method.huber_eps must be > 0, got {fields.huber_eps}.")
        _require(fields.distance_norm in DISTANCE_NORMS, f"Unknown config.method.distance_norm "
                 f"{fields.distance_norm!r}; valid: {', '.join(DISTANCE_NORMS)}.")
        _require(fields.weighting in WEIGHTINGS,
                 f"Unknown config.method.weighting {fields.weighting!r}; valid: {', '.join(WEIGHTINGS)}.")
        _require(0 < param.sigma_min < param.sigma_max,
                 f"The cosine schedule runs from config.parametrization.sigma_min to sigma_max; they must "
                 f"satisfy 0 < sigma_min < sigma_max, got {param.sigma_min} and {param.sigma_max}.")

    @classmethod
    def check_sampler(cls, config: ml_collections.ConfigDict, num_steps: int) -> None:
        _require(num_steps >= 1, f"Multistep consistency sampling needs at least 1 step, got {num_steps}.")

    @classmethod
    def make_function(cls, config, model):
        return edm.EDM.make_function(config, model)  # the EDM denoiser: shared with the teachers

    @property
    def schedule(self) -> vp.CosineSchedule:
        param = self.config.parametrization
        return vp.CosineSchedule(param.sigma_min, param.sigma_max, self.fields.logsnr_shift)

    def init_params(self, params, teacher_params):
        if teacher_params is None or not self.fields.init_from_teacher:
            return params
        teachers.require_same_shapes(params, teacher_params)
        return teacher_params

    def loss(self, params, method_state, batch, rng, step):
        fields = self.fields
        return multistep_loss(
            params, method_state.get("teacher"), batch, rng, step, fn=self.fn,
            teacher_fn=self.teacher_fn if self.distills else None, schedule=self.schedule,
            segments=fields.segments, teacher_steps_start=fields.teacher_steps_start,
            teacher_steps_end=fields.teacher_steps_end, anneal_steps=fields.anneal_steps,
            xvar_frac=fields.get("xvar_frac", 0.0), huber_eps=fields.huber_eps,
            distance_norm=fields.distance_norm, weighting=fields.weighting)

    def sampler(self, num_steps: int) -> samplers.Sampler:
        """DDIM between the boundaries of `num_steps` equal segments: t = 1, 1 - 1/n, ..., 1/n, then sigma 0.

        num_steps = segments is the paper's sampler (Algorithm 2). Another count runs the same DDIM on a
        coarser or finer grid with the S-segment model, which was trained to jump to its own boundaries
        only: a model per step count is what the paper evaluates (quality then degrades gracefully, see
        configs/quickstart_multistep.py).
        """
        times = [k / num_steps for k in range(num_steps, 0, -1)]
        sigmas = (*self.schedule.sigma_values(times), 0.0)

        def sample(params, rng, shape, labels):
            return vp.ddim_sample(self.fn, params, rng, shape, sigmas, labels)

        return samplers.Sampler(key=("multistep_ddim", sigmas), sample=sample, sigmas=sigmas,
                                network_evaluations=num_steps)


class MultistepCT(MultistepConsistency):
    name = "multistep_ct"
    # A teacher_workdir only initialises the params (init_from_teacher).
    teacher = "optional"

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        super().check_config(config)
        fields = config.method
        _require(fields.init_from_teacher or not fields.teacher_workdir,
                 f"config.method.teacher_workdir={fields.teacher_workdir!r} with init_from_teacher=False: "
                 f"multistep CT uses a teacher only as its initialisation; drop one of the two.")


class MultistepCD(MultistepConsistency):
    name = "multistep_cd"
    teacher = "required"
    distills = True

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        fields = super().default_config()
        # aDDIM teacher step: x_var = xvar_frac ||x_teacher - x||^2 / d (the paper's eta); 0: plain DDIM.
        fields.xvar_frac = 0.75
        return fields

    @classmethod
    def config_rules(cls) -> dict[str, rules.Rule]:
        return {**super().config_rules(), "xvar_frac": rules.Float(ge=0)}

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        super().check_config(config)
        _require(config.method.xvar_frac >= 0, f"config.method.xvar_frac must be >= 0, got {config.method.xvar_frac}.")

    def init_state(self, params, teacher_params):
        return {"teacher": teacher_params}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
