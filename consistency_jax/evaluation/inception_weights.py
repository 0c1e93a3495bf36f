"""Loads the FID Inception weights from the files users have, into `inception.InceptionV3`.

Two sources hold the same 2015-12-05 weights:

- the TensorFlow graph `inception-2015-12-05.tgz` (or the
  `classify_image_graph_def.pb` inside it): constants are read from the
  GraphDef with TensorFlow's protobuf classes;
- pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` state dict: read by a
  small restricted unpickler, so evaluation does not need PyTorch installed
  (a multi-GB dependency for one file) and cannot run code from the file.
  Both torch formats are understood: the zip archive (torch >= 1.6) and the
  older sequential pickle format the published file was written in.

`find_weights` looks in a directory, downloads when the machine has internet,
and otherwise stops with the address and the file name to place there.
"""

import collections
import hashlib
import io
import os
import pickle
import struct
import tarfile
import urllib.request
import zipfile
from typing import Any, NamedTuple

import numpy as np
from flax import traverse_util

from consistency_jax.errors import MissingFileError, read_file
from consistency_jax.evaluation import inception

TF_GRAPH_URL = "http://download.tensorflow.org/models/image/imagenet/inception-2015-12-05.tgz"
TF_GRAPH_ARCHIVE = "inception-2015-12-05.tgz"
TF_GRAPH_FILE = "classify_image_graph_def.pb"
PTH_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
PTH_FILE = "pt_inception-2015-12-05-6726825d.pth"
# torch.hub names files <name>-<first 8 hex digits of their sha256>.pth.
PTH_SHA256_PREFIX = "6726825d"
DEFAULT_DIR = os.path.join("~", ".cache", "consistency_jax")


class ConvLayer(NamedTuple):
    """One conv + batch-norm unit, in the Flax layout (kernel HWIO)."""

    kernel: np.ndarray
    scale: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray


# The TF graph's scopes of one block type -> torchvision's branch names. The
# graph concatenates 'conv', 'tower', 'tower_1', 'tower_2' in torchvision's order.
_BLOCK_A = {
    "conv": "branch1x1",
    "tower/conv": "branch5x5_1",
    "tower/conv_1": "branch5x5_2",
    "tower_1/conv": "branch3x3dbl_1",
    "tower_1/conv_1": "branch3x3dbl_2",
    "tower_1/conv_2": "branch3x3dbl_3",
    "tower_2/conv": "branch_pool",
}
_BLOCK_B = {
    "conv": "branch3x3",
    "tower/conv": "branch3x3dbl_1",
    "tower/conv_1": "branch3x3dbl_2",
    "tower/conv_2": "branch3x3dbl_3",
}
_BLOCK_C = {
    "conv": "branch1x1",
    "tower/conv": "branch7x7_1",
    "tower/conv_1": "branch7x7_2",
    "tower/conv_2": "branch7x7_3",
    **{f"tower_1/conv{'_' + str(i) if i else ''}": f"branch7x7dbl_{i + 1}" for i in range(5)},
    "tower_2/conv": "branch_pool",
}
_BLOCK_D = {
    "tower/conv": "branch3x3_1",
    "tower/conv_1": "branch3x3_2",
    **{f"tower_1/conv{'_' + str(i) if i else ''}": f"branch7x7x3_{i + 1}" for i in range(4)},
}
_BLOCK_E = {
    "conv": "branch1x1",
    "tower/conv": "branch3x3_1",
    "tower/mixed/conv": "branch3x3_2a",
    "tower/mixed/conv_1": "branch3x3_2b",
    "tower_1/conv": "branch3x3dbl_1",
    "tower_1/conv_1": "branch3x3dbl_2",
    "tower_1/mixed/conv": "branch3x3dbl_3a",
    "tower_1/mixed/conv_1": "branch3x3dbl_3b",
    "tower_2/conv": "branch_pool",
}
_MIXED_BLOCKS = (
    ("mixed", "Mixed_5b", _BLOCK_A),
    ("mixed_1", "Mixed_5c", _BLOCK_A),
    ("mixed_2", "Mixed_5d", _BLOCK_A),
    ("mixed_3", "Mixed_6a", _BLOCK_B),
    ("mixed_4", "Mixed_6b", _BLOCK_C),
    ("mixed_5", "Mixed_6c", _BLOCK_C),
    ("mixed_6", "Mixed_6d", _BLOCK_C),
    ("mixed_7", "Mixed_6e", _BLOCK_C),
    ("mixed_8", "Mixed_7a", _BLOCK_D),
    ("mixed_9", "Mixed_7b", _BLOCK_E),
    ("mixed_10", "Mixed_7c", _BLOCK_E),
)
TF_LOGITS_MATMUL = "softmax/logits/MatMul"


def tf_scope_to_module() -> dict[str, str]:
    """Every conv scope of the TF graph -> the torchvision / Flax module path ('Mixed_7c.branch_pool')."""
    table = {
        "conv": "Conv2d_1a_3x3",
        "conv_1": "Conv2d_2a_3x3",
        "conv_2": "Conv2d_2b_3x3",
        "conv_3": "Conv2d_3b_1x1",
        "conv_4": "Conv2d_4a_3x3",
    }
    for tf_block, module, branches in _MIXED_BLOCKS:
        table.update({f"{tf_block}/{scope}": f"{module}.{branch}" for scope, branch in branches.items()})
    return table


# ----------------------------------------------------------------------------
# Assembly into the Flax variable tree (shared by both formats).


def assemble_variables(layers: dict[str, ConvLayer], fc_kernel: np.ndarray) -> dict[str, Any]:
    """Places conv layers (by module path) and the [2048, 1008] classifier into {'params', 'batch_stats'}.

    Every variable of the network must be provided, with exactly its shape.
    """
    flat: dict[tuple[str, ...], np.ndarray] = {("params", "fc", "kernel"): fc_kernel}
    for module, layer in layers.items():
        path = tuple(module.split("."))
        flat[("params", *path, "conv", "kernel")] = layer.kernel
        flat[("params", *path, "bn", "scale")] = layer.scale
        flat[("params", *path, "bn", "bias")] = layer.bias
        flat[("batch_stats", *path, "bn", "mean")] = layer.mean
        flat[("batch_stats", *path, "bn", "var")] = layer.var
    expected = traverse_util.flatten_dict(inception.variable_shapes())
    missing = sorted("/".join(k) for k in expected.keys() - flat.keys())
    unknown = sorted("/".join(k) for k in flat.keys() - expected.keys())
    if missing or unknown:
        raise ValueError(f"Inception weights do not match the network: missing {missing[:5]}, unknown {unknown[:5]}.")
    for key, shape in expected.items():
        if tuple(flat[key].shape) != tuple(shape):
            raise ValueError(f"Inception weight {'/'.join(key)} has shape {flat[key].shape}, expected {shape}.")
    return traverse_util.unflatten_dict({k: np.asarray(v, np.float32) for k, v in flat.items()})


# ----------------------------------------------------------------------------
# TensorFlow GraphDef (inception-2015-12-05.tgz / classify_image_graph_def.pb).


def read_graph_def_bytes(path: str) -> bytes:
    """The serialized GraphDef from a .pb file, or from the .tgz that contains it."""
    if path.endswith((".tgz", ".tar.gz")):
        with tarfile.open(path, "r:gz") as archive:
            for member in archive.getmembers():
                if os.path.basename(member.name) == TF_GRAPH_FILE:
                    return archive.extractfile(member).read()
        raise ValueError(f"{path} has no {TF_GRAPH_FILE}; is it the {TF_GRAPH_ARCHIVE} from {TF_GRAPH_URL}?")
    with open(path, "rb") as f:
        return f.read()


def load_graph_def_variables(path: str) -> dict[str, Any]:
    """Flax variables from the 2015-12-05 TF graph (.pb or .tgz)."""
    import tensorflow as tf  # heavy import, only when this format is used

    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(read_graph_def_bytes(path))
    nodes = {node.name: node for node in graph_def.node}

    def node(name: str):
        name = name.lstrip("^").split(":")[0]
        if name not in nodes:
            raise ValueError(f"{path} has no node {name!r}: not the inception-2015-12-05 graph.")
        return nodes[name]

    def constant(name: str) -> np.ndarray:
        found = node(name)
        while found.op == "Identity":  # weights may be read through an Identity
            found = node(found.input[0])
        if found.op != "Const":
            raise ValueError(f"Node {found.name!r} is a {found.op}, expected a constant.")
        return tf.make_ndarray(found.attr["value"].tensor)

    # The graph's own input normalisation must be the one inception.preprocess reproduces.
    for name, expected in (("Sub/y", inception.PIXEL_OFFSET), ("Mul/y", inception.PIXEL_SCALE)):
        if name in nodes and not np.allclose(constant(name), expected):
            raise ValueError(f"{path}: {name} is {constant(name)}, but the network assumes {expected}.")
    layers = {}
    for scope, module in tf_scope_to_module().items():
        norm = node(f"{scope}/batchnorm")
        if norm.op != "BatchNormWithGlobalNormalization":
            raise ValueError(f"{norm.name} is a {norm.op}, expected BatchNormWithGlobalNormalization.")
        epsilon = norm.attr["variance_epsilon"].f
        if not np.isclose(epsilon, inception.BATCH_NORM_EPSILON):
            raise ValueError(f"{norm.name} has epsilon {epsilon}, the network uses {inception.BATCH_NORM_EPSILON}.")
        # Inputs: the convolution's output, then moving mean, moving variance, beta, gamma.
        mean, var, beta, gamma = (constant(name) for name in norm.input[1:5])
        if not norm.attr["scale_after_normalization"].b:
            gamma = np.ones_like(gamma)  # the op ignores gamma unless told to scale
        # TF convolution kernels are already HWIO, Flax's layout.
        layers[module] = ConvLayer(constant(f"{scope}/conv2d_params"), gamma, beta, mean, var)
    fc_kernel = constant(node(TF_LOGITS_MATMUL).input[1])
    return assemble_variables(layers, fc_kernel)


# ----------------------------------------------------------------------------
# PyTorch state dict (pytorch-fid's pt_inception-2015-12-05-6726825d.pth).

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType(NamedTuple):
    dtype: np.dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> np.ndarray:
    # A view: in the legacy format the storage bytes are read after the tensors are built.
    itemsize = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )


def _rebuild_parameter(data, *unused) -> np.ndarray:
    return data


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict into numpy arrays; refuses every class it does not know."""

    def __init__(self, file, load_storage):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
        raise pickle.UnpicklingError(f"Refusing to load {module}.{name}: a state dict holds only tensors.")

    def persistent_load(self, saved_id):
        kind, storage_type, key, _location, numel, *view = saved_id
        if kind != "storage":
            raise pickle.UnpicklingError(f"Unsupported persistent id {kind!r} in a torch file.")
        storage = self._load_storage(storage_type.dtype, str(key), int(numel))
        if view and view[0] is not None:  # legacy format: a view (key, offset, size) into the storage
            _, offset, size = view[0]
            storage = storage[offset : offset + size]
        return storage


def _read_zip_state_dict(path: str) -> dict:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl")]
        if not pickles:
            raise ValueError(f"{path} is a zip file without data.pkl: not a torch.save file.")
        prefix = pickles[0][: -len("data.pkl")]
        # Files without a byteorder record were written little-endian (torch's own default on load).
        byteorder = archive.read(f"{prefix}byteorder").decode() if f"{prefix}byteorder" in names else "little"
        stored_dtype_order = "<" if byteorder == "little" else ">"

        def load_storage(dtype: np.dtype, key: str, numel: int) -> np.ndarray:
            data = np.frombuffer(archive.read(f"{prefix}data/{key}"), dtype=dtype.newbyteorder(stored_dtype_order))
            return data[:numel].astype(dtype)

        return _StateDictUnpickler(io.BytesIO(archive.read(pickles[0])), load_storage).load()


def _read_legacy_state_dict(path: str) -> dict:
    with open(path, "rb") as f:
        if pickle.load(f) != _LEGACY_MAGIC:
            raise ValueError(f"{path} is neither a zip nor a legacy torch.save file.")
        pickle.load(f)  # protocol version
        pickle.load(f)  # system info
        storages: dict[str, np.ndarray] = {}

        def load_storage(dtype: np.dtype, key: str, numel: int) -> np.ndarray:
            return storages.setdefault(key, np.empty(numel, dtype=dtype))

        result = _StateDictUnpickler(f, load_storage).load()
        # Then each storage: int64 element count and the raw little-endian bytes, in this order.
        for key in pickle.load(f):
            storage = storages[str(key)]
            (numel,) = struct.unpack("<q", f.read(8))
            if numel != storage.size:
                raise ValueError(f"{path}: storage {key} holds {numel} elements, the tensors expect {storage.size}.")
            raw = f.read(numel * storage.dtype.itemsize)
            storage[:] = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"))
    return result


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """{name: numpy array} from a file written by torch.save(state_dict), without importing torch."""
    reader = _read_zip_state_dict if zipfile.is_zipfile(path) else _read_legacy_state_dict
    state = reader(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state dict.")
    return {name: np.array(value) for name, value in state.items()}


def load_pth_variables(path: str) -> dict[str, Any]:
    """Flax variables from pytorch-fid's FID Inception state dict."""
    state = read_torch_state_dict(path)
    used = set()

    def take(name: str) -> np.ndarray:
        if name not in state:
            raise ValueError(f"{path} has no tensor {name!r}: not pytorch-fid's {PTH_FILE}.")
        used.add(name)
        return state[name]

    layers = {}
    for module in tf_scope_to_module().values():
        layers[module] = ConvLayer(
            take(f"{module}.conv.weight").transpose(2, 3, 1, 0),  # OIHW -> HWIO
            take(f"{module}.bn.weight"),
            take(f"{module}.bn.bias"),
            take(f"{module}.bn.running_mean"),
            take(f"{module}.bn.running_var"),
        )
    fc_kernel = take("fc.weight").T
    # fc.bias is not used: the standard IS evaluators take logits without it (see inception.py).
    ignored = {name for name in state if name.endswith("num_batches_tracked") or name == "fc.bias"}
    unknown = sorted(set(state) - used - ignored)
    if unknown:
        raise ValueError(f"{path} has tensors the FID Inception does not have: {unknown[:5]}.")
    return assemble_variables(layers, fc_kernel)


# ----------------------------------------------------------------------------
# Finding (or fetching) the weights.


def load_inception_variables(path: str) -> dict[str, Any]:
    """Flax variables from a .pth, .pb or .tgz file (picked by the file's suffix).

    A damaged file (truncated download, another format) raises FileReadError naming it.
    """
    advice = f"Delete it and download it again ({PTH_URL} or {TF_GRAPH_URL})."
    if path.endswith((".pth", ".pt")):
        return read_file(path, "The Inception weight file", load_pth_variables, advice)
    if path.endswith((".pb", ".tgz", ".tar.gz")):
        return read_file(path, "The Inception weight file", load_graph_def_variables, advice)
    raise ValueError(
        f"Unknown Inception weight file {path!r}: expected {PTH_FILE}, {TF_GRAPH_ARCHIVE} or {TF_GRAPH_FILE}."
    )


def _download(url: str, destination: str) -> None:
    """Fetches url to destination atomically (no half-written file is ever found later)."""
    partial = destination + ".partial"
    with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
        while chunk := response.read(1 << 20):
            out.write(chunk)
    os.replace(partial, destination)


def _check_pth_hash(path: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if not digest.hexdigest().startswith(PTH_SHA256_PREFIX):
        raise ValueError(f"{path} is corrupt: its sha256 does not start with {PTH_SHA256_PREFIX}. Delete it and retry.")


def find_weights(location: str | None, *, allow_download: bool = True) -> str:
    """Path of the Inception weights: `location` itself if it is a file, else a known file inside it.

    Looks for the .pth, then the .pb, then the .tgz; if none is there, downloads
    the TF graph archive into the directory, and if that fails raises an error
    that says what to download and where to put it.
    """
    directory = os.path.expanduser(location or DEFAULT_DIR)
    if os.path.isfile(directory):
        return directory
    for name in (PTH_FILE, TF_GRAPH_FILE, TF_GRAPH_ARCHIVE):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            if name == PTH_FILE:
                _check_pth_hash(candidate)
            return candidate
    instructions = (
        f"Inception weights not found in {directory}. Download either\n"
        f"  {TF_GRAPH_URL}  (save as {TF_GRAPH_ARCHIVE}) or\n"
        f"  {PTH_URL}  (save as {PTH_FILE})\n"
        f"into {directory}, or point config.eval.inception_dir at the directory or file."
    )
    if not allow_download:
        raise MissingFileError(instructions)
    destination = os.path.join(directory, TF_GRAPH_ARCHIVE)
    try:
        os.makedirs(directory, exist_ok=True)
        _download(TF_GRAPH_URL, destination)
    except OSError as error:  # URLError and socket timeouts are OSErrors
        raise MissingFileError(f"{instructions}\nAutomatic download failed: {error}") from error
    return destination
