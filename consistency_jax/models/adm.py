"""ADM U-Net (Dhariwal & Nichol 2021) as configured by EDM / CM / iCT for ImageNet 64x64.

Defaults: 192 channels, multipliers (1, 2, 3, 4), 3 residual blocks per
resolution, attention at 32, 16 and 8 with 64-channel heads, scale-shift
(adaptive group) norm, BigGAN-style up/down residual blocks (average-pool down,
nearest up), positional noise embedding, class conditioning through a label
embedding added to the noise embedding. It follows EDM's `DhariwalUNet` block
for block: attention after every res block of an attention resolution, in the
encoder and the decoder. Class-conditional with 1000 classes it has
295,900,035 parameters: the published 295.9M plus the 768 of the extra
null-class row of the label embedding. The iCT-deep rows use `num_res_blocks=6`.

With `resblock_updown=False` it resamples with a strided 3x3 convolution
(down) and nearest-neighbour upsampling followed by a 3x3 convolution (up)
instead of BigGAN-style res blocks: ADM's `resblock_updown=False`, which is
the DDPM U-Net of diffusers' `UNet2DModel` that ACT trains as its generator
(configs/*_act.py).

Initialisation as ADM / CM (cm/unet.py): PyTorch's defaults (uniform,
fan-in) for convs and linears, zeros for the last conv of each block and of
the output, and N(0, 1) for the label embedding (PyTorch's nn.Embedding; EDM's
DhariwalUNet map_label has the same std). With embedding_type='fourier' the
model_channels / 2 frequencies are a frozen param (layers.FROZEN_PARAM_NAMES).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from consistency_jax.models.layers import (
    ATTENTION_IMPLS,
    AttentionBlock,
    ResBlock,
    check_choice,
    check_image_and_labels,
    compute_dtype,
    group_norm,
    noise_embedding,
    torch_default_uniform,
    unit_normal,
    zeros_init,
)

_EPS = 1e-5  # PyTorch's GroupNorm default, which ADM and EDM's DhariwalUNet use


class ADM(nn.Module):
    """ADM U-Net: (x [B,H,W,C], noise_labels [B], class_labels [B]) -> [B,H,W,C]."""

    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (32, 16, 8)
    num_head_channels: int = 64
    dropout: float = 0.0
    # > 0: dropout only in the blocks whose output resolution is at most this (sCM on ImageNet,
    # after simple diffusion and iCT: 16); 0: in every block.
    dropout_max_resolution: int = 0
    embedding_type: str = "positional"  # 'positional' (ADM) or 'fourier'
    fourier_scale: float = 16.0  # only for embedding_type='fourier'
    scale_shift_norm: bool = True  # the embedding sets scale and shift of the second norm
    # sCM's adaptive double normalization (Lu & Song 2024, section 4.1): that scale and
    # shift pixel-normalised, norm(h) * pnorm(scale) + pnorm(shift).
    adaptive_double_norm: bool = False
    resblock_updown: bool = True  # False: strided-conv down / nearest+conv up (DDPM, diffusers UNet2DModel)
    num_classes: int = 0  # > 0: class-conditional, with one extra null class
    dtype: str = "float32"  # compute dtype; params are always float32
    remat: bool = False  # recompute res/attention blocks in the backward pass
    attention_impl: str = "xla"  # 'xla' or 'dot_product_attention'

    @nn.compact
    def __call__(self, x: jax.Array, noise_labels: jax.Array, class_labels: jax.Array | None = None, *,
                 train: bool) -> jax.Array:
        check_choice("embedding_type", self.embedding_type, ("fourier", "positional"))
        check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        check_image_and_labels(x, noise_labels, class_labels, self.num_classes, len(self.channel_mult) - 1)
        dtype = compute_dtype(self.dtype)
        emb = self._embedding(noise_labels, class_labels, dtype)

        block_cls = nn.remat(ResBlock) if self.remat else ResBlock
        attn_cls = nn.remat(AttentionBlock) if self.remat else AttentionBlock
        make_block = functools.partial(
            block_cls, resample_filter=(1, 1), project_resampled_skip=False, scale_shift=self.scale_shift_norm,
            adaptive_double_norm=self.adaptive_double_norm, skip_scale=1.0, eps=_EPS,
            deterministic=not train, kernel_init=torch_default_uniform, dtype=dtype)

        def block(channels: int, out_res: int, **kw) -> nn.Module:
            limit = self.dropout_max_resolution
            return make_block(channels, dropout=self.dropout if not limit or out_res <= limit else 0.0, **kw)

        def attention(channels: int, name: str) -> nn.Module:
            if channels % self.num_head_channels:
                raise ValueError(f"{channels} channels at attention block {name} are not a multiple of "
                                 f"num_head_channels={self.num_head_channels}.")
            return attn_cls(num_heads=channels // self.num_head_channels, skip_scale=1.0, eps=_EPS,
                            attention_impl=self.attention_impl, kernel_init=torch_default_uniform, dtype=dtype,
                            name=name)

        h = nn.Conv(self.model_channels * self.channel_mult[0], (3, 3), dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=torch_default_uniform, name="enc_conv_in")(x.astype(dtype))
        skips = [h]
        res = x.shape[1]
        for level, mult in enumerate(self.channel_mult):
            if level > 0:
                h = self._resample(block, h, emb, "down", f"enc{res}_down", dtype, res // 2)
                res //= 2
                skips.append(h)
            for idx in range(self.num_res_blocks):
                h = block(self.model_channels * mult, res, name=f"enc{res}_block{idx}")(h, emb)
                if res in self.attn_resolutions:
                    h = attention(h.shape[-1], f"enc{res}_attn{idx}")(h)
                skips.append(h)

        h = block(h.shape[-1], res, name=f"mid{res}_block0")(h, emb)
        h = attention(h.shape[-1], f"mid{res}_attn")(h)
        h = block(h.shape[-1], res, name=f"mid{res}_block1")(h, emb)

        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for idx in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = block(self.model_channels * mult, res, name=f"dec{res}_block{idx}")(h, emb)
                if res in self.attn_resolutions:
                    h = attention(h.shape[-1], f"dec{res}_attn{idx}")(h)
            if level > 0:
                h = self._resample(block, h, emb, "up", f"dec{res}_up", dtype, 2 * res)
                res *= 2

        h = nn.silu(group_norm(h.shape[-1], _EPS, dtype, name="out_norm")(h))
        out = nn.Conv(x.shape[-1], (3, 3), kernel_init=zeros_init, dtype=dtype, param_dtype=jnp.float32,
                      name="out_conv")(h)
        return out.astype(x.dtype)

    def _resample(self, block, h: jax.Array, emb: jax.Array, direction: str, name: str,
                  dtype: jnp.dtype, out_res: int) -> jax.Array:
        """2x down/up between levels: a res block (BigGAN style), or a conv (DDPM style)."""
        if self.resblock_updown:
            return block(h.shape[-1], out_res, resample=direction, name=name)(h, emb)
        conv = functools.partial(nn.Conv, h.shape[-1], (3, 3), dtype=dtype, param_dtype=jnp.float32,
                                 kernel_init=torch_default_uniform, name=name)
        if direction == "down":
            return conv(strides=(2, 2), padding=((1, 1), (1, 1)))(h)
        return conv()(jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2))

    def _embedding(self, noise_labels: jax.Array, class_labels: jax.Array | None, dtype: jnp.dtype) -> jax.Array:
        """SiLU(MLP(noise features) + label embedding): the vector every res block reads."""
        emb_channels = 4 * self.model_channels
        # The sinusoids stay float32 whatever the compute dtype: their arguments can be large.
        emb = noise_embedding(self.embedding_type, self.model_channels, self.fourier_scale,
                              name="noise_embed")(noise_labels)
        dense = functools.partial(nn.Dense, emb_channels, dtype=dtype, param_dtype=jnp.float32,
                                  kernel_init=torch_default_uniform)
        emb = dense(name="emb_dense1")(nn.silu(dense(name="emb_dense0")(emb)))
        if self.num_classes > 0:
            # N(0, 1) rows, as PyTorch's nn.Embedding in ADM / CM (cm/unet.py) and EDM's DhariwalUNet.
            labels = nn.Embed(self.num_classes + 1, emb_channels, embedding_init=unit_normal,
                              name="label_embed")(class_labels)
            emb = emb + labels.astype(emb.dtype)
        return nn.silu(emb)
