"""An experiment built from a config: validated settings, network, mesh, optimizer.

The training loop, the samplers and the evaluator all start from `create_experiment`.
"""

import contextlib
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from consistency_jax import checkpointing, methods, models, parallel, phema, teachers
from consistency_jax import config_rules as rules
from consistency_jax.config_rules import ConfigError
from consistency_jax.data import pipeline, sources
from consistency_jax.errors import UserError
from consistency_jax.evaluation import reference_stats
from consistency_jax.methods.base import Method
from consistency_jax.models import trainable_mask
from consistency_jax.parametrization import C_NOISE_KINDS, NetworkFunction
from consistency_jax.state import TrainState, create_train_state

OPTIMIZERS = ("adam", "radam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "rsqrt")


# ----------------------------------------------------------------------------
# Config validation: every field has a rule (config_rules.py), and every bad
# value is reported before anything compiles.
# ----------------------------------------------------------------------------

SIGMA_MIN, SIGMA_MAX = "parametrization.sigma_min", "parametrization.sigma_max"
MODES = ("train", "sample", "eval", "edit")

# The rules of the fields in configs/default.py, by section. A field added there needs a rule here
# (tests/test_validation.py fails otherwise); config.method and config.model have their own tables.
GENERAL_RULES: dict[str, dict[str, rules.Rule]] = {
    "": {"seed": rules.Int(ge=0, le=2**32 - 1, why="JAX keys hold 32 bits: larger seeds repeat smaller ones")},
    "parametrization": {
        "sigma_min": rules.Float(gt=0),
        "sigma_max": rules.Float(gt=SIGMA_MIN),
        "sigma_data": rules.Float(gt=0),
        "rho": rules.Float(gt=0),
        "c_noise": rules.Choice(C_NOISE_KINDS),
    },
    "data": {
        "name": rules.Choice(sources.DATASET_NAMES),
        "image_size": rules.Int(ge=1),
        "num_channels": rules.Choice((1, 3)),
        "num_classes": rules.Int(ge=0, why="0: unconditional"),
        "random_flip": rules.Flag(),
        "data_dir": rules.Text(),
        "path": rules.Text(),
        "on_bad_image": rules.Choice(sources.BAD_IMAGE_POLICIES),
    },
    "optimizer": {
        "name": rules.Choice(OPTIMIZERS),
        "learning_rate": rules.Float(gt=0),
        "b1": rules.Float(ge=0, lt=1),
        "b2": rules.Float(ge=0, lt=1),
        "eps": rules.Float(gt=0),
        "weight_decay": rules.Float(ge=0),
        "warmup_steps": rules.Int(ge=0, why="0: no warm-up"),
        "lr_schedule": rules.Choice(LR_SCHEDULES),
        "rsqrt_ref_steps": rules.Int(ge=1),
        "grad_clip_norm": rules.Float(ge=0, why="0: off"),
    },
    "training": {
        "batch_size": rules.Int(ge=1),
        "num_steps": rules.Int(ge=1),
        "ema_rates": rules.Numbers(rules.Float(ge=0, lt=1), unique=True),
        "ema_sigma_rels": rules.Numbers(rules.Float(gt=0, lt=phema.MAX_SIGMA_REL), unique=True,
                                        why="power-function EMA widths"),
        "log_every": rules.Int(ge=1),
        "sample_every": rules.Int(ge=0, why="0: no sample grids"),
        "checkpoint_every": rules.Int(ge=0, why="0: only at the end and when preempted"),
        "keep_checkpoints": rules.Int(ge=1, why="how many of the newest checkpoints to keep; 0 would keep none"),
        "keep_every": rules.Int(ge=0, why="0: off"),
    },
    "sampling": {
        "num_samples": rules.Int(ge=1),
        "batch_size": rules.Int(ge=1),
        "num_steps": rules.Int(ge=1),
        "mid_sigma": rules.Float(gt=SIGMA_MIN, lt=SIGMA_MAX),
        "sigmas": rules.Numbers(rules.Float(gt=SIGMA_MIN, lt=SIGMA_MAX), order="descending",
                                why="the intermediate sigmas of the sampler of len(sigmas) + 1 >= 3 steps"),
        "ema_rate": rules.Float(ge=0, lt=1, special={-1.0: "the first EMA"}, why="0: the raw params"),
        "ema_sigma_rel": rules.Float(ge=0, lt=phema.MAX_SIGMA_REL,
                                     why="0: select by sampling.ema_rate; > 0: a power-function EMA"),
        "clip_denoised": rules.Flag(),
        "xla_optimizations": rules.Flag(),
    },
    "eval": {
        "feature_extractor": rules.Choice(("digits", "inception")),
        "num_samples": rules.Int(ge=1),
        "every_steps": rules.Int(ge=0, why="0: off"),
        "at_end": rules.Flag(),
        "steps": rules.Numbers(rules.Int(ge=1), min_len=1, unique=True),
        "inception_dir": rules.Text(),
        "reference": rules.CheckedElsewhere("reference_stats.check_reference: 'train' or an ADM reference .npz"),
    },
    "edit": {  # --mode=edit (evaluation/edit.py checks the files when it runs)
        "task": rules.Choice(lambda: __import__("consistency_jax.editing", fromlist=["TASKS"]).TASKS),
        "images": rules.Text(),
        "masks": rules.Text(),
        "steps": rules.Int(ge=1),
        "sigma_start": rules.Float(gt=SIGMA_MIN, le=SIGMA_MAX, special={-1.0: "the task's default"}),
        "label": rules.Int(ge=0, special={-1: "the .npz's labels"}),
    },
    "mesh": {
        "data": rules.Int(ge=1, special={-1: "all remaining devices"}),
        "fsdp": rules.Int(ge=1, special={-1: "all remaining devices"}),
        "fsdp_min_size": rules.Int(ge=0),
        "cpu_devices": rules.Int(ge=0, special={0: "XLA's default (one CPU device)"}),
    },
}


def validate_config(config: ml_collections.ConfigDict, mode: str = "train") -> None:
    """Raises ConfigError naming the bad field and the valid values; checks the samplers `mode` will use.

    Nothing here compiles or reads checkpoints: field rules and orderings, the
    method's and the network's own rules, the dataset (one example is read)
    and the samplers of this mode (train: sample grids and evaluations; sample:
    sampling.num_steps; eval: eval.steps).
    """
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; valid: {', '.join(MODES)}.")
    with _as_config_errors():
        _check_fields(config)
        pipeline.check_dataset(config.data)
        mesh = parallel.create_mesh(config.mesh)  # the mesh fits this machine's devices
        if mode == "train":
            parallel.check_batch_size(config.training.batch_size, mesh)
        if mode == "train" and config.data.name in sources.IN_MEMORY_DATASETS:  # counted without TFDS metadata
            examples = pipeline.dataset_info(config.data).num_examples
            if examples < config.training.batch_size:
                raise ConfigError(f"config.training.batch_size={config.training.batch_size} is more than the "
                                  f"{examples} training examples of {config.data.name}; lower it.")
        sampler_method = methods.get_method(config.method.name)
        for steps in sorted(sampler_steps(config, mode)):
            sampler_method.check_sampler(config, steps)
    if config.eval.feature_extractor == "inception" and evaluates(config, mode):
        # Found (or downloaded) now rather than after hours of training.
        from consistency_jax.evaluation import inception_weights

        inception_weights.find_weights(config.eval.get("inception_dir"))


def check_fields(config: ml_collections.ConfigDict) -> None:
    """The rules of every field (general, network, method) and the orderings between sections; reads no data."""
    with _as_config_errors():
        _check_fields(config)


@contextlib.contextmanager
def _as_config_errors():
    """ValueErrors of checks (a method's check_config, a registry) become ConfigErrors; other UserErrors pass."""
    try:
        yield
    except ValueError as e:
        if isinstance(e, UserError):
            raise
        raise ConfigError(str(e)) from e


def _check_fields(config: ml_collections.ConfigDict) -> None:
    for section, table in GENERAL_RULES.items():
        rules.check_fields(config, section, table)
    models.check_model_config(config)
    methods.check_method_config(config)
    sources.check_data_config(config.data)
    reference_stats.check_reference(config.eval)
    train, sampling = config.training, config.sampling
    if len(sampling.sigmas) == 1:
        raise ConfigError(f"config.sampling.sigmas={tuple(sampling.sigmas)} is invalid: the 2-step sampler takes "
                          f"its intermediate sigma from config.sampling.mid_sigma; sampling.sigmas holds the "
                          f"2 or more intermediate sigmas of a sampler of 3 or more steps.")
    if sampling.ema_rate not in (-1.0, 0.0) and sampling.ema_rate not in tuple(train.ema_rates):
        raise ConfigError(f"config.sampling.ema_rate={sampling.ema_rate} is invalid: this run keeps the EMAs "
                          f"config.training.ema_rates={tuple(train.ema_rates)}; choose one of them, -1 (the first) "
                          f"or 0 (the raw params).")
    if sampling.ema_sigma_rel and sampling.ema_sigma_rel not in tuple(train.ema_sigma_rels):
        raise ConfigError(f"config.sampling.ema_sigma_rel={sampling.ema_sigma_rel} is invalid: this run keeps the "
                          f"power-function EMAs config.training.ema_sigma_rels={tuple(train.ema_sigma_rels)}; choose "
                          f"one of them, or 0 (select by config.sampling.ema_rate).")
    image = (config.data.image_size, config.data.num_channels)
    if config.eval.feature_extractor == "digits" and image != (8, 1):
        raise ConfigError(f"config.eval.feature_extractor='digits' scores 8x8 grayscale digits, but the data are "
                          f"{image[0]}x{image[0]}x{image[1]}; set config.eval.feature_extractor='inception'.")


def evaluates(config: ml_collections.ConfigDict, mode: str) -> bool:
    """Whether `mode` computes evaluation metrics (eval mode, or training with an evaluation)."""
    return mode == "eval" or (mode == "train" and (config.eval.at_end or config.eval.every_steps > 0))


def sampler_steps(config: ml_collections.ConfigDict, mode: str) -> set[int]:
    """The step counts of the samplers that `mode` runs: only these must be constructible."""
    steps = set()
    if mode == "sample" or (mode == "train" and config.training.sample_every > 0):
        steps.add(config.sampling.num_steps)
    if evaluates(config, mode):
        steps.update(config.eval.steps)
    return steps


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
        return jax.jit(self.init_state, out_shardings=self.state_shardings,
                       compiler_options=parallel.run_once_compiler_options())(rng, teacher_params)


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
    fn = method_cls.make_function(config, models.create_model_for(config))
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
