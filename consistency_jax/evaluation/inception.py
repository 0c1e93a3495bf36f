"""Inception-v3 as in the 2015-12-05 TensorFlow graph that FID and IS are defined with.

The TF, ADM and clean-fid evaluators all run that graph, so the numbers they
publish are only comparable with features from the same network, quirks
included (pytorch-fid documents them as FIDInceptionA/C/E_1/E_2):

- input: the graph takes 0..255 pixels, resizes them to 299x299 with TF's
  legacy bilinear resize (no half-pixel centres) and maps them to
  (x - 128) / 128;
- every 3x3 average pool in the mixed blocks ignores padded zeros (TF 'SAME'
  average pooling), and the last block (Mixed_7c) max-pools instead;
- batch norm has epsilon 1e-3; convolutions have no bias;
- pool3 is the 2048-d global average pool; the classifier has 1008 classes.

The logits are pool3 @ W without the bias, as in the original Inception Score
code and the ADM evaluator (which take the MatMul's weight input and ignore
softmax/biases), so IS values are comparable with published ones.

Submodule names follow torchvision's Inception3, so the pytorch-fid state dict
maps one to one; `inception_weights` also maps the TF graph's node names.
tests/test_inception_parity.py checks the network, loaded through both
loaders, against pytorch-fid's FID Inception and against a GraphDef of the
graph's ops run by TensorFlow, on the same seeded weights.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_FEATURES = 2048
BATCH_NORM_EPSILON = 1e-3
# The graph's Sub and Mul nodes after ResizeBilinear: (x - 128) * (1/128).
PIXEL_OFFSET = 128.0
PIXEL_SCALE = 1.0 / 128.0


def legacy_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] weights of TF's ResizeBilinear (align_corners=False, no half-pixel centres).

    Output pixel i samples the input at i * in_size / out_size, interpolating
    between the two neighbouring pixels (the upper one clamped to the edge).
    """
    source = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
    lower = np.floor(source).astype(np.int64)
    upper = np.minimum(lower + 1, in_size - 1)
    frac = source - lower
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(weights, (rows, lower), 1.0 - frac)
    np.add.at(weights, (rows, upper), frac)
    return weights.astype(np.float32)


def preprocess(images: jnp.ndarray) -> jnp.ndarray:
    """0..255 NHWC images (any size, 1 or 3 channels) -> the graph's 299x299x3 network input."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"Inception expects NHWC images with 1 or 3 channels, got shape {images.shape}.")
    x = images.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.tile(x, (1, 1, 1, 3))
    height, width = x.shape[1:3]
    if (height, width) != (INPUT_SIZE, INPUT_SIZE):
        # Separable resize as two small matrix products: exact legacy-TF weights, cheap on any device.
        rows = jnp.asarray(legacy_bilinear_matrix(height, INPUT_SIZE))
        cols = jnp.asarray(legacy_bilinear_matrix(width, INPUT_SIZE))
        x = jnp.einsum("oh,nhwc->nowc", rows, x)
        x = jnp.einsum("pw,nowc->nopc", cols, x)
    return (x - PIXEL_OFFSET) * PIXEL_SCALE


class BasicConv(nn.Module):
    """Convolution (no bias) -> batch norm (running statistics) -> ReLU."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        pad_h, pad_w = self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=(self.stride, self.stride),
            padding=((pad_h, pad_h), (pad_w, pad_w)),
            use_bias=False,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BATCH_NORM_EPSILON, name="bn")(x)
        return nn.relu(x)


def _same_pool(x: jnp.ndarray, kind: str) -> jnp.ndarray:
    """3x3 stride-1 'SAME' pooling as TF does it (average over real pixels only)."""
    if kind == "max":
        return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _reduce_pool(x: jnp.ndarray) -> jnp.ndarray:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_same_pool(x, "avg"))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _reduce_pool(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, (1, 1), name="branch_pool")(_same_pool(x, "avg"))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _reduce_pool(x)], axis=-1)


class InceptionE(nn.Module):
    pool: str  # 'avg' in Mixed_7b; 'max' in Mixed_7c (a quirk of the 2015 graph)

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        bp = BasicConv(192, (1, 1), name="branch_pool")(_same_pool(x, self.pool))
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """0..255 NHWC images -> {'pool': [N, 2048], 'logits': [N, 1008]} (logits without bias)."""

    @nn.compact
    def __call__(self, images: jnp.ndarray) -> dict[str, jnp.ndarray]:
        x = preprocess(images)
        x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _reduce_pool(x)
        x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _reduce_pool(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, channels in zip(("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"), (128, 160, 160, 192)):
            x = InceptionC(channels, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(NUM_CLASSES, use_bias=False, name="fc")(pool)
        return {"pool": pool, "logits": logits}


def variable_shapes() -> dict:
    """Shapes of every variable ({'params', 'batch_stats'}) without allocating them."""
    shapes = jax.eval_shape(
        InceptionV3().init, jax.random.PRNGKey(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    )
    return jax.tree.map(lambda s: tuple(s.shape), shapes)

