"""ACT's discriminator: the encoder half of a DDPM U-Net, conditioned on the noise level (and class).

Kong et al. 2024 (ACT) judge a generated image f(x_t, t) against real images
with a network that is the down path and the middle of diffusers'
`UNet2DModel` (reference: kong13661/ACT models/discriminator_cifar10.py and
models/discriminator_imagenet.py):

    conv 3x3 -> per level: `num_res_blocks` res blocks (+ self-attention at
    `attn_resolutions`), then a strided 3x3 conv to halve the resolution
    (not after the last level) -> res block, attention, res block
    -> [GroupNorm] -> SiLU -> average pool to 2x2 -> linear -> one logit

Every res block reads SiLU(MLP(sinusoidal embedding of c_noise(sigma)) +
class embedding): the noise level of the image that the generator was given
(and on ImageNet its class). `output_norm` is the final GroupNorm that the
CIFAR-10 reference has and the ImageNet / LSUN reference removed.

Parameter counts (tests/test_discriminator.py): the reference networks minus
their unused second output layer (`to_logit_fx`, 1,025 / 2,049 params):
CIFAR-10 17,975,809; ImageNet-64 53,899,521; LSUN Cat 256 56,983,041.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from consistency_jax.models.layers import (
    ATTENTION_IMPLS,
    AttentionBlock,
    PositionalEmbedding,
    ResBlock,
    check_choice,
    compute_dtype,
    group_norm,
    torch_default_uniform,
)

_EPS = 1e-5  # PyTorch's GroupNorm default, as in the reference's diffusers blocks


class Discriminator(nn.Module):
    """(x [B,H,W,C], noise_labels [B], class_labels [B] or None) -> logits [B] (real > 0)."""

    channels: tuple[int, ...] = (128, 256, 256, 256)  # per level; the resolution halves between levels
    num_res_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (16,)
    num_head_channels: int = 8
    output_norm: bool = True  # GroupNorm before the last SiLU (CIFAR-10 reference; not ImageNet/LSUN)
    dropout: float = 0.0
    num_classes: int = 0  # > 0: class-conditional (a label embedding added to the noise embedding)
    dtype: str = "float32"  # compute dtype; params are always float32
    attention_impl: str = "xla"  # 'xla' or 'dot_product_attention'

    @nn.compact
    def __call__(self, x: jax.Array, noise_labels: jax.Array, class_labels: jax.Array | None = None, *,
                 train: bool) -> jax.Array:
        self._check_inputs(x, noise_labels, class_labels)
        check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        dtype = compute_dtype(self.dtype)
        emb = self._embedding(noise_labels, class_labels, dtype)
        block = functools.partial(ResBlock, dropout=self.dropout, eps=_EPS, deterministic=not train,
                                  kernel_init=torch_default_uniform, dtype=dtype)
        conv = functools.partial(nn.Conv, kernel_size=(3, 3), dtype=dtype, param_dtype=jnp.float32,
                                 kernel_init=torch_default_uniform)

        def attention(h: jax.Array, name: str) -> jax.Array:
            if h.shape[-1] % self.num_head_channels:
                raise ValueError(f"{h.shape[-1]} channels at {name} are not a multiple of "
                                 f"num_head_channels={self.num_head_channels}.")
            return AttentionBlock(num_heads=h.shape[-1] // self.num_head_channels, eps=_EPS,
                                  attention_impl=self.attention_impl, kernel_init=torch_default_uniform,
                                  dtype=dtype, name=name)(h)

        h = conv(self.channels[0], name="conv_in")(x.astype(dtype))
        res = x.shape[1]
        for level, channels in enumerate(self.channels):
            for idx in range(self.num_res_blocks):
                h = block(channels, name=f"enc{res}_block{idx}")(h, emb)
                if res in self.attn_resolutions:
                    h = attention(h, f"enc{res}_attn{idx}")
            if level < len(self.channels) - 1:
                h = conv(channels, strides=(2, 2), padding=((1, 1), (1, 1)), name=f"enc{res}_down")(h)
                res //= 2
        h = block(h.shape[-1], name=f"mid{res}_block0")(h, emb)
        h = attention(h, f"mid{res}_attn")
        h = block(h.shape[-1], name=f"mid{res}_block1")(h, emb)
        if self.output_norm:
            h = group_norm(h.shape[-1], _EPS, dtype, name="out_norm")(h)
        h = nn.silu(h)
        # Average pooling to 2x2 (the reference's AdaptiveAvgPool2d((2, 2))), then one linear logit.
        b, height, width, c = h.shape
        h = h.reshape(b, 2, height // 2, 2, width // 2, c).mean(axis=(2, 4)).reshape(b, 4 * c)
        logit = nn.Dense(1, dtype=dtype, param_dtype=jnp.float32, kernel_init=torch_default_uniform,
                         name="to_logit")(h)
        return logit[:, 0].astype(jnp.float32)

    def _embedding(self, noise_labels: jax.Array, class_labels: jax.Array | None, dtype: jnp.dtype) -> jax.Array:
        emb_channels = 4 * self.channels[0]
        emb = PositionalEmbedding(self.channels[0])(noise_labels)
        dense = functools.partial(nn.Dense, emb_channels, dtype=dtype, param_dtype=jnp.float32,
                                  kernel_init=torch_default_uniform)
        emb = dense(name="emb_dense1")(nn.silu(dense(name="emb_dense0")(emb)))
        if self.num_classes > 0:
            emb = emb + nn.Embed(self.num_classes, emb_channels, name="label_embed")(class_labels).astype(emb.dtype)
        return nn.silu(emb)

    def _check_inputs(self, x: jax.Array, noise_labels: jax.Array, class_labels: jax.Array | None) -> None:
        if x.ndim != 4:
            raise ValueError(f"The discriminator takes NHWC images [B, H, W, C]; got shape {x.shape}.")
        factor = 2 ** len(self.channels)  # halved len - 1 times, then pooled to 2x2
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"Image size {x.shape[1]}x{x.shape[2]} must be divisible by {factor} for a "
                             f"discriminator with {len(self.channels)} levels (halved {len(self.channels) - 1} "
                             f"times, then pooled to 2x2).")
        if noise_labels.shape != x.shape[:1]:
            raise ValueError(f"noise_labels must have shape [B] = {x.shape[:1]}; got {noise_labels.shape}.")
        if (self.num_classes > 0) != (class_labels is not None):
            raise ValueError(f"The discriminator has num_classes={self.num_classes}: class_labels must be "
                             f"{'given' if self.num_classes > 0 else 'None'}.")
