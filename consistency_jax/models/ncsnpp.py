"""NCSN++ (Song et al. 2021) as used by consistency models on CIFAR-10, and DDPM++.

The architecture of score_sde's `ncsnpp` with the CM / iCT CIFAR-10 settings
(the defaults here): 128 channels, channel multipliers (2, 2, 2), 4 BigGAN-style
residual blocks per resolution with FIR [1, 3, 3, 1] up/down sampling,
single-head attention at 16x16, skip connections rescaled by 1/sqrt(2), the
"residual" progressive input (a downsampled copy of the image added at every
level), Fourier features of the noise label, dropout. It is also EDM's
`SongUNet` (encoder 'residual', decoder 'standard'), whose layer order this
follows block for block.

Parameter count at the defaults: 56,395,651, as the CM JAX code reports:
56,395,523 trained ones plus the 128 Fourier frequencies, a frozen param
(layers.FROZEN_PARAM_NAMES; EDM's SongUNet, the PyTorch peer in
BENCHMARKS.md, keeps them as a buffer and counts 56,395,523).

Initialisation follows the CM JAX code (jcm/models/layerspp.py, layers.py):
fan-average uniform ("DDPM init") everywhere, zeros for the last conv of each
block and of the output, and variance 0.1 / C for the q, k, v projections of
attention (NIN init_scale 0.1), which is also EDM SongUNet's `init_attn`
(xavier_uniform with weight sqrt(0.2) on its fused qkv conv).

DDPM++ (the network ECT fine-tunes, 55,732,739 parameters) is the same module
with `embedding_type='positional'`, `progressive_input='none'` and
`resample_filter=(1, 1)` (average-pool down, nearest up). Its positional
embedding is score_sde's / SongUNet's (frequencies 10000^(-i / (half - 1))),
not ADM's; both embeddings feed [sin, cos] to the MLP, as SongUNet does.
EDM's released DDPM++ and NCSN++ networks convert onto this module
(`python -m consistency_jax.convert`, tests/test_convert.py checks the parity).
sCM's TrigFlow DDPM++ adds `adaptive_double_norm=True` (the time conditioning
c_noise(t) = t is the parametrization's, see parametrization.TrigFlowFunction).

Class conditioning (EDM style): a label embedding of num_classes + 1 rows (the
last is the null class, for guidance) is added to the noise features before
the embedding MLP.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from consistency_jax.models.layers import (
    ATTENTION_IMPLS,
    AttentionBlock,
    Conv,
    ResBlock,
    check_choice,
    check_image_and_labels,
    compute_dtype,
    fan_avg_uniform,
    fir_filter,
    group_norm,
    noise_embedding,
    zeros_init,
)

_EPS = 1e-6  # GroupNorm epsilon of score_sde (Flax default) and EDM's SongUNet
# q/k/v init. On the fused [C, 3C] kernel fan_avg = 2C, so scale 0.2 gives
# variance 0.1 / C per projection: CM JAX's NIN(C) (init_scale 0.1, fan_avg C)
# and EDM SongUNet's xavier_uniform * sqrt(0.2) on its fused qkv conv.
_QKV_INIT = nn.initializers.variance_scaling(0.2, "fan_avg", "uniform")


class NCSNpp(nn.Module):
    """NCSN++ / DDPM++ U-Net: (x [B,H,W,C], noise_labels [B], class_labels [B]) -> [B,H,W,C]."""

    model_channels: int = 128
    channel_mult: tuple[int, ...] = (2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    # 'fourier' (NCSN++; 2 * model_channels features) or 'positional' (DDPM++;
    # model_channels features), as in score_sde.
    embedding_type: str = "fourier"
    fourier_scale: float = 16.0  # 16 in the CM code; iCT: 0.02 on c_noise = ln(sigma)/4 (configs/cifar10_ict.py)
    resample_filter: tuple[int, ...] = (1, 3, 3, 1)
    progressive_input: str = "residual"  # 'residual' (NCSN++) or 'none' (DDPM++)
    skip_rescale: bool = True  # scale every residual sum by 1/sqrt(2)
    # sCM's adaptive double normalization (Lu & Song 2024, section 4.1): the embedding
    # sets a pixel-normalised scale and shift of the second norm instead of being added
    # before it; the sCM networks of the paper (DDPM++ on CIFAR-10 included) use it.
    adaptive_double_norm: bool = False
    num_classes: int = 0  # > 0: class-conditional, with one extra null class
    dtype: str = "float32"  # compute dtype; params are always float32
    remat: bool = False  # recompute res/attention blocks in the backward pass
    attention_impl: str = "xla"  # 'xla' or 'dot_product_attention'

    @nn.compact
    def __call__(self, x: jax.Array, noise_labels: jax.Array, class_labels: jax.Array | None = None, *,
                 train: bool) -> jax.Array:
        self._check_inputs(x, noise_labels, class_labels)
        dtype = compute_dtype(self.dtype)
        skip_scale = math.sqrt(0.5) if self.skip_rescale else 1.0
        emb = self._embedding(noise_labels, class_labels, dtype)

        block_cls = nn.remat(ResBlock) if self.remat else ResBlock
        attn_cls = nn.remat(AttentionBlock) if self.remat else AttentionBlock
        block = functools.partial(
            block_cls, resample_filter=tuple(self.resample_filter), project_resampled_skip=True,
            scale_shift=False, adaptive_double_norm=self.adaptive_double_norm, dropout=self.dropout,
            skip_scale=skip_scale, eps=_EPS, deterministic=not train, kernel_init=fan_avg_uniform, dtype=dtype)
        attention = functools.partial(attn_cls, num_heads=1, skip_scale=skip_scale, eps=_EPS,
                                      attention_impl=self.attention_impl, kernel_init=fan_avg_uniform,
                                      qkv_init=_QKV_INIT, dtype=dtype)
        conv = functools.partial(Conv, dtype=dtype, param_dtype=jnp.float32, kernel_init=fan_avg_uniform)

        # Encoder. `aux` is the progressive input: the image, downsampled by a
        # strided FIR conv at every level and merged into the main path.
        h = conv(self.model_channels, (3, 3), name="enc_conv_in")(x.astype(dtype))
        aux = x.astype(dtype)
        skips = [h]
        res = x.shape[1]
        for level, mult in enumerate(self.channel_mult):
            if level > 0:
                h = block(h.shape[-1], resample="down", name=f"enc{res}_down")(h, emb)
                res //= 2
                if self.progressive_input == "residual":
                    aux = (h + self._aux_downsample(aux, h.shape[-1], dtype, f"enc{res}_aux_residual")) * skip_scale
                    h = aux
                skips.append(h)
            for idx in range(self.num_res_blocks):
                h = block(self.model_channels * mult, name=f"enc{res}_block{idx}")(h, emb)
                if res in self.attn_resolutions:
                    h = attention(name=f"enc{res}_attn{idx}")(h)
                skips.append(h)

        h = block(h.shape[-1], name=f"mid{res}_block0")(h, emb)
        h = attention(name=f"mid{res}_attn")(h)
        h = block(h.shape[-1], name=f"mid{res}_block1")(h, emb)

        # Decoder: one more block per level than the encoder, attention once per
        # level after its last block (score_sde's order).
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for idx in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = block(self.model_channels * mult, name=f"dec{res}_block{idx}")(h, emb)
            if res in self.attn_resolutions:
                h = attention(name=f"dec{res}_attn")(h)
            if level > 0:
                h = block(h.shape[-1], resample="up", name=f"dec{res}_up")(h, emb)
                res *= 2

        h = nn.silu(group_norm(h.shape[-1], _EPS, dtype, name="out_norm")(h))
        out = Conv(x.shape[-1], (3, 3), kernel_init=zeros_init, dtype=dtype, param_dtype=jnp.float32,
                      name="out_conv")(h)
        return out.astype(x.dtype)

    def _check_inputs(self, x: jax.Array, noise_labels: jax.Array, class_labels: jax.Array | None) -> None:
        check_choice("embedding_type", self.embedding_type, ("fourier", "positional"))
        check_choice("progressive_input", self.progressive_input, ("residual", "none"))
        check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        check_image_and_labels(x, noise_labels, class_labels, self.num_classes, len(self.channel_mult) - 1)

    def _embedding(self, noise_labels: jax.Array, class_labels: jax.Array | None, dtype: jnp.dtype) -> jax.Array:
        """SiLU(MLP(noise features + label embedding)): the vector every res block reads."""
        num_features = 2 * self.model_channels if self.embedding_type == "fourier" else self.model_channels
        # The sinusoids stay float32 whatever the compute dtype: their arguments can be large.
        emb = noise_embedding(self.embedding_type, num_features, self.fourier_scale,
                              name="noise_embed", positional_endpoint=True)(noise_labels)
        # [cos, sin] -> [sin, cos]: the feature order of score_sde and of EDM's SongUNet
        # ("swap sin/cos" after map_noise), so that converted EDM weights apply as they are.
        emb = jnp.concatenate([emb[:, num_features // 2:], emb[:, :num_features // 2]], axis=-1)
        if self.num_classes > 0:
            emb = emb + nn.Embed(self.num_classes + 1, num_features, name="label_embed")(class_labels)
        dense = functools.partial(nn.Dense, 4 * self.model_channels, dtype=dtype, param_dtype=jnp.float32,
                                  kernel_init=fan_avg_uniform)
        emb = nn.silu(dense(name="emb_dense0")(emb))
        return nn.silu(dense(name="emb_dense1")(emb))

    def _aux_downsample(self, aux: jax.Array, channels: int, dtype: jnp.dtype, name: str) -> jax.Array:
        """3x3 conv with FIR 2x downsampling, in score_sde's order: filter (stride 1), then strided conv."""
        pad = (len(self.resample_filter) - 1) // 2 + 1
        aux = fir_filter(aux, self.resample_filter, pad)
        return Conv(channels, (3, 3), strides=(2, 2), padding="VALID", dtype=dtype, param_dtype=jnp.float32,
                       kernel_init=fan_avg_uniform, name=name)(aux)

