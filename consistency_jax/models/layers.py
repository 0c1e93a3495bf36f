"""Building blocks shared by the networks."""

import functools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


# Names of params that are constants of the network: they live in the 'params'
# collection, so they are drawn from the init rng, checkpointed, restored,
# sharded and converted from other code bases like every other weight, but the
# module reads them through jax.lax.stop_gradient (their gradient is exactly 0,
# so Adam/RAdam updates are exactly 0) and `models.trainable_mask` keeps them out
# of weight decay. The CM JAX code keeps its Fourier frequencies the same way
# (a param under stop_gradient), which is why its NCSN++ counts 56,395,651
# parameters; EDM's PyTorch networks store them as buffers (`freqs`).
# Chosen over a separate non-trainable collection: every consumer of the params
# (train state, EMAs, checkpoints, FSDP rules, teachers, conversion) handles
# them with no extra code path.
FROZEN_PARAM_NAMES = frozenset({"freqs", "phases"})  # phases: EDM2's MPFourier (models/edm2.py)


def frozen_param(module: nn.Module, name: str, init: Callable[..., jax.Array], shape: tuple[int, ...]) -> jax.Array:
    """A float32 param of `module` that is never trained (see FROZEN_PARAM_NAMES)."""
    if name not in FROZEN_PARAM_NAMES:
        raise ValueError(f"Frozen params must be named one of {sorted(FROZEN_PARAM_NAMES)}, got {name!r}.")
    return jax.lax.stop_gradient(module.param(name, init, shape, jnp.float32))


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2 pi c f), sin(2 pi c f)] of the noise label c (NCSN++ / iCT).

    The frequencies f ~ N(0, scale^2) are the frozen param `freqs` (see
    FROZEN_PARAM_NAMES), drawn from the init rng. iCT lowers the scale from 16
    to 0.02 on CIFAR-10 (lower sensitivity to the exact noise level), with the
    CM JAX code's noise label c = ln(sigma) / 4 (c_noise='edm'): its
    jcm/models/utils.py passes 0.25 * log(sigma) straight into the projection.
    """

    features: int
    scale: float = 16.0

    @nn.compact
    def __call__(self, noise_labels: jax.Array) -> jax.Array:
        freqs = frozen_param(self, "freqs", nn.initializers.normal(self.scale), (self.features // 2,))
        angles = 2 * math.pi * noise_labels[:, None].astype(jnp.float32) * freqs[None, :]
        return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class PositionalEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of the noise label (DDPM++ / ADM), [cos, sin].

    Frequencies max_positions^(-i / half) for i < half (ADM's timestep_embedding);
    with `endpoint` max_positions^(-i / (half - 1)), so the last one is exactly
    1 / max_positions: DDPM++ (score_sde's get_timestep_embedding, EDM's
    PositionalEmbedding(endpoint=True) in SongUNet).
    """

    features: int
    max_positions: int = 10000
    endpoint: bool = False

    @nn.compact
    def __call__(self, noise_labels: jax.Array) -> jax.Array:
        half = self.features // 2
        # float32 at least (the sinusoids' arguments can be large); float64 labels stay float64.
        dtype = jnp.promote_types(noise_labels.dtype, jnp.float32)
        steps = jnp.arange(half, dtype=dtype) / (half - 1 if self.endpoint else half)
        freqs = (1 / self.max_positions) ** steps
        angles = noise_labels[:, None].astype(dtype) * freqs[None, :]
        return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def noise_embedding(kind: str, features: int, fourier_scale: float, name: str | None = None, *,
                    positional_endpoint: bool = False) -> nn.Module:
    if kind == "fourier":
        return FourierEmbedding(features, scale=fourier_scale, name=name)
    if kind == "positional":
        return PositionalEmbedding(features, endpoint=positional_endpoint, name=name)
    raise ValueError(f"Unknown noise embedding {kind!r}; valid: 'fourier', 'positional'.")


# ---------------------------------------------------------------------------
# Building blocks of the paper-scale networks (ncsnpp.py, adm.py).

# 'float64' only runs in float64 with jax_enable_x64 (numerical tests, e.g. JVPs against finite differences).
COMPUTE_DTYPES = ("float32", "bfloat16", "float64")
ATTENTION_IMPLS = ("xla", "dot_product_attention")

Initializer = Callable[..., jax.Array]
# score_sde / NCSN++ default: Glorot-uniform style fan-average scaling.
fan_avg_uniform: Initializer = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
# PyTorch's default conv/linear init, as in ADM: U(+-1/sqrt(fan_in)).
torch_default_uniform: Initializer = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros_init: Initializer = nn.initializers.zeros
# PyTorch's nn.Embedding default, N(0, 1): ADM's label embedding (CM's cm/unet.py,
# EDM's DhariwalUNet map_label). Flax's nn.Embed default is N(0, 1/features).
unit_normal: Initializer = nn.initializers.normal(1.0)


def compute_dtype(name: str) -> jnp.dtype:
    """The activation dtype named by a model's `dtype` field (params stay float32)."""
    check_choice("compute dtype", name, COMPUTE_DTYPES)
    return jnp.dtype(name)


def check_choice(field: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"Unknown {field} {value!r}; valid: {', '.join(repr(v) for v in valid)}.")


def check_image_and_labels(x: jax.Array, noise_labels: jax.Array, class_labels: jax.Array | None,
                           num_classes: int, num_downsamples: int) -> None:
    """Shape checks shared by the U-Nets, with messages that say what is valid."""
    if x.ndim != 4:
        raise ValueError(f"x must be NHWC images [B, H, W, C]; got shape {x.shape}.")
    factor = 2**num_downsamples
    if x.shape[1] % factor or x.shape[2] % factor:
        raise ValueError(f"Image size {x.shape[1]}x{x.shape[2]} must be divisible by {factor} "
                         f"(the U-Net halves it {num_downsamples} times).")
    if noise_labels.shape != x.shape[:1]:
        raise ValueError(f"noise_labels must have shape [B] = {x.shape[:1]}; got {noise_labels.shape}.")
    if num_classes > 0:
        if class_labels is None:
            raise ValueError(f"This model is class-conditional (num_classes={num_classes}): pass class_labels "
                             f"in [0, {num_classes}], where {num_classes} is the null class.")
        if class_labels.shape != x.shape[:1]:
            raise ValueError(f"class_labels must have shape [B] = {x.shape[:1]}; got {class_labels.shape}.")
    elif class_labels is not None:
        raise ValueError("class_labels were given to an unconditional model; set num_classes > 0 to use them.")


# ---------------------------------------------------------------------------
# GroupNorm and convolutions in the form XLA's CPU backend runs fast. The maths
# are flax's nn.GroupNorm and lax.conv_general_dilated (float rounding aside:
# tests/test_numerics_pin.py pins the train step's values); params and their
# names are the same, so checkpoints and converted weights are unaffected.
# Profile and timings: benchmarks/README.md.


class GroupNorm(nn.Module):
    """flax.linen.GroupNorm (params 'scale', 'bias'), with its statistics reduced in two steps.

    Flax reduces x viewed as [B, H, W, groups, C/groups] over (H, W, C/groups)
    at once, which XLA CPU lowers as a slow strided reduction (a quarter of
    the one-step sampler's time on CPU); here the per-channel sums over H, W
    come first, then the per-group sums of those. Statistics are float32,
    Var = E[x^2] - E[x]^2 clipped at 0, as in flax; the output has `dtype`.
    """

    num_groups: int
    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"{self.num_groups} groups do not divide {channels} channels.")
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        spatial = tuple(range(1, x.ndim - 1))
        group_size = channels // self.num_groups
        count = group_size * math.prod(x.shape[1:-1])

        def group_mean(per_channel_sums: jax.Array) -> jax.Array:  # [B, C] -> the group's mean, [B, C]
            sums = per_channel_sums.reshape(x.shape[0], self.num_groups, group_size).sum(-1)
            return jnp.repeat(sums / count, group_size, axis=-1)

        mean = group_mean(jnp.sum(x32, axis=spatial))
        var = jnp.maximum(0.0, group_mean(jnp.sum(jnp.square(x32), axis=spatial)) - jnp.square(mean))
        per_example = (slice(None),) + (None,) * len(spatial) + (slice(None),)
        mul = jax.lax.rsqrt(var + self.epsilon)[per_example] * scale
        return ((x32 - mean[per_example]) * mul + bias).astype(self.dtype)


def group_norm(channels: int, eps: float, dtype: jnp.dtype, name: str | None = None) -> GroupNorm:
    """GroupNorm with min(32, C/4) groups (NCSN++, ADM and EDM all use this rule)."""
    return GroupNorm(num_groups=min(32, max(1, channels // 4)), epsilon=eps, dtype=dtype,
                     param_dtype=jnp.float32, name=name)


_NHWC_HWIO = jax.lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                         precision=None) -> jax.Array:
    """lax.conv_general_dilated, with 2-D convs whose kernel is larger than the image done as one matmul.

    XLA's CPU backend hands a conv to its fast library (YNNPACK) only when
    the kernel fits inside the unpadded input; a 3x3 conv on a 2x2 map (the
    quickstart's lowest level) and its input gradient otherwise run as a
    naive loop nest, ~10x slower than the same sums as a matmul over the
    zero-padded patches (im2col), which is what this does. Everything else
    goes to lax unchanged.
    """
    kernel = rhs.shape[:2]
    if (rhs.ndim == 4 and dimension_numbers == _NHWC_HWIO and tuple(window_strides) == (1, 1)
            and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))) and feature_group_count == 1
            and any(n < k for n, k in zip(lhs.shape[1:3], kernel))):
        return _conv_as_matmul(lhs, rhs, padding, precision)
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision)


def _conv_as_matmul(x: jax.Array, kernel: jax.Array, padding, precision) -> jax.Array:
    """Stride-1 NHWC x HWIO correlation as [B*H'*W', kh*kw*C] @ [kh*kw*C, O] (im2col)."""
    kh, kw, channels, features = kernel.shape
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(x.shape[1:3], (kh, kw), (1, 1), padding)
    x = jnp.pad(x, [(0, 0), *[tuple(p) for p in padding], (0, 0)])
    out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    # Patch feature order (i, j, c) matches the kernel's [kh, kw, C, O] flattened to [kh*kw*C, O].
    patches = jnp.concatenate([x[:, i:i + out_h, j:j + out_w, :] for i in range(kh) for j in range(kw)], axis=-1)
    out = jax.lax.dot_general(patches, kernel.reshape(kh * kw * channels, features),
                              (((3,), (0,)), ((), ())), precision=precision)
    return out


# flax's nn.Conv (same params and names) through `conv_general_dilated` above.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


def _normalized_taps(taps: Sequence[int]) -> np.ndarray:
    taps = np.asarray(taps, np.float64)
    if taps.ndim != 1 or len(taps) % 2 or taps.sum() <= 0:
        raise ValueError(f"resample_filter must be an even-length 1-D filter with positive sum, e.g. (1, 1) "
                         f"or (1, 3, 3, 1); got {tuple(taps)}.")
    return taps / taps.sum()


def _fir_along(x: jax.Array, taps: np.ndarray, axis: int, pad: tuple[int, int], stride: int) -> jax.Array:
    """Zero-pads `axis`, correlates it with `taps` and keeps every `stride`-th output.

    Written as a weighted sum of shifted slices rather than a depthwise conv:
    XLA fuses it with the neighbouring elementwise ops, and NCSN++'s forward
    pass on CPU ran ~20% faster this way than with lax depthwise convs.
    """
    widths = [(0, 0)] * x.ndim
    widths[axis] = pad
    padded = jnp.pad(x, widths)
    num_out = (padded.shape[axis] - len(taps)) // stride + 1
    out = None
    for offset, tap in enumerate(taps):
        piece = jax.lax.slice_in_dim(padded, offset, offset + (num_out - 1) * stride + 1, stride, axis)
        term = piece * jnp.asarray(tap, x.dtype)
        out = term if out is None else out + term
    return out


def fir_filter(x: jax.Array, taps: Sequence[int], pad: int) -> jax.Array:
    """Separable FIR filter (taps normalised to sum 1) over H and W of NHWC `x`, stride 1."""
    kernel = _normalized_taps(taps)
    for axis in (1, 2):
        x = _fir_along(x, kernel, axis, (pad, pad), 1)
    return x


def fir_downsample(x: jax.Array, taps: Sequence[int]) -> jax.Array:
    """2x downsampling with a separable FIR filter; (1, 1) is 2x2 average pooling.

    Pads (len - 1) // 2 on each side, as EDM's and score_sde's FIR resampling do.
    """
    kernel = _normalized_taps(taps)
    pad = (len(kernel) - 1) // 2
    for axis in (1, 2):
        x = _fir_along(x, kernel, axis, (pad, pad), 2)
    return x


def fir_upsample(x: jax.Array, taps: Sequence[int]) -> jax.Array:
    """2x upsampling with a separable FIR filter; (1, 1) is nearest-neighbour.

    The transposed convolution of EDM / score_sde (stride 2, padding (len-1)//2,
    gain 2 per axis) written as zero insertion followed by correlation with the
    flipped taps.
    """
    kernel = 2.0 * _normalized_taps(taps)[::-1]
    pad = (len(kernel) - 1) // 2
    for axis in (1, 2):
        # Interleave zeros after every sample: x0 0 x1 0 ... (length 2n).
        x = jnp.stack([x, jnp.zeros_like(x)], axis=axis + 1)
        shape = list(x.shape)
        x = x.reshape(shape[:axis] + [2 * shape[axis]] + shape[axis + 2:])
        x = _fir_along(x, kernel, axis, (len(kernel) - 1 - pad, len(kernel) - 2 - pad), 1)
    return x


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str) -> jax.Array:
    """Softmax attention over [B, T, heads, head_dim] inputs; logits and softmax in float32.

    'xla' is a plain einsum-softmax-einsum; 'dot_product_attention' calls
    jax.nn.dot_product_attention, which can dispatch to fused kernels (cuDNN).
    """
    check_choice("attention_impl", impl, ATTENTION_IMPLS)
    if impl == "dot_product_attention":
        return jax.nn.dot_product_attention(q, k, v)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.promote_types(q.dtype, jnp.float32))
    weights = jax.nn.softmax(logits / math.sqrt(q.shape[-1]), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block conditioned on an embedding (BigGAN-style up/down).

    `emb` is the already SiLU-activated conditioning vector [B, E]. With
    `scale_shift` (ADM) it sets a per-channel scale and shift of the second
    norm; otherwise (NCSN++) it is added as a bias before that norm. With
    `adaptive_double_norm` (sCM, Lu & Song 2024 section 4.1) the scale and the
    shift are pixel-normalised over the channels and replace AdaGN's:
    norm(h) * pnorm(scale) + pnorm(shift). Up/down
    blocks resample both the residual branch and the skip with the FIR filter.
    The skip gets a 1x1 conv when the channel count changes, and also on every
    up/down block when `project_resampled_skip` (NCSN++ BigGAN blocks).
    """

    out_channels: int
    resample: str = "none"  # 'none', 'up' or 'down'
    resample_filter: tuple[int, ...] = (1, 1)
    project_resampled_skip: bool = False
    scale_shift: bool = False
    adaptive_double_norm: bool = False
    dropout: float = 0.0
    skip_scale: float = 1.0
    eps: float = 1e-6
    deterministic: bool = True
    kernel_init: Initializer = fan_avg_uniform
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        check_choice("resample", self.resample, ("none", "up", "down"))
        in_channels = x.shape[-1]
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
        conv = functools.partial(Conv, dtype=self.dtype, param_dtype=jnp.float32)

        h = nn.silu(group_norm(in_channels, self.eps, self.dtype, name="norm0")(x))
        if self.resample == "up":
            h, x = fir_upsample(h, self.resample_filter), fir_upsample(x, self.resample_filter)
        elif self.resample == "down":
            h, x = fir_downsample(h, self.resample_filter), fir_downsample(x, self.resample_filter)
        h = conv(self.out_channels, (3, 3), kernel_init=self.kernel_init, name="conv0")(h)

        scale_shift = self.scale_shift or self.adaptive_double_norm
        num_emb = 2 * self.out_channels if scale_shift else self.out_channels
        emb_out = dense(num_emb, kernel_init=self.kernel_init, name="emb_proj")(emb)[:, None, None, :]
        norm1 = group_norm(self.out_channels, self.eps, self.dtype, name="norm1")
        if self.adaptive_double_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = nn.silu(norm1(h) * pixel_norm(scale) + pixel_norm(shift))
        elif scale_shift:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = nn.silu(norm1(h) * (1 + scale) + shift)
        else:
            h = nn.silu(norm1(h + emb_out))
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
        # Zero-initialised: every block starts as (a scaled) identity.
        h = conv(self.out_channels, (3, 3), kernel_init=zeros_init, name="conv1")(h)

        if in_channels != self.out_channels or (self.resample != "none" and self.project_resampled_skip):
            x = conv(self.out_channels, (1, 1), kernel_init=self.kernel_init, name="skip")(x)
        return (x + h) * self.skip_scale


def pixel_norm(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    """x / sqrt(mean over channels of x^2 + eps) (Karras et al. 2018), in float32 at least."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)).astype(x.dtype)


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions with a residual connection."""

    num_heads: int
    skip_scale: float = 1.0
    eps: float = 1e-6
    attention_impl: str = "xla"
    kernel_init: Initializer = fan_avg_uniform
    # Init of the fused [C, 3C] q/k/v kernel; None: kernel_init.
    qkv_init: Initializer | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        if channels % self.num_heads:
            raise ValueError(f"{channels} channels do not split into {self.num_heads} attention heads.")
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
        h = group_norm(channels, self.eps, self.dtype, name="norm")(x)
        qkv = dense(3 * channels, kernel_init=self.qkv_init or self.kernel_init, name="qkv")(h)
        qkv = qkv.reshape(batch, height * width, 3, self.num_heads, channels // self.num_heads)
        out = multi_head_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.attention_impl)
        out = dense(channels, kernel_init=zeros_init, name="proj")(out.reshape(batch, height, width, channels))
        return (x + out) * self.skip_scale
