"""Paper-scale networks: NCSN++ / DDPM++ (CIFAR-10) and ADM (ImageNet-64).

Parameter counts are computed with jax.eval_shape (no memory, no FLOPs) and
compared with the published numbers; the deep variants are checked against an
independent count of the blocks they add. Resampling and attention are checked
against independent implementations (lax convolutions, numpy), the knobs
(bf16, remat, attention implementation) against the plain float32 network.
"""

import functools
import importlib.util
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from consistency_jax import experiment, methods
from consistency_jax.models import count_params, create_model, trainable_mask
from consistency_jax.models.adm import ADM
from consistency_jax.models.layers import (
    FourierEmbedding,
    ResBlock,
    fir_downsample,
    fir_filter,
    fir_upsample,
    multi_head_attention,
)
from consistency_jax.models.ncsnpp import NCSNpp
from consistency_jax.state import update_emas
from tests.helpers import jit_init

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"

# Published / reference counts. The CM JAX code counts NCSN++'s 128 Fourier frequencies (a frozen
# param there and here); EDM's SongUNet (the PyTorch peer, BENCHMARKS.md) keeps them as a buffer.
NCSNPP_CIFAR10_PARAMS = 56_395_651  # CM JAX (openai/consistency_models_cifar10)
NCSNPP_CIFAR10_TRAINED_PARAMS = 56_395_523  # EDM SongUNet / BENCHMARKS.md
DDPMPP_CIFAR10_PARAMS = 55_732_739  # positional embedding: no frequencies
SMALL_NCSNPP_TRAINED_PARAMS = 1_777_635  # BENCHMARKS.md; plus 32 frozen frequencies
ADM_IMAGENET64_PUBLISHED_PARAMS = 295.9e6  # EDM / CM, class-conditional ADM at 64x64

DDPMPP = dict(embedding_type="positional", progressive_input="none", resample_filter=(1, 1))
SMALL_NCSNPP = dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,))
TINY_NCSNPP = dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
TINY_ADM = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                num_head_channels=16, num_classes=10)


def param_shapes(model, image_shape, with_labels=False):
    x = jnp.zeros((1, *image_shape))
    labels = jnp.zeros((1,), jnp.int32) if with_labels else None
    return jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x, jnp.zeros((1,)), labels,
                                             train=False))["params"]


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def random_params(model, image_shape, with_labels=False, seed=0):
    """Params with every leaf random, so zero-initialised output layers do not hide the network."""
    shapes = param_shapes(model, image_shape, with_labels)
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def draw(key, leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
        scale = 1.0 / math.sqrt(fan_in) if len(leaf.shape) > 1 else 0.1
        return scale * jax.random.normal(key, leaf.shape, jnp.float32)

    return jax.tree_util.tree_unflatten(treedef, [draw(k, leaf) for k, leaf in zip(keys, leaves)])


def inputs(batch, image_shape, seed=1):
    x = jax.random.normal(jax.random.key(seed), (batch, *image_shape))
    noise_labels = jnp.linspace(-1.5, 1.1, batch)  # ln(sigma)/4 over [0.002, 80]
    return x, noise_labels


@functools.lru_cache(maxsize=None)
def jitted_apply(model, train: bool):
    """Jitted model.apply, one compile per (model, train); eager Flax is much slower on CPU."""
    def apply(params, x, noise_labels, class_labels, dropout_key):
        return model.apply({"params": params}, x, noise_labels, class_labels, train=train,
                           rngs={"dropout": dropout_key})
    return jax.jit(apply)


def forward(model, params, x, noise_labels, class_labels=None, dropout_seed=None):
    """Eval pass, or a train pass (dropout on) with the given dropout seed."""
    train = dropout_seed is not None
    key = jax.random.key(dropout_seed if train else 0)
    return jitted_apply(model, train)(params, x, noise_labels, class_labels, key)


def rel_err(a, b) -> float:
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


# ----------------------------------------------------------------------------- resampling


def depthwise_reference(x, taps, *, stride=1, lhs_dilation=1, padding):
    """FIR resampling as a lax depthwise convolution with the 2-D outer-product kernel."""
    f = np.asarray(taps, np.float64)
    kernel = np.outer(f, f) / f.sum() ** 2 * lhs_dilation**2
    channels = x.shape[-1]
    kernel = jnp.asarray(np.tile(kernel[:, :, None, None], (1, 1, 1, channels)), jnp.float32)
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(padding, padding)] * 2,
                                        lhs_dilation=(lhs_dilation, lhs_dilation),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=channels)


@pytest.mark.parametrize("taps", [(1, 1), (1, 3, 3, 1)])
def test_fir_resampling_matches_depthwise_convolution(taps):
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    pad = (len(taps) - 1) // 2
    down = fir_downsample(x, taps)
    assert down.shape == (2, 4, 4, 3)
    np.testing.assert_allclose(down, depthwise_reference(x, taps, stride=2, padding=pad), atol=1e-6)
    # A transposed conv (stride 2, padding p) is a conv of the 2x-dilated input padded by len-1-p.
    up = fir_upsample(x, taps)
    assert up.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(up, depthwise_reference(x, taps, lhs_dilation=2, padding=len(taps) - 1 - pad),
                               atol=1e-6)
    np.testing.assert_allclose(fir_filter(x, taps, pad + 1), depthwise_reference(x, taps, padding=pad + 1),
                               atol=1e-6)


def test_box_filter_is_average_pool_and_nearest_upsampling():
    x = jax.random.normal(jax.random.key(0), (1, 4, 6, 2))
    np.testing.assert_allclose(fir_downsample(x, (1, 1)), x.reshape(1, 2, 2, 3, 2, 2).mean(axis=(2, 4)), atol=1e-6)
    np.testing.assert_allclose(fir_upsample(x, (1, 1)), jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), atol=1e-6)
    # FIR [1, 3, 3, 1] keeps a constant image constant away from the zero-padded border.
    up = fir_upsample(jnp.ones((1, 4, 4, 1)), (1, 3, 3, 1))
    np.testing.assert_allclose(up[0, 1:-1, 1:-1, 0], 1.0, atol=1e-6)


def test_bad_resample_filter_is_rejected():
    with pytest.raises(ValueError, match="even-length"):
        fir_downsample(jnp.ones((1, 4, 4, 1)), (1, 2, 1))


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("impl", ["xla", "dot_product_attention"])
def test_attention_matches_numpy_softmax(impl):
    q, k, v = (np.asarray(jax.random.normal(key, (2, 6, 3, 4))) for key in jax.random.split(jax.random.key(0), 3))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0  # 1/sqrt(head_dim = 4)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bhqk,bkhd->bqhd", weights, v)
    np.testing.assert_allclose(multi_head_attention(q, k, v, impl), expected, atol=1e-5)


def test_unknown_attention_impl_is_rejected():
    with pytest.raises(ValueError, match="attention_impl"):
        NCSNpp(**TINY_NCSNPP, attention_impl="flash").init(jax.random.key(0), *inputs(1, (8, 8, 3)), train=False)


# ----------------------------------------------------------------------------- res block


def test_res_block_starts_as_its_skip_path():
    """conv1 is zero-initialised, so a fresh block returns skip_scale * skip(x)."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    emb = jax.random.normal(jax.random.key(1), (2, 32))
    same = ResBlock(16, skip_scale=0.5)
    params = same.init(jax.random.key(2), x, emb)
    np.testing.assert_allclose(same.apply(params, x, emb), 0.5 * x, atol=1e-6)

    down = ResBlock(16, resample="down", resample_filter=(1, 3, 3, 1), project_resampled_skip=True)
    params = down.init(jax.random.key(2), x, emb)
    skip = params["params"]["skip"]
    expected = jnp.einsum("bhwc,cd->bhwd", fir_downsample(x, (1, 3, 3, 1)), skip["kernel"][0, 0]) + skip["bias"]
    np.testing.assert_allclose(down.apply(params, x, emb), expected, atol=1e-5)


# ----------------------------------------------------------------------------- parameter counts


def ncsnpp_block_params(cin: int, cout: int, emb: int) -> int:
    """One NCSN++ res block: 2 GroupNorms, 2 3x3 convs, embedding bias, 1x1 skip when channels change."""
    skip = cin * cout + cout if cin != cout else 0
    return 2 * cin + 9 * cin * cout + cout + emb * cout + cout + 2 * cout + 9 * cout * cout + cout + skip


def adm_block_params(cin: int, cout: int, emb: int) -> int:
    """One ADM res block: as NCSN++'s but the embedding gives scale and shift (2 * cout)."""
    return ncsnpp_block_params(cin, cout, emb) + emb * cout + cout


def attention_params(c: int) -> int:
    return 2 * c + 3 * c * c + 3 * c + c * c + c


def test_ncsnpp_cifar10_param_count():
    """56,395,651 as the CM JAX code counts: 56,395,523 trained (EDM's count) + 128 frozen frequencies."""
    shapes = param_shapes(NCSNpp(), (32, 32, 3))
    assert count(shapes) == NCSNPP_CIFAR10_PARAMS
    assert count_params(shapes, trainable_only=True) == NCSNPP_CIFAR10_TRAINED_PARAMS
    assert shapes["noise_embed"]["freqs"].shape == (128,)


def test_ddpmpp_and_small_ncsnpp_param_counts_match_the_benchmark_peer():
    assert count(param_shapes(NCSNpp(**DDPMPP), (32, 32, 3))) == DDPMPP_CIFAR10_PARAMS
    small = param_shapes(NCSNpp(**SMALL_NCSNPP), (32, 32, 3))
    assert count_params(small, trainable_only=True) == SMALL_NCSNPP_TRAINED_PARAMS
    assert count(small) == SMALL_NCSNPP_TRAINED_PARAMS + 32


def test_ncsnpp_deep_adds_exactly_the_extra_blocks():
    base = count(param_shapes(NCSNpp(), (32, 32, 3)))
    deep = count(param_shapes(NCSNpp(num_res_blocks=8), (32, 32, 3)))
    # 4 more blocks per level in the encoder (256 -> 256; attention too at 16x16) and the
    # decoder (256 + 256 skip -> 256), 3 levels.
    extra = 3 * 4 * (ncsnpp_block_params(256, 256, 512) + ncsnpp_block_params(512, 256, 512))
    extra += 4 * attention_params(256)
    assert deep - base == extra
    assert 97e6 < deep < 98e6


def test_adm_imagenet64_param_count():
    n = count(param_shapes(ADM(num_classes=1000), (64, 64, 3), with_labels=True))
    assert abs(n - ADM_IMAGENET64_PUBLISHED_PARAMS) / ADM_IMAGENET64_PUBLISHED_PARAMS < 1e-3
    # The null class adds one row of 4 * 192 to the published embedding table.
    unconditional = count(param_shapes(ADM(), (64, 64, 3)))
    assert n - unconditional == 1001 * 768


def test_adm_deep_adds_exactly_the_extra_blocks():
    base = count(param_shapes(ADM(num_classes=1000), (64, 64, 3), with_labels=True))
    deep = count(param_shapes(ADM(num_classes=1000, num_res_blocks=6), (64, 64, 3), with_labels=True))
    extra = 0
    for res, channels in zip((64, 32, 16, 8), (192, 384, 576, 768)):
        per_level = adm_block_params(channels, channels, 768) + adm_block_params(2 * channels, channels, 768)
        if res in (32, 16, 8):  # attention after every block, encoder and decoder
            per_level += 2 * attention_params(channels)
        extra += 3 * per_level
    assert deep - base == extra


# ----------------------------------------------------------------------------- initialisation (iCT issue items 2, 3)


def uniform_bound_and_variance(kernel) -> tuple[float, float]:
    kernel = np.asarray(kernel, np.float64)
    return float(np.abs(kernel).max()), float(kernel.var())


@pytest.fixture(scope="module")
def tiny_ncsnpp_init():
    """Freshly initialised tiny NCSN++ params (attention at 4x4 with C = 32; 16 Fourier frequencies)."""
    return jitted_init(NCSNpp(**TINY_NCSNPP, fourier_scale=2.0), (8, 8, 3))


def jitted_init(model, image_shape, with_labels=False):
    """model.init compiled as one program: eager init compiles every op on its own (several times slower)."""
    labels = jnp.zeros((1,), jnp.int32) if with_labels else None
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, *image_shape)), jnp.zeros((1,)), labels,
                                          train=False)["params"])
    return init(jax.random.key(0))


def test_ncsnpp_attention_qkv_init_is_cm_jax_nin(tiny_ncsnpp_init):
    """q, k, v ~ U with variance 0.1 / C, as CM JAX's NIN(C) (variance_scaling(0.1, fan_avg, uniform) on a
    [C, C] kernel, jcm/models/layers.py) and EDM SongUNet's xavier_uniform * sqrt(0.2) on the fused [C, 3C]."""
    kernel = np.asarray(tiny_ncsnpp_init["enc4_attn0"]["qkv"]["kernel"])
    channels = kernel.shape[0]
    assert kernel.shape == (channels, 3 * channels) and channels == 32
    for block in np.split(kernel, 3, axis=1):  # q, k, v
        bound, variance = uniform_bound_and_variance(block)
        expected_bound = math.sqrt(3 * 0.1 / channels)  # U(-b, b) has variance b^2 / 3
        assert 0.97 * expected_bound < bound <= expected_bound
        assert variance == pytest.approx(0.1 / channels, rel=0.1)


def test_adm_init_follows_pytorch_defaults_and_unit_label_embedding():
    """ADM (cm/unet.py): nn.Embedding rows ~ N(0, 1); the fused qkv keeps PyTorch's U(+-1/sqrt(fan_in))."""
    params = jitted_init(ADM(**TINY_ADM), (8, 8, 3), with_labels=True)
    table = np.asarray(params["label_embed"]["embedding"], np.float64)
    assert table.shape == (11, 128)
    assert table.std() == pytest.approx(1.0, rel=0.1) and abs(table.mean()) < 0.1
    kernel = np.asarray(params["enc4_attn0"]["qkv"]["kernel"])
    bound, _ = uniform_bound_and_variance(kernel)
    assert 0.97 / math.sqrt(kernel.shape[0]) < bound <= 1 / math.sqrt(kernel.shape[0])


def res_block_dropouts(model, image_shape=(8, 8, 3)):
    """{block name: dropout rate} of every res block, read while tracing init (nothing is computed)."""
    rates = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, ResBlock) and context.method_name == "__call__":
            rates[context.module.name] = context.module.dropout
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), jnp.zeros((1,)),
                                          jnp.zeros((1,), jnp.int32), train=True))
    return rates


def test_adm_dropout_max_resolution_limits_dropout_to_those_feature_maps():
    everywhere = res_block_dropouts(ADM(**TINY_ADM, dropout=0.2))
    assert set(everywhere.values()) == {0.2} and len(everywhere) == 10
    low = res_block_dropouts(ADM(**TINY_ADM, dropout=0.2, dropout_max_resolution=4))
    # By output resolution: the down block into 4x4 has it, the up block out of 4x4 does not.
    assert {name for name, rate in low.items() if rate} == {
        "enc8_down", "enc4_block0", "mid4_block0", "mid4_block1", "dec4_block0", "dec4_block1"}


# ----------------------------------------------------------------------------- frozen Fourier frequencies (item 8)


def test_fourier_frequencies_are_params_drawn_from_the_init_rng(tiny_ncsnpp_init):
    freqs = np.asarray(tiny_ncsnpp_init["noise_embed"]["freqs"])
    assert freqs.shape == (16,) and freqs.dtype == np.float32  # model_channels of them
    assert 1.0 < freqs.std() < 3.0  # N(0, scale^2) with scale 2
    embed = FourierEmbedding(8, scale=2.0)
    labels = jnp.array([-1.5, 0.3])
    draws = [np.asarray(embed.init(jax.random.key(k), labels)["params"]["freqs"]) for k in (0, 1)]
    assert not np.array_equal(*draws)
    # The features use the stored frequencies, whatever they are (e.g. converted from EDM's `freqs` buffer).
    stored = np.array([0.3, -1.2, 2.5, 7.0], np.float32)
    angles = 2 * np.pi * np.asarray(labels)[:, None] * stored[None, :]
    np.testing.assert_allclose(embed.apply({"params": {"freqs": stored}}, labels),
                               np.concatenate([np.cos(angles), np.sin(angles)], -1), atol=1e-5)



def test_fourier_frequencies_are_restored_from_a_checkpoint(tiny_ncsnpp_init, tmp_path):
    """A checkpoint brings back its own frequencies, not the ones a fresh init would draw."""
    from consistency_jax import checkpointing

    saved = {"params": jax.tree.map(np.asarray, tiny_ncsnpp_init)}
    checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    checkpointer.save(1, saved, {})
    checkpointer._manager.wait_until_finished()
    other = jax.eval_shape(lambda: {"params": tiny_ncsnpp_init})  # the structure a resumed run restores into
    _, restored, _ = checkpointer.restore(other)
    np.testing.assert_array_equal(np.asarray(restored["params"]["noise_embed"]["freqs"]),
                                  saved["params"]["noise_embed"]["freqs"])
    fresh = FourierEmbedding(16, scale=2.0).init(jax.random.key(1), jnp.zeros((1,)))["params"]["freqs"]
    assert not np.array_equal(np.asarray(fresh), saved["params"]["noise_embed"]["freqs"])

class _EmbedThenDense(nn.Module):
    @nn.compact
    def __call__(self, noise_labels):
        return nn.Dense(4, name="dense")(FourierEmbedding(8, scale=2.0, name="noise_embed")(noise_labels))


def test_fourier_frequencies_get_exactly_zero_gradient_and_never_move():
    model, labels = _EmbedThenDense(), jnp.array([-1.5, 0.3, 1.0])
    params = model.init(jax.random.key(0), labels)["params"]
    grad_fn = jax.grad(lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, labels))))
    grads = grad_fn(params)
    assert np.all(np.asarray(grads["noise_embed"]["freqs"]) == 0)
    assert float(jnp.abs(grads["dense"]["kernel"]).max()) > 0
    mask = trainable_mask(params)
    assert mask["noise_embed"]["freqs"] is False and mask["dense"]["kernel"] is True

    # Every optimizer, with weight decay and clipping, leaves them bit for bit; so do the EMAs.
    for name, decay in (("adam", 0.0), ("radam", 0.0), ("adamw", 0.1)):
        opt_config = load_config("cifar10_ict").optimizer
        opt_config.update(dict(name=name, weight_decay=decay, grad_clip_norm=1.0, learning_rate=1e-2))
        optimizer = experiment.create_optimizer(opt_config, num_steps=10)
        state, current, emas = optimizer.init(params), params, (params,)
        for _ in range(3):
            updates, state = optimizer.update(grad_fn(current), state, current)
            current = optax.apply_updates(current, updates)
            emas = update_emas(emas, current, (0.9,))
        np.testing.assert_array_equal(current["noise_embed"]["freqs"], params["noise_embed"]["freqs"], name)
        np.testing.assert_array_equal(emas[0]["noise_embed"]["freqs"], params["noise_embed"]["freqs"], name)
        assert not np.array_equal(current["dense"]["kernel"], params["dense"]["kernel"]), name


def test_emas_of_a_constant_stay_bit_identical():
    """The form ema + (1 - r)(p - ema): rate * ema + (1 - rate) * p drifts by rounding (seen at r = 0.9)."""
    constant = jax.random.normal(jax.random.key(0), (4096,)) * 0.02
    emas = (constant, constant)
    step = jax.jit(lambda e: update_emas(e, constant, (0.9, 0.99993)))
    for _ in range(20):
        emas = step(emas)
    for ema in emas:
        np.testing.assert_array_equal(ema, constant)


def test_cifar10_ict_noise_embedding_input_is_the_cm_jax_formula():
    """CM JAX (jcm/models/utils.py) feeds 0.25 * log(sigma) into GaussianFourierProjection(scale=...), whose
    features are [sin, cos](2 pi t W) with W ~ N(0, scale^2); iCT's scale is 0.02."""
    config = load_config("cifar10_ict")
    config.model.update(dict(channel_mult=(1,), num_res_blocks=1, attn_resolutions=()))  # small, same embedding
    fn = methods.get_method(config.method.name).make_function(config, create_model(config.model))
    params = jit_init(fn, 0, (4, 4, 3))
    freqs = np.asarray(params["noise_embed"]["freqs"], np.float64)
    assert freqs.shape == (128,) and 0.015 < freqs.std() < 0.025  # N(0, 0.02^2)

    @jax.jit
    def embedding_input_and_output(params, sigma):
        captured = {}

        def capture(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if isinstance(context.module, FourierEmbedding) and context.method_name == "__call__":
                captured["input"], captured["features"] = args[0], out
            return out

        with nn.intercept_methods(capture):
            fn(params, jnp.zeros((3, 4, 4, 3)), sigma)
        return captured["input"], captured["features"]

    sigma = np.array([0.002, 0.5, 80.0])
    embedding_input, features = embedding_input_and_output(params, jnp.asarray(sigma, jnp.float32))
    cond_t = 0.25 * np.log(sigma)  # CM JAX's cond_t
    np.testing.assert_allclose(embedding_input, cond_t, rtol=1e-6)
    angles = 2 * np.pi * cond_t[:, None] * freqs[None, :]
    # Same features as CM JAX's [sin, cos] up to the order of the halves (EDM's order, cos first).
    np.testing.assert_allclose(features, np.concatenate([np.cos(angles), np.sin(angles)], -1),
                               atol=1e-5)


# ----------------------------------------------------------------------------- forward passes


def test_ncsnpp_cifar10_forward_batch2():
    model = NCSNpp()
    x, noise = inputs(2, (32, 32, 3))
    params = random_params(model, (32, 32, 3))
    apply = jax.jit(lambda p, x, n: model.apply({"params": p}, x, n, train=False))
    out = apply(params, x, noise)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 1e-3
    # The noise label matters, and each example only sees its own label.
    swapped = apply(params, x[::-1], noise[::-1])
    np.testing.assert_allclose(swapped[::-1], out, rtol=1e-4, atol=1e-4)
    assert rel_err(apply(params, x, noise[::-1]), out) > 1e-3


@pytest.mark.parametrize("image_size", [8, 16])
def test_small_ncsnpp_runs_on_small_images(image_size):
    model = NCSNpp(**dict(SMALL_NCSNPP, attn_resolutions=(image_size // 2,)))
    x, noise = inputs(2, (image_size, image_size, 1))
    params = random_params(model, (image_size, image_size, 1))
    out = forward(model, params, x, noise)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))


def test_image_size_not_divisible_is_rejected():
    with pytest.raises(ValueError, match="divisible by 4"):
        NCSNpp(**SMALL_NCSNPP).init(jax.random.key(0), *inputs(1, (10, 10, 3)), train=False)


def test_dropout_uses_the_dropout_rng():
    model = NCSNpp(**TINY_NCSNPP, dropout=0.5)
    x, noise = inputs(2, (8, 8, 3))
    params = random_params(model, (8, 8, 3))
    np.testing.assert_array_equal(forward(model, params, x, noise, dropout_seed=0),
                                  forward(model, params, x, noise, dropout_seed=0))
    eval_out = forward(model, params, x, noise)
    assert rel_err(forward(model, params, x, noise, dropout_seed=0), eval_out) > 1e-3
    assert rel_err(forward(model, params, x, noise, dropout_seed=0),
                   forward(model, params, x, noise, dropout_seed=1)) > 1e-3


@pytest.mark.parametrize("cls", [NCSNpp, ADM])
def test_class_conditioning_with_null_class(cls):
    kwargs = dict(TINY_ADM) if cls is ADM else dict(TINY_NCSNPP, num_classes=10)
    model = cls(**kwargs)
    x, noise = inputs(2, (8, 8, 3))
    params = random_params(model, (8, 8, 3), with_labels=True)
    assert params["label_embed"]["embedding"].shape[0] == 11  # 10 classes + the null class
    out = {c: forward(model, params, x, noise, jnp.full((2,), c, jnp.int32)) for c in (3, 5, 10)}
    assert rel_err(out[3], out[5]) > 1e-3 and rel_err(out[10], out[3]) > 1e-3
    with pytest.raises(ValueError, match="class-conditional"):
        model.apply({"params": params}, x, noise, train=False)
    with pytest.raises(ValueError, match="unconditional"):
        cls(**dict(kwargs, num_classes=0)).init(jax.random.key(0), x, noise, jnp.zeros((2,), jnp.int32),
                                                train=False)


# ----------------------------------------------------------------------------- knobs


KNOB_CASES = [(NCSNpp, dict(TINY_NCSNPP, num_classes=10)), (ADM, TINY_ADM)]


@pytest.mark.parametrize("cls,kwargs", KNOB_CASES, ids=["ncsnpp", "adm"])
def test_knobs_keep_the_param_tree(cls, kwargs):
    reference = jax.tree_util.tree_structure(param_shapes(cls(**kwargs), (8, 8, 3), True))
    for knob in (dict(dtype="bfloat16"), dict(remat=True), dict(attention_impl="dot_product_attention")):
        shapes = param_shapes(cls(**kwargs, **knob), (8, 8, 3), True)
        assert jax.tree_util.tree_structure(shapes) == reference, knob
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(shapes)), knob


@pytest.mark.parametrize("cls,kwargs", KNOB_CASES, ids=["ncsnpp", "adm"])
def test_remat_leaves_outputs_and_grads_unchanged(cls, kwargs):
    x, noise = inputs(2, (8, 8, 3))
    labels = jnp.array([1, 10], jnp.int32)
    params = random_params(cls(**kwargs), (8, 8, 3), with_labels=True)

    def output_and_grad(model):
        def loss(p):
            out = model.apply({"params": p}, x, noise, labels, train=True, rngs={"dropout": jax.random.key(3)})
            return jnp.mean(out**2), out
        (_, out), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return out, grad

    # Dropout on: the recomputed forward pass must redraw the same mask.
    out, grad = output_and_grad(cls(**kwargs, dropout=0.2))
    out_remat, grad_remat = output_and_grad(cls(**kwargs, dropout=0.2, remat=True))
    np.testing.assert_allclose(out_remat, out, rtol=1e-5, atol=1e-5)
    for g_remat, g in zip(jax.tree_util.tree_leaves(grad_remat), jax.tree_util.tree_leaves(grad)):
        np.testing.assert_allclose(g_remat, g, rtol=1e-4, atol=1e-6)


def outputs_with_and_without(cls, kwargs, **knob):
    """Forward passes of the same random params without and with a knob set."""
    x, noise = inputs(2, (8, 8, 3))
    labels = jnp.array([1, 10], jnp.int32)
    params = random_params(cls(**kwargs), (8, 8, 3), with_labels=True)
    return (forward(cls(**kwargs), params, x, noise, labels),
            forward(cls(**kwargs, **knob), params, x, noise, labels))


@pytest.mark.parametrize("cls,kwargs", KNOB_CASES, ids=["ncsnpp", "adm"])
def test_dot_product_attention_leaves_outputs_unchanged(cls, kwargs):
    out, out_dpa = outputs_with_and_without(cls, kwargs, attention_impl="dot_product_attention")
    np.testing.assert_allclose(out_dpa, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls,kwargs", KNOB_CASES, ids=["ncsnpp", "adm"])
def test_bfloat16_compute_stays_close_to_float32(cls, kwargs):
    out32, out16 = outputs_with_and_without(cls, kwargs, dtype="bfloat16")
    assert out16.dtype == jnp.float32  # cast back to the input dtype
    # bfloat16 keeps 8 mantissa bits (~0.4% per op); a few percent after the whole network.
    assert rel_err(out16, out32) < 0.05
    assert rel_err(out16, out32) > 0  # the knob really changes the arithmetic


def test_unknown_dtype_is_rejected():
    with pytest.raises(ValueError, match="compute dtype"):
        NCSNpp(**TINY_NCSNPP, dtype="float16").init(jax.random.key(0), *inputs(1, (8, 8, 3)), train=False)


# ----------------------------------------------------------------------------- configs


def load_config(name: str):
    """Loads a config file by path, as ml_collections' config_flags does."""
    spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIG_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# (config, expected params, image shape, 1-step FID, 2-step FID).
PAPER_CONFIGS = [
    ("cifar10_ict", NCSNPP_CIFAR10_PARAMS, (32, 32, 3), 2.83, 2.46),
    ("cifar10_ict_deep", None, (32, 32, 3), 2.51, 2.24),
    ("imagenet64_ict", None, (64, 64, 3), 4.02, 3.20),
    ("imagenet64_ict_deep", None, (64, 64, 3), 3.25, 2.77),
]


@pytest.mark.parametrize("name,params,image_shape,fid1,fid2", PAPER_CONFIGS, ids=[c[0] for c in PAPER_CONFIGS])
def test_paper_config_loads_and_builds(name, params, image_shape, fid1, fid2):
    config = load_config(name)
    assert (config.data.image_size, config.data.image_size, config.data.num_channels) == image_shape
    model = create_model(config.model)
    n = count(param_shapes(model, image_shape, with_labels=config.data.num_classes > 0))
    if name == "cifar10_ict":
        assert n == params
    elif name == "cifar10_ict_deep":
        assert n == count(param_shapes(NCSNpp(num_res_blocks=8), image_shape))
    else:
        blocks = 6 if name.endswith("deep") else 3
        assert n == count(param_shapes(ADM(num_classes=1000, num_res_blocks=blocks), image_shape, True))
    doc = (CONFIG_DIR / f"{name}.py").read_text()
    assert f"--config=configs/{name}.py" in doc and f"{fid1:.2f}" in doc and f"{fid2:.2f}" in doc
    assert config.eval.feature_extractor == "inception" and config.eval.num_samples == 50000


def test_ict_configs_follow_the_spec():
    cifar, imagenet = load_config("cifar10_ict"), load_config("imagenet64_ict")
    assert cifar.method.name == imagenet.method.name == "ict"
    assert (cifar.method.s0, cifar.method.s1, cifar.method.p_mean, cifar.method.p_std) == (10, 1280, -1.1, 2.0)
    assert (cifar.training.batch_size, cifar.training.num_steps) == (1024, 400_000)
    assert (imagenet.training.batch_size, imagenet.training.num_steps) == (4096, 800_000)
    assert cifar.optimizer.name == "radam" and cifar.optimizer.learning_rate == 1e-4
    assert tuple(cifar.training.ema_rates) == (0.99993,) and tuple(imagenet.training.ema_rates) == (0.99997,)
    assert cifar.model.dropout == 0.3 and imagenet.model.dropout == 0.2
    assert (cifar.sampling.mid_sigma, imagenet.sampling.mid_sigma) == (0.821, 1.526)
    assert cifar.model.embedding_type == "fourier" and imagenet.model.embedding_type == "positional"
    assert imagenet.data.num_classes == imagenet.model.num_classes == 1000
    # ILSVRC2012 with ADM's centre crop (data/ilsvrc.py), not TFDS's squashed imagenet_resized.
    assert imagenet.data.name == "array_shards"
    assert cifar.sampling.clip_denoised and imagenet.sampling.clip_denoised  # CM's karras_sample
    # float32: bfloat16 measured to break the adjacent-sigma loss (benchmarks/bf16_consistency.py, issue 9 item 7).
    assert cifar.model.dtype == imagenet.model.dtype == "float32"


# ----------------------------------------------------------------------------- slow: full-size ADM


@pytest.mark.slow
@pytest.mark.parametrize("num_res_blocks", [3, 6], ids=["adm", "adm_deep"])
def test_adm_imagenet64_forward_batch2(num_res_blocks):
    model = ADM(num_classes=1000, num_res_blocks=num_res_blocks)
    x, noise = inputs(2, (64, 64, 3))
    labels = jnp.array([7, 1000], jnp.int32)
    params = random_params(model, (64, 64, 3), with_labels=True)
    apply = jax.jit(lambda p, x, n, c: model.apply({"params": p}, x, n, c, train=False))
    out = apply(params, x, noise, labels)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(out[1:], apply(params, x[1:], noise[1:], labels[1:]), rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_ncsnpp_deep_forward_batch2():
    model = NCSNpp(num_res_blocks=8)
    x, noise = inputs(2, (32, 32, 3))
    out = forward(model, random_params(model, (32, 32, 3)), x, noise)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
