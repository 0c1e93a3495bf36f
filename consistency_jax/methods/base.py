"""The interface every method implements, and the defaults a method inherits.

A method is one file in this package holding a subclass of `Method`; the loop,
the samplers and the evaluator know a method only through these members:

    default_config()            its config fields (config.method), each with a comment
    check_config(config)        ranges and orderings of those fields, before anything compiles
    check_sampler(config, n)    whether the config describes an n-step sampler
    make_function(config, model)  the network's parametrization (consistency boundary, EDM denoiser, ...)
    init_params(params, teacher)  the params training starts from (ECT/SCT: the teacher's)
    init_state(params, teacher)   the method state kept beside the params: EMA target, frozen
                                  teacher, discriminator and its optimizer state, ... (a pytree;
                                  checkpointed and sharded like the params)
    loss(params, method_state, batch, rng, step) -> (loss, metrics)    pure
    update(state, batch, rng, optimizer) -> (state, metrics)           one training step
    after_update(method_state, params, step) -> method_state           e.g. the EMA target
    sampler(num_steps) -> samplers.Sampler                             --mode=sample/eval, grids

`update` defaults to one optimizer step on `loss`, the network's param
projection (models.project_params: EDM2's forced weight normalisation) and
`after_update`; a method that needs more (ACT: a generator and a discriminator
step) overrides it and calls models.project_params after its own steps. Whatever `update` returns, the loop updates the evaluation EMAs, advances
the step and, when the metrics `loss` or `grad_norm` are not finite, keeps the
whole previous state. A method instance holds only static things (config
numbers, the network function, the teacher's network function): everything
that changes during training is an argument.

Teachers: a method whose `teacher` is 'required' or 'optional' reads
`config.method.teacher_workdir` (see `teacher_config_fields`); the loop loads
the teacher's params (consistency_jax/teachers.py) and hands them to
`init_params` and `init_state` once, at the start of a run. A method that keeps
the teacher (CD) puts it into its state, so a resumed run never reads the
teacher's workdir again.
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax
import ml_collections
import optax

from consistency_jax import models, samplers
from consistency_jax.parametrization import ConsistencyFunction, NetworkFunction

TEACHER_USES = ("none", "optional", "required")


def teacher_config_fields(fields: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds the fields that name a teacher (or an initialisation) to a method's config."""
    # A workdir of this framework (a trained EDM/diffusion run, or a converted EDM
    # checkpoint: `python -m consistency_jax.convert`); None: no teacher.
    fields.teacher_workdir = ml_collections.FieldReference(None, field_type=str)
    fields.teacher_step = -1  # checkpoint step of the teacher; -1: its latest
    fields.teacher_ema_rate = -1.0  # which of the teacher's EMAs; -1: its first; 0: its raw params
    return fields


class Method:
    """A consistency-model method; subclasses set `name` and override what differs."""

    name: ClassVar[str]
    # Whether the method reads a teacher from config.method.teacher_workdir.
    teacher: ClassVar[str] = "none"

    def __init__(self, config: ml_collections.ConfigDict, fn: NetworkFunction, image_shape: tuple[int, int, int],
                 num_classes: int, teacher_fn: NetworkFunction | None = None):
        self.config = config
        self.fields = config.method
        self.fn = fn
        self.image_shape = image_shape
        self.num_classes = num_classes
        self.teacher_fn = teacher_fn

    # -- Config -------------------------------------------------------------

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        """The method's fields, `name` included; override and extend in subclasses."""
        fields = ml_collections.ConfigDict()
        fields.name = cls.name
        return fields

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        """Raises ValueError naming a field of config.method with an invalid value and the valid range."""

    # -- Network ------------------------------------------------------------

    @classmethod
    def make_function(cls, config: ml_collections.ConfigDict, model: nn.Module) -> NetworkFunction:
        """The network's parametrization; consistency methods keep f(x, sigma_min) = x exactly."""
        param = config.parametrization
        return ConsistencyFunction(model, sigma_min=param.sigma_min, sigma_data=param.sigma_data,
                                   c_noise_kind=param.c_noise)

    # -- State --------------------------------------------------------------

    def init_params(self, params: Any, teacher_params: Any | None) -> Any:
        return params

    def init_state(self, params: Any, teacher_params: Any | None) -> Any:
        return {}

    # -- Training -----------------------------------------------------------
    # Subclasses define `loss(params, method_state, batch, rng, step) -> (loss, metrics)`,
    # a pure function, unless they override `update` whole.

    def after_update(self, method_state: Any, params: Any, step: jax.Array) -> Any:
        return method_state

    def update(self, state: Any, batch: dict, rng: jax.Array,
               optimizer: optax.GradientTransformation) -> tuple[Any, dict]:
        """One optimizer step on `loss`, then `after_update`; metrics include 'loss' and 'grad_norm'."""
        (loss, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(
            state.params, state.method_state, batch, rng, state.step)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Networks with a param constraint (EDM2's forced weight normalisation) project after each step.
        params = models.project_params(getattr(self.fn, "model", None), params)
        method_state = self.after_update(state.method_state, params, state.step)
        new_state = state.replace(params=params, opt_state=opt_state, method_state=method_state)
        return new_state, {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}

    # -- Sampling -----------------------------------------------------------

    @classmethod
    def check_sampler(cls, config: ml_collections.ConfigDict, num_steps: int) -> None:
        """Raises ValueError when the config cannot make a `num_steps` sampler (before anything compiles)."""
        samplers.sampling_sigmas(config, num_steps)

    def sampler(self, num_steps: int) -> samplers.Sampler:
        """Consistency sampling through sigma_max and the config's intermediate sigmas."""
        return samplers.consistency_sampler(self.fn, self.config, num_steps)
