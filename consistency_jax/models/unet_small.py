"""A small U-Net in the NCSN++/DDPM++ family for 8x8 to 32x32 CPU runs.

GroupNorm-SiLU-conv residual blocks with the noise (and class) embedding added
between the convs, self-attention at chosen resolutions, average-pool down and
nearest-neighbour up sampling, skip connections scaled by 1/sqrt(2) as in
NCSN++. The paper-size networks live in ncsnpp.py and adm.py.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from consistency_jax.models.layers import noise_embedding


def _groups(channels: int) -> int:
    return math.gcd(channels, 32) if channels >= 32 else max(1, channels // 4)


class ResBlock(nn.Module):
    out_channels: int
    dropout: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, emb, train: bool):
        h = nn.silu(nn.GroupNorm(_groups(x.shape[-1]), dtype=self.dtype)(x))
        h = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype)(h)
        h = h + nn.Dense(self.out_channels, dtype=self.dtype)(emb)[:, None, None, :]
        h = nn.silu(nn.GroupNorm(_groups(self.out_channels), dtype=self.dtype)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        # Zero-initialised last conv: each block starts as the identity.
        h = nn.Conv(self.out_channels, (3, 3), kernel_init=nn.initializers.zeros, dtype=self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype)(x)
        return (x + h) / math.sqrt(2.0)


class AttnBlock(nn.Module):
    num_heads: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        h = nn.GroupNorm(_groups(c), dtype=self.dtype)(x).reshape(b, hgt * wid, c)
        h = nn.MultiHeadDotProductAttention(self.num_heads, dtype=self.dtype,
                                            out_kernel_init=nn.initializers.zeros)(h, h)
        return (x + h.reshape(b, hgt, wid, c)) / math.sqrt(2.0)


class UNetSmall(nn.Module):
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (4,)
    num_heads: int = 1
    dropout: float = 0.0
    embedding_type: str = "fourier"  # 'fourier' or 'positional'
    fourier_scale: float = 16.0
    num_classes: int = 0
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, *, train: bool):
        dtype = jnp.dtype(self.dtype)
        emb_dim = 4 * self.model_channels
        emb = noise_embedding(self.embedding_type, self.model_channels, self.fourier_scale)(noise_labels)
        if self.num_classes > 0:
            if class_labels is None:
                raise ValueError("This model is class-conditional: pass class_labels.")
            # num_classes + 1 rows: the last is the null class for guidance.
            emb = emb + nn.Embed(self.num_classes + 1, self.model_channels)(class_labels)
        emb = nn.silu(nn.Dense(emb_dim)(emb))
        emb = nn.silu(nn.Dense(emb_dim)(emb)).astype(dtype)

        h = nn.Conv(self.model_channels, (3, 3), dtype=dtype)(x.astype(dtype))
        skips = [h]
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                h = ResBlock(self.model_channels * mult, self.dropout, dtype)(h, emb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(self.num_heads, dtype)(h)
                skips.append(h)
            if level < len(self.channel_mult) - 1:
                h = nn.avg_pool(h, (2, 2), (2, 2))
                skips.append(h)

        h = ResBlock(h.shape[-1], self.dropout, dtype)(h, emb, train)
        h = AttnBlock(self.num_heads, dtype)(h)
        h = ResBlock(h.shape[-1], self.dropout, dtype)(h, emb, train)

        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for _ in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = ResBlock(self.model_channels * mult, self.dropout, dtype)(h, emb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(self.num_heads, dtype)(h)
            if level > 0:
                b, hgt, wid, c = h.shape
                h = jax.image.resize(h, (b, 2 * hgt, 2 * wid, c), "nearest")

        h = nn.silu(nn.GroupNorm(_groups(h.shape[-1]), dtype=dtype)(h))
        out = nn.Conv(x.shape[-1], (3, 3), kernel_init=nn.initializers.zeros, dtype=dtype)(h)
        return out.astype(jnp.float32)
