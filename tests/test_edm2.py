"""EDM2's magnitude-preserving U-Net (models/edm2.py): magnitudes at init, sizes, forced weight normalisation."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from consistency_jax import checkpointing, experiment, methods, parallel, phema, train
from consistency_jax.evaluation import generate
from consistency_jax.models import edm2
from tests.helpers import tiny_config

# Parameter counts of NVlabs/edm2's UNet (training/networks_edm2.py) for ImageNet-64 with 1000 classes,
# counted with the reference PyTorch code; published (EDM2 Table 3): 280M, 498M, 777M, 1119M.
REFERENCE_UNET_PARAMS = {"S": 280_209_253, "M": 497_803_045, "L": 777_492_197, "XL": 1_119_276_709}
PUBLISHED_MILLIONS = {"S": 280, "M": 498, "L": 777, "XL": 1119}


def count_params(size: str) -> int:
    model = edm2.EDM2UNet(model_channels=edm2.SIZES[size], num_classes=1000)
    shapes = jax.eval_shape(lambda rng: model.init({"params": rng}, jnp.zeros((1, 64, 64, 3)), jnp.zeros((1,)),
                                                   jnp.zeros((1,), jnp.int32), train=False), jax.random.PRNGKey(0))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def check_size(size: str) -> None:
    n = count_params(size)
    # The reference count plus the 2 * model_channels fixed Fourier frequencies and phases kept as params.
    assert n == REFERENCE_UNET_PARAMS[size] + 2 * edm2.SIZES[size]
    assert abs(n / 1e6 - PUBLISHED_MILLIONS[size]) < 0.5


def test_size_s_has_the_published_parameter_count():
    check_size("S")


@pytest.mark.slow
@pytest.mark.parametrize("size", ["M", "L", "XL"])
def test_larger_sizes_have_the_published_parameter_counts(size):
    check_size(size)


def rms(x) -> float:
    return float(jnp.sqrt(jnp.mean(jnp.square(x))))


def test_magnitude_preserving_at_init():
    """Unit-variance input: every block's output has ~unit magnitude (RMS) at init; the output (gain 0) is 0."""
    model = edm2.EDM2UNet(model_channels=64, channel_mult=(1, 2), attn_resolutions=(8,), num_blocks=1, num_classes=4)
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 16, 16, 3))
    noise, labels = jax.random.normal(jax.random.PRNGKey(2), (16,)), jnp.arange(16) % 5  # 4 = the null class

    @jax.jit
    def run(rng):
        params = model.init({"params": rng}, x, noise, labels, train=False)["params"]
        return model.apply({"params": params}, x, noise, labels, train=False, mutable=["intermediates"])

    out, variables = run(jax.random.PRNGKey(0))
    magnitudes = {name: rms(v["out"][0]) for name, v in variables["intermediates"].items()}
    assert len(magnitudes) == 10 and all(0.85 < m < 1.15 for m in magnitudes.values()), magnitudes
    np.testing.assert_array_equal(out, 0.0)


def test_mp_sum_and_mp_cat_keep_unit_variance():
    """Magnitude = RMS (EDM2's expected squared magnitude), for unit-normal inputs."""
    a, b = jax.random.normal(jax.random.PRNGKey(0), (2, 4096, 48))
    assert rms(edm2.mp_sum(a, b, 0.3)) == pytest.approx(1.0, abs=0.02)
    assert rms(edm2.mp_cat(a, b[..., :16], 0.5)) == pytest.approx(1.0, abs=0.02)
    assert rms(edm2.mp_silu(a)) == pytest.approx(1.0, abs=0.02)
    assert rms(jax.nn.silu(a)) < 0.65  # what mp_silu's 1/0.596 corrects


def test_forced_weight_normalisation_and_power_ema_in_training(tmp_path):
    """EDM on a tiny EDM2: after each step every MPConv weight is back at unit RMS (forced WN); the
    power-function EMA follows beta(t) = (1 - 1/t)^(gamma + 1); post-hoc reconstruction reads the checkpoints."""
    config = tiny_config(num_steps=3)
    config.method = methods.method_config("edm")
    config.model = edm2_tiny_model_config()
    config.optimizer.learning_rate = 0.05  # big steps: without the projection the weights leave unit RMS
    config.training.ema_rates = (0.9,)
    config.training.ema_sigma_rels = (0.15, 0.25)
    config.sampling.ema_sigma_rel = 0.15
    experiment.validate_config(config)
    exp = experiment.create_experiment(config, jax.devices()[:1])
    state = exp.create_state()
    step = train.jit_train_step(exp)
    checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), keep=10, async_save=False)
    rng = np.random.RandomState(0)
    params_seen, emas = [], []
    for k in range(1, 4):
        batch = {"image": rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32)}
        state, _ = step(state, parallel.global_batch(batch, exp.mesh))
        params_seen.append(jax.device_get(state.params))  # the step donates the state it is given
        emas.append(jax.device_get(state.ema_params))
        checkpointer.save(k, state, {}, force=True)
    checkpointer.close()
    for path, w in jax.tree_util.tree_leaves_with_path(params_seen[-1]):
        if jax.tree_util.keystr(path).endswith("['weight']"):
            rms = np.sqrt(np.mean(np.square(np.asarray(w)), axis=tuple(range(w.ndim - 1))))
            np.testing.assert_allclose(rms, 1 / (1 + 1e-4), rtol=1e-5)
    gamma = phema.sigma_rel_to_gamma(0.15)
    leaf = lambda tree: np.asarray(tree["out_conv"]["weight"])  # noqa: E731
    np.testing.assert_allclose(leaf(emas[0][1]), leaf(params_seen[0]), rtol=1e-6)  # beta(1) = 0
    expected = leaf(params_seen[0])
    for t in (2, 3):
        beta = (1 - 1 / t) ** (gamma + 1)
        expected = beta * expected + (1 - beta) * leaf(params_seen[t - 1])
    np.testing.assert_allclose(leaf(emas[2][1]), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(leaf(generate.sampling_params(state, config)), leaf(emas[2][1]))
    # Post hoc from the three checkpoints: a stored width comes back as itself (index 2 = sigma_rel 0.25,
    # after the exponential EMA), another one lies between the stored ones.
    # Read while a run saves beside it: a save still in progress (orbax's temporary directory) stays untouched.
    saving = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1700000000"
    saving.mkdir()
    rebuilt = phema.posthoc_params(exp, str(tmp_path), 0.25)
    np.testing.assert_allclose(leaf(rebuilt), leaf(emas[2][2]), rtol=1e-4, atol=1e-6)
    assert saving.is_dir()
    between = leaf(phema.posthoc_params(exp, str(tmp_path), 0.2))
    assert np.all(np.isfinite(between)) and not np.allclose(between, leaf(emas[2][2]))


def edm2_tiny_model_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(name="edm2", model_channels=8, channel_mult=(1, 2), attn_resolutions=(4,),
                                          num_blocks=1, channels_per_head=8, dropout=0.1))
