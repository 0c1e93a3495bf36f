"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models"), the backbone that ECT and SCT tune on ImageNet-64.

Reference: NVlabs/edm2 training/networks_edm2.py (UNet, Block, MPConv, MPFourier, mp_silu, mp_sum, mp_cat,
normalize), and locuslab/ect branch `imgnet` training/networks_edm2.py (the same network with `dropout_res`:
dropout only at resolutions <= dropout_res). Layer for layer as the reference, in NHWC:

- Every conv / linear layer is an `MPConv`: its weight is normalised to unit RMS per output channel in the
  forward pass and scaled by gain / sqrt(fan_in), so unit-variance inputs give unit-variance outputs; there
  are no biases and no normalisation layers other than pixel norm.
- Forced weight normalisation: EDM2 rewrites the stored weights to unit RMS in every training forward pass
  (in place). Here the params are a pure pytree, so the same projection is `project_params`, applied to the
  params after every optimizer step (methods/base.py `Method.update`), and the init draws unit-RMS weights.
  Both passes of a consistency loss therefore see the same weights. (ECT's own EDM2 code has to turn the
  in-place renormalisation off in its stop-gradient teacher pass, training/loss.py `disable_forced_wn`: a
  second forward would renormalise weights that are already normalised, shrinking them by 1/(1 + 1e-4)
  through normalize's epsilon, and rewrite the tensors that the student pass's backward still needs, so the
  teacher would not be exactly the student. Projecting after the update is that choice by construction.)
- mp_silu = silu / 0.596, mp_sum (lerp divided by its norm), mp_cat (weights that keep the magnitude of
  the concatenation), cosine attention (pixel-normalised q, k, v per head), magnitude-preserving Fourier
  features of c_noise (fixed random frequencies and phases), a learned gain (init 0) on the embedding of
  every block and on the output layer, activations clipped to +-256.
- Class conditioning: one-hot labels scaled by sqrt(num_classes) through an MPConv, mp_sum'ed with the noise
  embedding. The null class `num_classes` (classifier-free guidance, models/__init__.py) is the zero
  vector, which is also what EDM2 feeds an unconditional call.

Not here: EDM2's learned per-noise-level loss weighting (Precond.logvar_fourier / logvar_linear, the u(sigma)
of its Equation 21) belongs to EDM2's diffusion loss, not to the denoiser. ECT's EDM2 code comments it out
("doesn't work well with multiple stage tuning"), so the ECT/SCT recipes do not use it; a converted EDM2
checkpoint drops those 128 values.

Sizes (ImageNet-64, class-conditional with 1000 classes; EDM2 paper Table 3 and train_edm2.py presets):
S model_channels=192 (280M params), M 256 (498M), L 320 (777M), XL 384 (1119M); channel_mult (1, 2, 3, 4),
3 blocks per resolution, attention at 16 and 8. The counts here are the reference UNet's exactly plus the
2 * model_channels fixed Fourier values, which are params (under stop_gradient, never trained) so that a
converted checkpoint can restore them.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from consistency_jax.models.layers import (
    check_image_and_labels,
    compute_dtype,
    fir_downsample,
    fir_upsample,
    frozen_param,
)

_EPS = 1e-4  # epsilon of EDM2's normalize()
SIZES = {"S": 192, "M": 256, "L": 320, "XL": 384}  # model_channels of the published ImageNet-64 sizes


def normalize(x: jax.Array, axes: tuple[int, ...], eps: float = _EPS) -> jax.Array:
    """x / (eps + RMS over `axes`): EDM2's normalize (its norm times sqrt(len / total) is the RMS)."""
    rms = jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), axis=axes, keepdims=True))
    return x / (eps + rms).astype(x.dtype)


def mp_silu(x: jax.Array) -> jax.Array:
    """Magnitude-preserving SiLU (EDM2 Equation 81): unit variance in, unit variance out."""
    return nn.silu(x) / 0.596


def mp_sum(a: jax.Array, b: jax.Array, t: float = 0.5) -> jax.Array:
    """Magnitude-preserving sum (Equation 88): lerp(a, b, t) / sqrt((1 - t)^2 + t^2)."""
    return (a + t * (b - a)) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: jax.Array, b: jax.Array, t: float = 0.5) -> jax.Array:
    """Magnitude-preserving concatenation over channels (Equation 103)."""
    na, nb = a.shape[-1], b.shape[-1]
    scale = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return jnp.concatenate([a * (scale / math.sqrt(na) * (1 - t)), b * (scale / math.sqrt(nb) * t)], axis=-1)


def unit_rms_normal(rng: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Gaussian weights normalised to unit RMS per output channel (the last axis): what forced WN keeps."""
    return normalize(jax.random.normal(rng, shape, dtype), tuple(range(len(shape) - 1)))


class MPConv(nn.Module):
    """Magnitude-preserving conv (kernel (kh, kw)) or linear layer (kernel ()) with weight normalisation.

    Weight layout [kh, kw, in, out] (linear: [in, out]); EDM2's PyTorch weight [out, in, kh, kw] transposes
    into it. Same padding, stride 1, no bias.
    """

    features: int
    kernel: tuple[int, ...] = (3, 3)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, gain: jax.Array | float = 1.0) -> jax.Array:
        shape = (*self.kernel, x.shape[-1], self.features)
        weight = self.param("weight", unit_rms_normal, shape)
        fan_in = math.prod(shape[:-1])
        w = normalize(weight, tuple(range(len(shape) - 1))) * (gain / math.sqrt(fan_in))
        w = w.astype(self.dtype)
        x = x.astype(self.dtype)
        if not self.kernel:
            return x @ w
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features (Equation 75): sqrt(2) cos(2 pi (f c + p)), f ~ N(0, bw^2), p ~ U.

    The frequencies and phases are drawn once at init and never trained (layers.frozen_param: stop_gradient,
    no weight decay); they are params so that a checkpoint (or a converted EDM2 pickle) restores them.
    """

    features: int
    bandwidth: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        freqs = frozen_param(self, "freqs", lambda rng, shape, dtype: 2 * np.pi * self.bandwidth
                             * jax.random.normal(rng, shape, dtype), (self.features,))
        phases = frozen_param(self, "phases", lambda rng, shape, dtype: 2 * np.pi * jax.random.uniform(rng, shape, dtype),
                              (self.features,))
        y = x.astype(jnp.float32)[:, None] * freqs[None, :] + phases[None, :]
        return jnp.cos(y) * math.sqrt(2)


class Block(nn.Module):
    """EDM2 encoder/decoder block (Figure 21) with optional cosine self-attention."""

    out_channels: int
    flavor: str = "enc"  # 'enc' or 'dec'
    resample_mode: str = "keep"  # 'keep', 'up' or 'down'
    attention: bool = False
    channels_per_head: int = 64
    dropout: float = 0.0
    res_balance: float = 0.3
    attn_balance: float = 0.3
    clip_act: float = 256.0
    deterministic: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        conv = functools.partial(MPConv, dtype=self.dtype)
        in_channels = x.shape[-1]
        if self.resample_mode == "down":
            x = fir_downsample(x, (1, 1))
        elif self.resample_mode == "up":
            x = fir_upsample(x, (1, 1))
        if self.flavor == "enc":
            if in_channels != self.out_channels:
                x = conv(self.out_channels, (1, 1), name="conv_skip")(x)
            x = normalize(x, (-1,))  # pixel norm

        y = conv(self.out_channels, (3, 3), name="conv_res0")(mp_silu(x))
        emb_gain = self.param("emb_gain", nn.initializers.zeros, ())
        c = conv(self.out_channels, (), name="emb_linear")(emb, gain=emb_gain) + 1
        y = mp_silu(y * c[:, None, None, :].astype(y.dtype))
        y = nn.Dropout(self.dropout, deterministic=self.deterministic)(y)
        y = conv(self.out_channels, (3, 3), name="conv_res1")(y)

        if self.flavor == "dec" and in_channels != self.out_channels:
            x = conv(self.out_channels, (1, 1), name="conv_skip")(x)
        x = mp_sum(x, y, self.res_balance)

        if self.attention:
            num_heads = self.out_channels // self.channels_per_head
            batch, height, width, channels = x.shape
            qkv = conv(3 * channels, (1, 1), name="attn_qkv")(x)
            # EDM2's channel order: head, then channel within the head, then q/k/v.
            qkv = normalize(qkv.reshape(batch, height * width, num_heads, channels // num_heads, 3), (3,))
            q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
            logits = jnp.einsum("bqhc,bkhc->bhqk", q, k / math.sqrt(q.shape[-1]),
                                preferred_element_type=jnp.float32)
            weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
            y = jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(batch, height, width, channels)
            x = mp_sum(x, conv(channels, (1, 1), name="attn_proj")(y), self.attn_balance)

        if self.clip_act:
            x = jnp.clip(x, -self.clip_act, self.clip_act)
        self.sow("intermediates", "out", x)
        return x


class EDM2UNet(nn.Module):
    """EDM2 U-Net: (x [B,H,W,C], noise_labels [B], class_labels [B]) -> [B,H,W,C]; defaults = size S."""

    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    channel_mult_noise: int = 0  # noise-embedding width = model_channels * this; 0: channel_mult[0]
    channel_mult_emb: int = 0  # embedding width = model_channels * this; 0: max(channel_mult)
    num_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (16, 8)
    channels_per_head: int = 64
    label_balance: float = 0.5
    concat_balance: float = 0.5
    res_balance: float = 0.3
    attn_balance: float = 0.3
    clip_act: float = 256.0
    dropout: float = 0.0
    # ECT's addition: dropout only in blocks at resolutions <= dropout_res (16 in its ImageNet presets); 0: all.
    dropout_res: int = 0
    num_classes: int = 0  # > 0: class-conditional; label num_classes is the null class (zero vector)
    dtype: str = "float32"  # compute dtype; params are always float32
    remat: bool = False  # recompute blocks in the backward pass

    @nn.compact
    def __call__(self, x: jax.Array, noise_labels: jax.Array, class_labels: jax.Array | None = None, *,
                 train: bool) -> jax.Array:
        check_image_and_labels(x, noise_labels, class_labels, self.num_classes, len(self.channel_mult) - 1)
        dtype = compute_dtype(self.dtype)
        cblock = [self.model_channels * m for m in self.channel_mult]
        cnoise = self.model_channels * (self.channel_mult_noise or self.channel_mult[0])
        cemb = self.model_channels * (self.channel_mult_emb or max(self.channel_mult))

        # Embedding.
        emb = MPConv(cemb, (), name="emb_noise")(MPFourier(cnoise, name="emb_fourier")(noise_labels))
        if self.num_classes > 0:
            one_hot = jax.nn.one_hot(class_labels, self.num_classes) * math.sqrt(self.num_classes)
            emb = mp_sum(emb, MPConv(cemb, (), name="emb_label")(one_hot), self.label_balance)
        emb = mp_silu(emb).astype(dtype)

        block_cls = nn.remat(Block) if self.remat else Block

        def block(res: int, out_channels: int, name: str, **kwargs) -> nn.Module:
            dropout = self.dropout if not self.dropout_res or res <= self.dropout_res else 0.0
            return block_cls(out_channels, channels_per_head=self.channels_per_head, dropout=dropout,
                             res_balance=self.res_balance, attn_balance=self.attn_balance, clip_act=self.clip_act,
                             deterministic=not train, dtype=dtype, name=name, **kwargs)

        # Encoder.
        h = jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1)
        skips = []
        for level, channels in enumerate(cblock):
            res = x.shape[1] >> level
            if level == 0:
                h = MPConv(channels, (3, 3), dtype=dtype, name=f"enc_{res}x{res}_conv")(h)
            else:
                h = block(res, h.shape[-1], f"enc_{res}x{res}_down", flavor="enc", resample_mode="down")(h, emb)
            skips.append(h)
            for idx in range(self.num_blocks):
                h = block(res, channels, f"enc_{res}x{res}_block{idx}", flavor="enc",
                          attention=res in self.attn_resolutions)(h, emb)
                skips.append(h)

        # Decoder.
        for level, channels in reversed(list(enumerate(cblock))):
            res = x.shape[1] >> level
            if level == len(cblock) - 1:
                h = block(res, h.shape[-1], f"dec_{res}x{res}_in0", flavor="dec", attention=True)(h, emb)
                h = block(res, h.shape[-1], f"dec_{res}x{res}_in1", flavor="dec")(h, emb)
            else:
                h = block(res, h.shape[-1], f"dec_{res}x{res}_up", flavor="dec", resample_mode="up")(h, emb)
            for idx in range(self.num_blocks + 1):
                h = mp_cat(h, skips.pop(), self.concat_balance)
                h = block(res, channels, f"dec_{res}x{res}_block{idx}", flavor="dec",
                          attention=res in self.attn_resolutions)(h, emb)
        out_gain = self.param("out_gain", nn.initializers.zeros, ())
        out = MPConv(x.shape[-1], (3, 3), dtype=dtype, name="out_conv")(h, gain=out_gain)
        return out.astype(x.dtype)

    @staticmethod
    def project_params(params):
        """Forced weight normalisation: every MPConv weight back to unit RMS per output channel.

        Applied after each optimizer step (EDM2's in-place `weight.copy_(normalize(w))`, Equation 66).
        """
        def project(path, value):
            if path and getattr(path[-1], "key", None) == "weight":
                return normalize(value, tuple(range(value.ndim - 1)))
            return value

        return jax.tree_util.tree_map_with_path(project, params)
