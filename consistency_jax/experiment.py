"""An experiment built from a config: validated settings, network, mesh, optimizer.

The training loop, the samplers and the evaluator all start from `create_experiment`.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from consistency_jax import checkpointing, methods, parallel, phema, teachers
from consistency_jax.data import pipeline
from consistency_jax.evaluation import reference_stats
from consistency_jax.methods.base import Method
from consistency_jax.models import create_model, trainable_mask
from consistency_jax.parametrization import C_NOISE_KINDS, NetworkFunction
from consistency_jax.state import TrainState, create_train_state

OPTIMIZERS = ("adam", "radam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "rsqrt")


# ----------------------------------------------------------------------------
# Config validation: every bad value is reported before anything compiles.
# ----------------------------------------------------------------------------


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


class ConfigError(ValueError):
    """A config value is invalid; the message names it and the valid values."""


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the bad field and the valid values."""
    try:
        _validate(config)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _validate(config: ml_collections.ConfigDict) -> None:
    methods.check_method_config(config)
    create_model(config.model)
    pipeline.check_dataset(config.data)
    model_classes = config.model.get("num_classes", 0)
    _require(model_classes == config.data.num_classes,
             f"config.model.num_classes ({model_classes}) must equal config.data.num_classes "
             f"({config.data.num_classes}): the network embeds the labels the data provides.")
    opt, train = config.optimizer, config.training
    _require(opt.name in OPTIMIZERS,
             f"Unknown config.optimizer.name {opt.name!r}; valid: {', '.join(OPTIMIZERS)}.")
    _require(opt.lr_schedule in LR_SCHEDULES,
             f"Unknown config.optimizer.lr_schedule {opt.lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}.")
    _require(config.parametrization.c_noise in C_NOISE_KINDS,
             f"Unknown config.parametrization.c_noise {config.parametrization.c_noise!r}; "
             f"valid: {', '.join(C_NOISE_KINDS)}.")
    _require(train.batch_size > 0, f"config.training.batch_size must be positive, got {train.batch_size}.")
    _require(train.num_steps > 0, f"config.training.num_steps must be positive, got {train.num_steps}.")
    _require(all(0 <= r < 1 for r in train.ema_rates),
             f"config.training.ema_rates must lie in [0, 1), got {tuple(train.ema_rates)}.")
    reference_stats.check_reference(config.eval)
    _require(all(0 < s < phema.MAX_SIGMA_REL for s in train.ema_sigma_rels),
             f"config.training.ema_sigma_rels (power-function EMA widths) must lie in (0, "
             f"{phema.MAX_SIGMA_REL:.4f}), got {tuple(train.ema_sigma_rels)}.")
    _require(config.sampling.ema_sigma_rel == 0 or config.sampling.ema_sigma_rel in train.ema_sigma_rels,
             f"config.sampling.ema_sigma_rel={config.sampling.ema_sigma_rel} is not one of the power-function "
             f"EMAs this run keeps (config.training.ema_sigma_rels={tuple(train.ema_sigma_rels)}); 0 selects "
             f"by config.sampling.ema_rate.")
    sampler_method = methods.get_method(config.method.name)
    for steps in {config.sampling.num_steps, *config.eval.steps}:
        sampler_method.check_sampler(config, steps)


# ----------------------------------------------------------------------------
# Experiment set-up.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What the loop, the samplers and the evaluator need, built from a config."""

    config: ml_collections.ConfigDict
    fn: NetworkFunction
    method: Method
    image_shape: tuple[int, int, int]
    num_classes: int
    mesh: jax.sharding.Mesh
    optimizer: optax.GradientTransformation
    # The teacher's config (from its workdir or this run's snapshot), when the method uses one.
    teacher_config: ml_collections.ConfigDict | None = None
    # Compiled samplers by their keys (see evaluation/generate.make_sampler).
    jitted_samplers: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def init_params(self, rng: jax.Array) -> Any:
        """Freshly initialised network params (the untrained baseline of the evaluation)."""
        return self.fn.init(rng, self.image_shape, self.num_classes > 0)

    def init_state(self, rng: jax.Array, teacher_params: Any | None) -> TrainState:
        params = self.method.init_params(self.init_params(rng), teacher_params)
        method_state = self.method.init_state(params, teacher_params)
        train = self.config.training
        num_emas = len(train.ema_rates) + len(train.ema_sigma_rels)
        return create_train_state(params, self.optimizer, num_emas, rng, method_state)

    @functools.cached_property
    def teacher_shapes(self) -> Any | None:
        if self.teacher_config is None:
            return None
        return teachers.param_shapes(self.method.teacher_fn, self.image_shape, self.num_classes)

    @functools.cached_property
    def _state_shapes(self) -> Any:
        """Shapes and dtypes of the train state, traced once (the network init is not run)."""
        return jax.eval_shape(self.init_state, jax.random.PRNGKey(0), self.teacher_shapes)

    @functools.cached_property
    def state_shardings(self) -> Any:
        return parallel.state_shardings(self._state_shapes, self.mesh, self.config.mesh.fsdp_min_size)

    def abstract_state(self) -> Any:
        """The state as ShapeDtypeStructs with this mesh's shardings: the target of a checkpoint restore."""
        return checkpointing.abstract_with_shardings(self._state_shapes, self.state_shardings)

    def create_state(self) -> TrainState:
        """The step-0 state; reads the teacher's params when the method uses a teacher."""
        teacher_params = None
        if self.teacher_config is not None:
            teacher_params = teachers.load_params(self.config, self.teacher_config, self.teacher_shapes, self.mesh)
        rng = jax.random.PRNGKey(self.config.seed)
        return jax.jit(self.init_state, out_shardings=self.state_shardings)(rng, teacher_params)


def learning_rate_schedule(opt: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    if opt.lr_schedule == "cosine":
        base = optax.cosine_decay_schedule(opt.learning_rate, max(num_steps - opt.warmup_steps, 1))
    elif opt.lr_schedule == "rsqrt":  # ECT ImageNet: lr / sqrt(max(step / ref, 1))
        def base(step):
            return opt.learning_rate / jnp.sqrt(jnp.maximum(step / opt.rsqrt_ref_steps, 1.0))
    else:
        base = optax.constant_schedule(opt.learning_rate)
    if opt.warmup_steps <= 0:
        return base
    warmup = optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps)
    return optax.join_schedules([warmup, base], [opt.warmup_steps])


def create_optimizer(opt: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    lr = learning_rate_schedule(opt, num_steps)
    if opt.name == "radam":
        core = optax.radam(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps)
    elif opt.name == "adamw":
        # The frozen params (Fourier frequencies) have zero gradients; the mask keeps decay off them too.
        core = optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                           mask=trainable_mask)
    else:
        core = optax.adam(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps)
    if opt.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), core)
    return core


def create_experiment(config: ml_collections.ConfigDict, devices: list | None = None,
                      workdir: str | None = None) -> Experiment:
    """The experiment of `config`; `workdir` (if given) supplies the teacher-config snapshot of a resumed run."""
    info = pipeline.dataset_info(config.data)
    image_shape, num_classes = tuple(info.image_shape), info.num_classes
    method_cls = methods.get_method(config.method.name)
    fn = method_cls.make_function(config, create_model(config.model))
    teacher_config = teacher_fn = None
    if teachers.wants_teacher(config):
        teacher_config = teachers.teacher_config(config, workdir)
        teachers.check_compatible(teacher_config, image_shape, num_classes)
        teacher_fn = teachers.teacher_function(teacher_config)
    mesh = parallel.create_mesh(config.mesh, devices)
    parallel.check_batch_size(config.training.batch_size, mesh)
    return Experiment(config=config, fn=fn,
                      method=method_cls(config, fn, image_shape, num_classes, teacher_fn=teacher_fn),
                      image_shape=image_shape, num_classes=num_classes, mesh=mesh,
                      optimizer=create_optimizer(config.optimizer, config.training.num_steps),
                      teacher_config=teacher_config)
