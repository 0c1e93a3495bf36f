"""The multistep consistency sampler (samplers.py): re-noising and clipping of the denoised outputs.

The expected outputs are computed here from the noise the sampler drew, which
is recovered from unclipped runs of an identity "network": clipping must not
change which noise is drawn, only what is done with it.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consistency_jax import samplers
from tests.helpers import tiny_config

SIGMA_MIN = 0.002
SHAPE = (64, 2, 2, 1)


@dataclasses.dataclass(frozen=True)
class ScaledIdentity:
    """f(x, sigma) = params * x: denoised outputs far outside [-1, 1] at large sigma."""

    sigma_min: float = SIGMA_MIN
    sigma_data: float = 0.5

    def __call__(self, params, x, sigma, labels=None, *, train=False, dropout_rng=None):
        return params * x


def run(sigmas, clip_denoised, params=1.0, seed=0):
    sample = jax.jit(lambda p, key: samplers.consistency_sample(
        ScaledIdentity(), p, key, SHAPE, jnp.asarray(sigmas, jnp.float32), clip_denoised=clip_denoised))
    return np.asarray(sample(jnp.float32(params), jax.random.key(seed)), np.float64)


def test_one_step_output_is_clipped_to_the_data_range():
    raw = run((80.0,), clip_denoised=False)
    assert np.abs(raw).max() > 10  # 80 z
    np.testing.assert_allclose(run((80.0,), clip_denoised=True), np.clip(raw, -1, 1), rtol=1e-6)


def test_every_denoised_output_is_clipped_before_renoising():
    sigmas = (80.0, 2.0, 0.5)
    # The noise each step drew, from unclipped identity runs: x = 80 z0 + n1 z1 + n2 z2.
    scales = [80.0] + [np.sqrt(s**2 - SIGMA_MIN**2) for s in sigmas[1:]]
    partial_sums = [run(sigmas[: k + 1], clip_denoised=False) for k in range(len(sigmas))]
    noises = [partial_sums[0] / scales[0]] + [
        (partial_sums[k] - partial_sums[k - 1]) / scales[k] for k in range(1, len(sigmas))]
    # CM's karras_sample: x = clip(f(80 z0)); x = clip(f(x + n_k z_k)) for each later sigma.
    expected = np.clip(scales[0] * noises[0], -1, 1)
    for scale, noise in zip(scales[1:], noises[1:]):
        expected = np.clip(expected + scale * noise, -1, 1)
    got = run(sigmas, clip_denoised=True)
    np.testing.assert_allclose(got, expected, atol=1e-4)  # float32 rounding of the recovered noise
    # Only clipping the final output would give a different answer: the clip between steps matters.
    assert np.abs(np.clip(partial_sums[-1], -1, 1) - got).max() > 0.1


def test_sampler_reads_the_config_and_keys_the_compiled_function_by_it():
    config = tiny_config()
    assert config.sampling.clip_denoised is True  # the CM reference's default
    fn = ScaledIdentity()
    clipped = samplers.consistency_sampler(fn, config, 2)
    config.sampling.clip_denoised = False
    unclipped = samplers.consistency_sampler(fn, config, 2)
    assert clipped.key != unclipped.key  # a compiled sampler is never reused for the other setting
    key = jax.random.key(3)
    out_clipped = clipped.sample(jnp.float32(3.0), key, SHAPE, None)
    out_unclipped = unclipped.sample(jnp.float32(3.0), key, SHAPE, None)
    assert float(jnp.abs(out_clipped).max()) <= 1.0 < float(jnp.abs(out_unclipped).max())
    np.testing.assert_allclose(out_clipped, jnp.clip(out_clipped, -1, 1))
    with pytest.raises(TypeError):
        config.sampling.clip_denoised = "yes"  # the config's type check: a bool field
