"""ECT: easy consistency tuning (Geng et al. 2024, "Consistency Models Made Easy"), SPEC section 4.

Training starts from a diffusion model (config.method.teacher_workdir: a trained EDM run of this framework,
or an EDM checkpoint converted with `python -m consistency_jax.convert`): `init_params` returns its params.
There is no EMA teacher and no frozen teacher: the target is the student itself under stop-gradient.

Each step: t with ln t ~ N(p_mean, p_std^2); r = max(t (1 - n(t) / q^(stage + 1)), 0), n(t) = 1 + k
sigmoid(-b t), stage = floor(step / stage_steps); one z for x_t = x + t z and x_r = x + r z; the student
f(x_t, t) and the target sg f(x_r, r) use the same dropout rng (and the same dropped labels); when r = 0
the target is x itself. Loss: (sqrt(||f(x_t, t) - target||^2 + c^2) - c) * w(t, r), the norm over the
whole image, averaged over the batch; w = 1/(t - r) ('inverse_gap', CIFAR-10, c = 0) or 1/t^2 + 1/sd^2
('edm', ImageNet-64, c = 0.06).

References read (locuslab/ect): main branch training/loss.py (ECMLoss), training/ct_training_loop.py,
training/networks.py (ECMPrecond), ct_train.py, run_ecm.sh, run_ecm_1hour.sh; branch `imgnet` training/loss.py,
training/ct_training_loop.py, training/networks_edm2.py, training/phema.py, ct_train.py (presets),
run_imgnet_ecm.sh. What the code does beyond the paper's text, and what this file does about it:
- Adaptive weighting: c = 0 makes the per-example loss the L2 norm sqrt(D), not D ("adaptive weighting
  p = 0.5 through Huber loss"); the EDM2-based ImageNet recipe uses c = 0.06 and the weight
  1/t^2 + 1/sd^2 ('snrpk'). EDM2's learned per-noise-level weighting (logvar) is commented out in ECT's
  EDM2 network ("doesn't work well with multiple stage tuning"): not used here either.
- Parametrization: the CIFAR network (ECMPrecond) uses the EDM denoiser's c_skip/c_out in training mode
  (so step 0 is exactly the teacher) and the consistency boundary scalings with sigma_min = 0.003 at
  sampling; the EDM2 network keeps the EDM scalings always (no boundary condition: f(x, r) at r = 0 is
  replaced by x in the loss). Config field `boundary` ('sampling', 'none', 'always').
- Dropout: the teacher pass restores the CUDA rng state, so both passes see the same dropout masks; the
  ImageNet presets apply dropout only at resolutions <= 16 (models/edm2.py dropout_res).
- Teacher pass: non-finite teacher outputs are zeroed (nan_to_num) and non-finite gradients zeroed before
  the step. Here a non-finite loss or gradient norm stops the run with the step named (train.py), which
  is this framework's rule; the teacher is never evaluated at r = 0 (a placeholder noise level is used and
  replaced by x), so no NaN arises there.
- EDM2: forced weight normalisation is off in the stop-gradient teacher pass (see models/edm2.py: here it
  is a projection after the optimizer step, so both passes see the same weights by construction).
- EMA: the evaluation EMA starts from the teacher's weights (rate 0.9999 CIFAR-10; 0.9993 in the 1-hour
  script); the ImageNet branch also tracks power-function EMAs with sigma_rel 0.010, 0.050, 0.100
  (config.training.ema_sigma_rels). Learning rate on ImageNet: lr / sqrt(max(step / 2000, 1)).
- Stage: the code advances the stage every `double` ticks (25k iterations in both setups); sampling: 1 step
  from t = 80, 2 steps through mid t = 0.821 (CIFAR-10) / 1.526 (ImageNet-64), re-noising with t z.

Sampling options (SCT's, usable by any consistency model here): classifier-free guidance (`guidance_scale`,
with labels dropped to the null class with probability `label_dropout` in training) and `sampler_eta`
(samplers.edge_skipping_sample).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from consistency_jax import samplers, schedules, teachers
from consistency_jax.methods.base import Method, teacher_config_fields
from consistency_jax.parametrization import ConsistencyFunction, NetworkFunction

WEIGHTINGS = ("inverse_gap", "edm")
BOUNDARIES = ("sampling", "none", "always")


@dataclasses.dataclass(frozen=True)
class TrainSampleFunction:
    """Two parametrizations of one network: `training` when called with train=True, else `sampling`.

    ECT's ECMPrecond: EDM scalings in training (the tuned diffusion model's own), the consistency boundary
    f(x, sigma_min) = x for sampling. Both share the params.
    """

    training: ConsistencyFunction
    sampling: ConsistencyFunction

    @property
    def model(self):
        return self.training.model

    @property
    def sigma_min(self) -> float:
        return self.sampling.sigma_min

    @property
    def sigma_data(self) -> float:
        return self.sampling.sigma_data

    def __call__(self, params: Any, x: jax.Array, sigma: jax.Array, labels: jax.Array | None = None, *,
                 train: bool = False, dropout_rng: jax.Array | None = None) -> jax.Array:
        fn = self.training if train else self.sampling
        return fn(params, x, sigma, labels, train=train, dropout_rng=dropout_rng)

    def init(self, rng: jax.Array, image_shape: tuple[int, ...], with_labels: bool) -> Any:
        return self.training.init(rng, image_shape, with_labels)


def drop_labels(labels: jax.Array | None, rng: jax.Array, probability: float,
                null_label: int) -> tuple[jax.Array | None, jax.Array | None]:
    """(labels with each replaced by the null class with `probability`, which were) for guidance training."""
    if labels is None or probability <= 0:
        return labels, None
    dropped = jax.random.bernoulli(rng, probability, labels.shape)
    return jnp.where(dropped, null_label, labels), dropped


def safe_pseudo_huber(squared: jax.Array, c: float) -> jax.Array:
    """sqrt(D + c^2) - c with a zero gradient at D = 0 when c = 0 (sqrt's derivative is infinite there)."""
    positive = squared > 0
    value = jnp.sqrt(jnp.where(positive, squared, 1.0) + c * c) - c
    return jnp.where(positive, value, 0.0)


def loss_weight(kind: str, t: jax.Array, r: jax.Array, sigma_data: float) -> jax.Array:
    if kind == "inverse_gap":  # 1/(t - r); r -> t only when q^-(stage+1) underflows, where D = 0 too
        return 1.0 / jnp.maximum(t - r, jnp.finfo(jnp.float32).tiny)
    return 1.0 / t**2 + 1.0 / sigma_data**2  # 'edm': (t^2 + sd^2) / (t sd)^2


class ECT(Method):
    name = "ect"
    teacher = "required"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        fields = super().default_config()
        teacher_config_fields(fields)  # the diffusion model to tune (its params initialise the student)
        fields.p_mean = -1.1  # ln t ~ N(p_mean, p_std^2); ImageNet-64: -0.8
        fields.p_std = 2.0  # ImageNet-64: 1.6
        fields.q = 2.0  # the gap t - r shrinks by q every stage; ImageNet-64: 4
        fields.stage_steps = 25_000  # d: iterations per stage
        fields.k = 8.0  # n(t) = 1 + k sigmoid(-b t)
        fields.b = 1.0
        fields.huber_c = 0.0  # c in sqrt(D + c^2) - c; 0: the L2 norm (CIFAR-10); ImageNet-64: 0.06
        fields.weighting = "inverse_gap"  # 'inverse_gap' 1/(t - r) (CIFAR-10), 'edm' 1/t^2 + 1/sd^2 (ImageNet)
        # Where f(x, sigma_min) = x holds: 'sampling' (ECT's DDPM++: EDM scalings in training, boundary at
        # sampling), 'none' (ECT's EDM2: EDM scalings always), 'always' (the CM parametrization).
        fields.boundary = "sampling"
        fields.label_dropout = 0.0  # probability of training on the null class (classifier-free guidance)
        fields.guidance_scale = 1.0  # classifier-free guidance at sampling; 1: off (one network call per step)
        # Multistep sampling: share of fresh noise at each re-noising (samplers.edge_skipping_sample); 1: the
        # usual consistency sampler, 0: deterministic.
        fields.sampler_eta = 1.0
        return fields

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        f = config.method
        checks = [
            (f.p_std > 0, f"config.method.p_std must be > 0, got {f.p_std}."),
            (f.q > 1, f"config.method.q must be > 1 (the gap shrinks by q each stage), got {f.q}."),
            (f.stage_steps >= 1, f"config.method.stage_steps must be >= 1, got {f.stage_steps}."),
            (f.k >= 0, f"config.method.k must be >= 0, got {f.k}."),
            (f.huber_c >= 0, f"config.method.huber_c must be >= 0, got {f.huber_c}."),
            (f.weighting in WEIGHTINGS,
             f"Unknown config.method.weighting {f.weighting!r}; valid: {', '.join(WEIGHTINGS)}."),
            (f.boundary in BOUNDARIES,
             f"Unknown config.method.boundary {f.boundary!r}; valid: {', '.join(BOUNDARIES)}."),
            (0 <= f.label_dropout < 1, f"config.method.label_dropout must be in [0, 1), got {f.label_dropout}."),
            (f.guidance_scale >= 0, f"config.method.guidance_scale must be >= 0, got {f.guidance_scale}."),
            (0 <= f.sampler_eta <= 1, f"config.method.sampler_eta must be in [0, 1], got {f.sampler_eta}."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if config.data.num_classes == 0 and (f.label_dropout > 0 or f.guidance_scale != 1):
            raise ValueError(f"config.method.label_dropout ({f.label_dropout}) and guidance_scale "
                             f"({f.guidance_scale}) are for class-conditional data (config.data.num_classes > 0); "
                             f"set them to 0 and 1.")

    @classmethod
    def make_function(cls, config: ml_collections.ConfigDict, model) -> NetworkFunction:
        param = config.parametrization
        kwargs = dict(sigma_min=param.sigma_min, sigma_data=param.sigma_data, c_noise_kind=param.c_noise)
        with_boundary = ConsistencyFunction(model, boundary=True, **kwargs)
        edm = ConsistencyFunction(model, boundary=False, **kwargs)
        mode = config.method.boundary
        if mode == "always":
            return with_boundary
        if mode == "none":
            return edm
        return TrainSampleFunction(training=edm, sampling=with_boundary)

    def __init__(self, config, fn, image_shape, num_classes, teacher_fn=None):
        super().__init__(config, fn, image_shape, num_classes, teacher_fn)
        if teacher_fn is not None:
            _check_teacher_parametrization(fn, teacher_fn)

    def init_params(self, params: Any, teacher_params: Any | None) -> Any:
        if teacher_params is None:
            return params
        teachers.require_same_shapes(params, teacher_params)
        return teacher_params

    # -- Loss ---------------------------------------------------------------

    def target_input(self, x: jax.Array, z: jax.Array, t: jax.Array, r: jax.Array, labels: jax.Array | None,
                     dropped: jax.Array | None) -> jax.Array:
        """The teacher's input at noise level r: ECT's x + r z (SCT replaces it; `labels` are the true
        classes, `dropped` marks those replaced by the null class)."""
        return x + r[:, None, None, None] * z

    def consistency_pair(self, params: Any, batch: dict, rng: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
        """t, r, the student's f(x_t, t) and the target sg f(x_r, r) (x where r = 0) of one training step."""
        f = self.fields
        x = batch["image"]
        t_rng, noise_rng, dropout_rng, label_rng = jax.random.split(rng, 4)
        labels, dropped = drop_labels(batch.get("label"), label_rng, f.label_dropout, self.num_classes)
        t = jnp.exp(f.p_mean + f.p_std * jax.random.normal(t_rng, (x.shape[0],)))
        stage = schedules.ect_stage(step, f.stage_steps)
        r = schedules.ect_r(t, stage, f.q, f.k, f.b)
        z = jax.random.normal(noise_rng, x.shape, x.dtype)
        student = self.fn(params, x + t[:, None, None, None] * z, t, labels, train=True, dropout_rng=dropout_rng)
        x_r = self.target_input(x, z, t, r, batch.get("label"), dropped)
        positive = r > 0
        # At r = 0 the target is x; the network is not evaluated at sigma = 0 (c_noise = ln 0).
        teacher = self.fn(jax.lax.stop_gradient(params), x_r, jnp.where(positive, r, t), labels, train=True,
                          dropout_rng=dropout_rng)
        target = jax.lax.stop_gradient(jnp.where(positive[:, None, None, None], teacher, x))
        return {"t": t, "r": r, "stage": stage, "student": student, "target": target}

    def loss(self, params, method_state, batch, rng, step):
        return self.loss_of_pair(self.consistency_pair(params, batch, rng, step))

    def loss_of_pair(self, pair: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
        """(sqrt(||f(x_t, t) - target||^2 + c^2) - c) w(t, r), averaged over the batch, and its metrics."""
        student, target, t, r = pair["student"], pair["target"], pair["t"], pair["r"]
        squared = jnp.sum(jnp.square(student - target).reshape(student.shape[0], -1), axis=-1)
        distance = safe_pseudo_huber(squared, self.fields.huber_c)
        loss = jnp.mean(loss_weight(self.fields.weighting, t, r, self.fn.sigma_data) * distance)
        return loss, {"stage": pair["stage"], "distance": jnp.mean(distance),
                      "r_zero_fraction": jnp.mean((r <= 0).astype(jnp.float32))}

    # -- Sampling -----------------------------------------------------------

    def sampling_function(self) -> NetworkFunction:
        scale = self.fields.guidance_scale
        if self.num_classes > 0 and scale != 1:
            return samplers.GuidedFunction(self.fn, scale, null_label=self.num_classes)
        return self.fn

    def sampler(self, num_steps: int) -> samplers.Sampler:
        sigmas = samplers.sampling_sigmas(self.config, num_steps)
        eta, scale = self.fields.sampler_eta, self.fields.guidance_scale
        fn = self.sampling_function()
        guided = isinstance(fn, samplers.GuidedFunction)

        def sample(params, rng, shape, labels):
            return samplers.edge_skipping_sample(fn, params, rng, shape, jnp.asarray(sigmas, jnp.float32), labels,
                                                 eta=eta)

        return samplers.Sampler(key=(self.name, sigmas, eta, scale if guided else 1.0), sample=sample,
                                sigmas=sigmas, network_evaluations=len(sigmas) * (2 if guided else 1))


def _check_teacher_parametrization(fn: NetworkFunction, teacher_fn: NetworkFunction) -> None:
    """The student starts as the teacher only if both feed the network the same c_noise and sigma_data."""
    mine = (getattr(_training(fn), "c_noise_kind", None), fn.sigma_data)
    theirs = (getattr(_training(teacher_fn), "c_noise_kind", None), teacher_fn.sigma_data)
    if None not in (mine[0], theirs[0]) and mine != theirs:
        raise teachers.TeacherError(
            f"The teacher's network was trained with c_noise={theirs[0]!r}, sigma_data={theirs[1]}; this run "
            f"uses c_noise={mine[0]!r}, sigma_data={mine[1]} (config.parametrization): set them to the "
            f"teacher's, or the tuned network starts from a different function than the teacher's.")


def _training(fn: NetworkFunction) -> Any:
    return fn.training if isinstance(fn, TrainSampleFunction) else fn
