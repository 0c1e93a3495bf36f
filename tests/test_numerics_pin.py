"""Fixed-seed values of the iCT train step and the one-step sampler, pinned.

Speed work (layouts, fusions, FIR and GroupNorm lowering, donation) must not
change what the step computes: these numbers were recorded from the code
before any of it (main at ca2ef4f) and must stay equal to float tolerance. A
change of the maths (a filter tap, a normalisation epsilon, the sigma draw,
the dropout mask) moves them far beyond it.
"""

import jax
import numpy as np
import pytest

from consistency_jax import experiment, parallel, train
from tests.helpers import tiny_config

# Recorded from main at ca2ef4f (tiny NCSN++: FIR (1,3,3,1) resampling, residual progressive input,
# attention at 4x4, dropout 0.1, Fourier embedding) with conftest's settings.
EXPECTED_LOSSES = [3.889995574951172, 5.041685581207275, 4.5171589851379395]
EXPECTED_GRAD_NORMS = [2.0366554260253906, 5.707289218902588, 11.723036766052246]
EXPECTED_PARAM_ABS_SUM = 3286.2027669608565
# (mean, mean |x|, x[0, 0, 0, 0]) of a 1-step batch of 8 from the trained params.
EXPECTED_SAMPLE = [-7.966411067172885e-05, 0.009504853747785091, -0.014771822839975357]
RTOL = 1e-4


@pytest.fixture(scope="module")
def trained():
    config = tiny_config(num_steps=3)
    config.model.update(channel_mult=(1, 2), attn_resolutions=(4,))  # the network the values were recorded with
    exp = experiment.create_experiment(config, jax.devices()[:1])
    state = exp.create_state()
    step_fn = train.jit_train_step(exp)
    rng = np.random.default_rng(0)
    losses, grad_norms = [], []
    for _ in range(3):
        batch = {"image": rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32)}
        state, metrics = step_fn(state, parallel.global_batch(batch, exp.mesh))
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
    sample = jax.jit(exp.method.sampler(1).sample, static_argnums=2)
    images = np.asarray(sample(state.params, jax.random.PRNGKey(3), (8, 8, 8, 1), None))
    return losses, grad_norms, state, images


def test_train_step_losses_are_unchanged(trained):
    losses, grad_norms, _, _ = trained
    np.testing.assert_allclose(losses, EXPECTED_LOSSES, rtol=RTOL)
    np.testing.assert_allclose(grad_norms, EXPECTED_GRAD_NORMS, rtol=RTOL)


def test_trained_params_and_samples_are_unchanged(trained):
    _, _, state, images = trained
    abs_sum = sum(float(np.abs(np.asarray(p, np.float64)).sum()) for p in jax.tree.leaves(state.params))
    np.testing.assert_allclose(abs_sum, EXPECTED_PARAM_ABS_SUM, rtol=RTOL)
    summary = [float(images.mean()), float(np.abs(images).mean()), float(images[0, 0, 0, 0])]
    np.testing.assert_allclose(summary, EXPECTED_SAMPLE, rtol=RTOL, atol=1e-6)
