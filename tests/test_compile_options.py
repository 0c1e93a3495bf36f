"""Programs that run once compile without XLA's optimisation passes on CPU, and compute the same values."""

import jax
import numpy as np
import pytest

from consistency_jax import parallel
from consistency_jax.evaluation import generate
from consistency_jax.experiment import create_experiment
from tests.helpers import tiny_config

# Explicitly optimised, whatever the test session's JAX_DISABLE_MOST_OPTIMIZATIONS says.
OPTIMIZED = {"xla_backend_optimization_level": 3, "xla_llvm_disable_expensive_passes": False}


def test_run_once_programs_compile_unoptimised_on_cpu():
    assert parallel.run_once_compiler_options() == {"xla_backend_optimization_level": 0,
                                                    "xla_llvm_disable_expensive_passes": True}


def test_state_init_and_samplers_compiled_unoptimised_match_optimised():
    config = tiny_config()
    experiment = create_experiment(config)
    state = experiment.create_state()  # compiled with run_once_compiler_options()
    optimized = jax.jit(experiment.init_params, out_shardings=experiment.state_shardings.params,
                        compiler_options=OPTIMIZED)(jax.random.PRNGKey(config.seed))
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(optimized), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)

    config.sampling.xla_optimizations = False
    unoptimized_experiment = create_experiment(config)
    labels = np.zeros((16,), np.int32)
    # The untrained network's last layer starts at zero: perturbed params give images worth comparing.
    leaves, treedef = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    params = jax.tree.unflatten(treedef, [leaf + 0.1 * jax.random.normal(key, leaf.shape, leaf.dtype)
                                          for leaf, key in zip(leaves, keys)])
    images = {}
    for name, exp in (("optimized", experiment), ("unoptimized", unoptimized_experiment)):
        _, sampler = generate.make_sampler(exp, 1)
        images[name], finite = sampler(params, jax.random.PRNGKey(1), labels)
        assert bool(finite)
    # uint8 images: float rounding may move a value across a quantisation step, no further.
    difference = np.abs(np.asarray(images["optimized"], int) - np.asarray(images["unoptimized"], int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    assert np.asarray(images["optimized"]).std() > 10  # images, not a constant


def test_state_init_and_unoptimised_samplers_are_compiled_with_the_run_once_options(monkeypatch):
    """An option XLA rejects, in place of the run-once options, reaches exactly the programs that use them."""
    monkeypatch.setattr(parallel, "run_once_compiler_options", lambda: {"no_such_xla_option": True})
    config = tiny_config()
    experiment = create_experiment(config)
    with pytest.raises(Exception, match="no_such_xla_option"):
        experiment.create_state()
    params = jax.jit(experiment.init_params)(jax.random.PRNGKey(0))
    labels = np.zeros((16,), np.int32)
    _, optimized_sampler = generate.make_sampler(experiment, 1)
    optimized_sampler(params, jax.random.PRNGKey(1), labels)  # sampling.xla_optimizations: XLA's defaults
    config.sampling.xla_optimizations = False
    _, unoptimized_sampler = generate.make_sampler(create_experiment(config), 1)
    with pytest.raises(Exception, match="no_such_xla_option"):
        unoptimized_sampler(params, jax.random.PRNGKey(1), labels)
