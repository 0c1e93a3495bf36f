"""Original consistency training (CT) and consistency distillation (CD), Song et al. 2023 (SPEC section 2).

Both draw an interval (sigma_i, sigma_{i+1}) of the N-point Karras grid with i
uniform on 1..N-1, show the student x_{i+1} = x + sigma_{i+1} z and pull its
output towards a target network's output at sigma_i:

    loss = mean over the batch of lambda * d(f_theta(x_{i+1}, sigma_{i+1}), sg f_target(x_i, sigma_i))

  CT: x_i = x + sigma_i z with the same z (the data's own estimate of the ODE
      step); N(k) grows with the step k on the sqrt curriculum
      N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1, and the target is
      an EMA of the student with the rate mu(k) = exp(s0 ln(mu0) / N(k)).
  CD: x_i is one Heun step (or Euler step) of the frozen diffusion teacher's
      probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma from sigma_{i+1}
      to sigma_i; N is fixed and the target is an EMA of the student with a
      fixed rate mu (0 on CIFAR-10: the student itself under stop-gradient).
      The student starts from the teacher's params (CM code: scripts/cm_train.py
      copies the teacher into the model; CM-JAX finetune=True copies params and
      EMA), and the teacher lives in the method state, so that a resumed run
      never reads the teacher's workdir again.

Student and target see the same dropout rng; both run in training mode (the CM
code restores the rng state before the target pass). The teacher runs without
dropout. Reference code read: openai/consistency_models cm/karras_diffusion.py
(consistency_losses), cm/script_util.py (create_ema_and_scales_fn),
scripts/cm_train.py; openai/consistency_models_cifar10 jcm/losses.py
(get_consistency_loss_fn, get_ema_scales_fn, get_step_fn) and
configs/cifar10_ve_cd.py, cifar10_ve_ct_adaptive.py, launch.sh.

Distances: 'l2' is the CM code's, the squared difference averaged over the
image's elements (mean_flat); 'pseudo_huber' is iCT's sqrt(||a - b||^2 + c^2) - c
over the whole image. LPIPS, the distance of the papers' best numbers, needs
VGG weights that cannot be fetched here: it is not implemented.
"""

import abc

import jax
import jax.numpy as jnp
import ml_collections

from consistency_jax import config_rules as rules
from consistency_jax import samplers, schedules, teachers
from consistency_jax.methods import distances
from consistency_jax.methods.base import Method, teacher_config_fields

DISTANCES = ("l2", "pseudo_huber")
WEIGHTINGS = ("uniform", "inverse_gap")
SOLVERS = ("heun", "euler")
MU_DENOMINATORS = ("intervals", "scales")


def sample_intervals(rng: jax.Array, batch_size: int, num_scales: jax.Array, sigma_min: float, sigma_max: float,
                     rho: float) -> tuple[jax.Array, jax.Array]:
    """(sigma_i, sigma_{i+1}) per example, i uniform over the N - 1 intervals of the N-point Karras grid."""
    index = jax.random.randint(rng, (batch_size,), 0, num_scales - 1)
    lo = schedules.karras_sigma(index, num_scales, sigma_min, sigma_max, rho)
    hi = schedules.karras_sigma(index + 1, num_scales, sigma_min, sigma_max, rho)
    return lo, hi


def target_ema_rate(num_scales: jax.Array, s0: int, mu0: float, denominator: str = "intervals") -> jax.Array:
    """mu(k) = exp(s0 ln(mu0) / M) with M = N(k) - 1 ('intervals': the CM and ACT code) or N(k) ('scales')."""
    return schedules.ct_target_ema_decay(num_scales - 1 if denominator == "intervals" else num_scales, s0, mu0)


def per_example_distance(kind: str, a: jax.Array, b: jax.Array, huber_c: float) -> jax.Array:
    if kind == "l2":
        return distances.squared_l2(a, b) / (a[0].size)
    return distances.pseudo_huber(a, b, huber_c)


def loss_weight(kind: str, sigma_lo: jax.Array, sigma_hi: jax.Array) -> jax.Array:
    """'uniform': 1 (the CM code's CIFAR-10/ImageNet setting); 'inverse_gap': iCT's 1 / (sigma_{i+1} - sigma_i)."""
    if kind == "inverse_gap":
        return schedules.ict_loss_weight(sigma_lo, sigma_hi)
    return jnp.ones_like(sigma_lo)


class _ConsistencyMethod(Method, abc.ABC):
    """What CT and CD share: the interval draw, the student/target distance, the EMA target."""

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        fields = super().default_config()
        # d(student, target): 'l2' (CM code: mean squared difference over the image) or
        # 'pseudo_huber' (iCT: sqrt(||a-b||^2 + c^2) - c over the whole image). LPIPS: not available.
        fields.distance = "l2"
        fields.huber_c = -1.0  # pseudo-Huber c; -1: 0.00054 * sqrt(H * W * C)
        # lambda(sigma_i): 'uniform' (CM code) or 'inverse_gap' (iCT's 1 / (sigma_{i+1} - sigma_i)).
        fields.weighting = "uniform"
        return fields

    @classmethod
    def config_rules(cls) -> dict[str, rules.Rule]:
        return {**super().config_rules(),
                "distance": rules.Choice(DISTANCES, why="LPIPS needs VGG weights that cannot be fetched here"),
                "huber_c": rules.Float(gt=0, special={-1.0: "0.00054 * sqrt(H * W * C)"}),
                "weighting": rules.Choice(WEIGHTINGS)}

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        fields = config.method
        if fields.distance == "lpips":
            raise ValueError("config.method.distance='lpips' is not available: LPIPS needs VGG weights that cannot "
                             f"be fetched here. Valid: {', '.join(DISTANCES)}.")
        if fields.distance not in DISTANCES:
            raise ValueError(f"Unknown config.method.distance {fields.distance!r}; valid: {', '.join(DISTANCES)}.")
        if fields.weighting not in WEIGHTINGS:
            raise ValueError(f"Unknown config.method.weighting {fields.weighting!r}; valid: "
                             f"{', '.join(WEIGHTINGS)}.")
        if not (fields.huber_c == -1 or fields.huber_c > 0):
            raise ValueError(f"config.method.huber_c must be > 0 (or -1 for 0.00054 sqrt(d)), got {fields.huber_c}.")

    # -- Hooks of the subclasses ----------------------------------------------

    @abc.abstractmethod
    def num_scales(self, step: jax.Array) -> jax.Array:
        """N(k): the discretisation intervals at `step`."""

    @abc.abstractmethod
    def target_decay(self, step: jax.Array) -> jax.Array:
        """mu: the target's EMA rate after the update of `step`."""

    def keeps_target(self) -> bool:
        """Whether the target is an EMA kept in the method state (False: the student under stop-gradient)."""
        return True

    @abc.abstractmethod
    def lower_point(self, method_state, x: jax.Array, z: jax.Array, x_hi: jax.Array, sigma_lo: jax.Array,
                    sigma_hi: jax.Array, labels: jax.Array | None) -> jax.Array:
        """The target's input at sigma_i."""

    # -- State and loss -------------------------------------------------------

    def init_state(self, params, teacher_params):
        return {"target": params} if self.keeps_target() else {}

    def loss(self, params, method_state, batch, rng, step):
        x, labels = batch["image"], batch.get("label")
        interval_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
        param = self.config.parametrization
        num_scales = self.num_scales(step)
        sigma_lo, sigma_hi = sample_intervals(interval_rng, x.shape[0], num_scales, self.fn.sigma_min,
                                              param.sigma_max, param.rho)
        z = jax.random.normal(noise_rng, x.shape, x.dtype)
        x_hi = x + sigma_hi[:, None, None, None] * z
        x_lo = jax.lax.stop_gradient(self.lower_point(method_state, x, z, x_hi, sigma_lo, sigma_hi, labels))
        target_params = method_state["target"] if self.keeps_target() else params
        student = self.fn(params, x_hi, sigma_hi, labels, train=True, dropout_rng=dropout_rng)
        target = self.fn(jax.lax.stop_gradient(target_params), x_lo, sigma_lo, labels, train=True,
                         dropout_rng=dropout_rng)
        fields = self.fields
        huber_c = distances.default_huber_c(self.image_shape) if fields.huber_c < 0 else fields.huber_c
        distance = per_example_distance(fields.distance, student, jax.lax.stop_gradient(target), huber_c)
        loss = jnp.mean(loss_weight(fields.weighting, sigma_lo, sigma_hi) * distance)
        return loss, {"num_scales": num_scales, "distance": jnp.mean(distance),
                      "target_decay": self.target_decay(step)}

    def after_update(self, method_state, params, step):
        if not self.keeps_target():
            return method_state
        mu = self.target_decay(step)
        target = jax.tree.map(lambda t, p: mu * t + (1 - mu) * p, method_state["target"], params)
        return {**method_state, "target": target}


class CT(_ConsistencyMethod):
    name = "ct"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        fields = super().default_config()
        fields.s0 = 2  # curriculum: N(0) = s0 grid points
        fields.s1 = 150  # curriculum: N(K) = s1 + 1
        fields.curriculum_steps = -1  # K in N(k); -1: training.num_steps
        fields.mu0 = 0.9  # target EMA rate at N = s0
        # mu(k) = exp(s0 ln(mu0) / M): M = N(k) - 1 'intervals' (both CM code bases, which produced the
        # published numbers: cm/script_util.py, jcm/losses.py) or M = N(k) 'scales' (the paper's formula).
        fields.mu_denominator = "intervals"
        return fields

    @classmethod
    def config_rules(cls) -> dict[str, rules.Rule]:
        return {**super().config_rules(),
                "s0": rules.Int(ge=1),
                "s1": rules.Int(ge="method.s0"),
                "curriculum_steps": rules.Int(ge=1, special={-1: "training.num_steps"}),
                "mu0": rules.Float(gt=0, lt=1),
                "mu_denominator": rules.Choice(MU_DENOMINATORS)}

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        super().check_config(config)
        fields = config.method
        if not 1 <= fields.s0 <= fields.s1:
            raise ValueError(f"config.method.s0 and s1 must satisfy 1 <= s0 <= s1, got s0={fields.s0}, "
                             f"s1={fields.s1}.")
        if not (fields.curriculum_steps == -1 or fields.curriculum_steps > 0):
            raise ValueError(f"config.method.curriculum_steps must be > 0 (or -1 for training.num_steps), got "
                             f"{fields.curriculum_steps}.")
        if not 0 < fields.mu0 < 1:
            raise ValueError(f"config.method.mu0 must lie in (0, 1), got {fields.mu0}.")
        if fields.mu_denominator not in MU_DENOMINATORS:
            raise ValueError(f"Unknown config.method.mu_denominator {fields.mu_denominator!r}; valid: "
                             f"{', '.join(MU_DENOMINATORS)}.")

    def num_scales(self, step):
        fields = self.fields
        total = self.config.training.num_steps if fields.curriculum_steps < 0 else fields.curriculum_steps
        # At least 2 points (1 interval); the CM code clamps the same way.
        return jnp.maximum(schedules.ct_num_scales(step, total, fields.s0, fields.s1), 2)

    def target_decay(self, step):
        fields = self.fields
        return target_ema_rate(self.num_scales(step), fields.s0, fields.mu0, fields.mu_denominator)

    def lower_point(self, method_state, x, z, x_hi, sigma_lo, sigma_hi, labels):
        return x + sigma_lo[:, None, None, None] * z


class CD(_ConsistencyMethod):
    name = "cd"
    teacher = "required"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        fields = super().default_config()
        fields.num_scales = 18  # N, fixed (CM: 18 on CIFAR-10, 40 on ImageNet-64 and LSUN)
        # mu: the target's EMA rate; 0: the student itself under stop-gradient (CM CIFAR-10; 0.95 ImageNet/LSUN).
        fields.target_ema = 0.0
        fields.solver = "heun"  # the teacher's ODE step from sigma_{i+1} to sigma_i: 'heun' or 'euler'
        fields.init_from_teacher = True  # start the student (and its EMAs) from the teacher's params
        return teacher_config_fields(fields)

    @classmethod
    def config_rules(cls) -> dict[str, rules.Rule]:
        return {**super().config_rules(),
                "num_scales": rules.Int(ge=2, why="one interval at least"),
                "target_ema": rules.Float(ge=0, lt=1, why="0: the student itself is the target"),
                "solver": rules.Choice(SOLVERS),
                "init_from_teacher": rules.Flag()}

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        super().check_config(config)
        fields = config.method
        if fields.num_scales < 2:
            raise ValueError(f"config.method.num_scales must be >= 2 (one interval), got {fields.num_scales}.")
        if not 0 <= fields.target_ema < 1:
            raise ValueError(f"config.method.target_ema must lie in [0, 1), got {fields.target_ema}.")
        if fields.solver not in SOLVERS:
            raise ValueError(f"Unknown config.method.solver {fields.solver!r}; valid: {', '.join(SOLVERS)}.")

    def keeps_target(self) -> bool:
        return self.fields.target_ema > 0

    def num_scales(self, step):
        return jnp.int32(self.fields.num_scales)

    def target_decay(self, step):
        return jnp.float32(self.fields.target_ema)

    def init_params(self, params, teacher_params):
        if not self.fields.init_from_teacher:
            return params
        try:
            teachers.require_same_shapes(params, teacher_params)
        except teachers.TeacherError as e:
            raise teachers.TeacherError(f"{e}. Or set config.method.init_from_teacher=False to start the student "
                                        f"from random params.") from e
        ours = self.config.parametrization.c_noise
        theirs = getattr(self.teacher_fn, "c_noise_kind", ours)
        if ours != theirs:
            raise teachers.TeacherError(
                f"config.parametrization.c_noise={ours!r} but the teacher was trained with {theirs!r}: a student "
                f"that starts from the teacher's params (config.method.init_from_teacher) needs the same noise "
                f"labels.")
        return teacher_params

    def init_state(self, params, teacher_params):
        return {**super().init_state(params, teacher_params), "teacher": teacher_params}

    def lower_point(self, method_state, x, z, x_hi, sigma_lo, sigma_hi, labels):
        teacher_params = method_state["teacher"]

        def denoise(x, sigma):
            return self.teacher_fn(teacher_params, x, sigma, labels)

        return samplers.heun_step(denoise, x_hi, sigma_hi, sigma_lo, second_order=self.fields.solver == "heun")
