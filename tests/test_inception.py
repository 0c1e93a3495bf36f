"""The FID Inception-v3: input pipeline, architecture with random weights, and weight loading from both formats."""

import collections
import io
import os
import pickle
import struct
import sys
import tarfile
import types
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from consistency_jax.evaluation import inception, inception_weights


@pytest.fixture(scope="module")
def shapes():
    return traverse_util.flatten_dict(inception.variable_shapes())


# ----------------------------------------------------------------------------- input pipeline


def test_resize_matches_tensorflows_legacy_resize_bilinear():
    import tensorflow as tf

    images = np.random.default_rng(0).integers(0, 256, size=(2, 32, 20, 3), dtype=np.uint8)
    # The 2015 graph's ResizeBilinear predates half-pixel centres: align_corners=False, half_pixel_centers=False.
    expected = tf.raw_ops.ResizeBilinear(
        images=images.astype(np.float32), size=[299, 299], align_corners=False, half_pixel_centers=False
    ).numpy()
    resized = np.asarray(inception.preprocess(jnp.asarray(images))) / inception.PIXEL_SCALE + inception.PIXEL_OFFSET
    np.testing.assert_allclose(resized, expected, atol=2e-3)


def test_preprocess_normalises_like_the_graph_and_tiles_grayscale():
    gray = np.zeros((1, 299, 299, 1), np.uint8)
    gray[0, 0, 0, 0] = 255
    x = np.asarray(inception.preprocess(jnp.asarray(gray)))
    assert x.shape == (1, 299, 299, 3)
    np.testing.assert_allclose(x[0, 0, 0], [127 / 128] * 3)  # (255 - 128) / 128
    np.testing.assert_allclose(x[0, 1, 1], [-1.0] * 3)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        inception.preprocess(jnp.zeros((1, 8, 8, 2)))


def test_same_average_pool_ignores_padding_like_tf():
    pooled = np.asarray(inception._same_pool(jnp.ones((1, 5, 5, 2)), "avg"))
    np.testing.assert_allclose(pooled, 1.0)  # with padded zeros counted, the corners would be 4/9


# ----------------------------------------------------------------------------- architecture


def test_variable_shapes_are_the_fid_inception():
    flat = traverse_util.flatten_dict(inception.variable_shapes())
    assert flat[("params", "Conv2d_1a_3x3", "conv", "kernel")] == (3, 3, 3, 32)
    assert flat[("params", "Mixed_6b", "branch7x7_2", "conv", "kernel")] == (1, 7, 128, 128)
    assert flat[("params", "Mixed_7c", "branch3x3dbl_3b", "conv", "kernel")] == (3, 1, 384, 384)
    assert flat[("params", "fc", "kernel")] == (2048, 1008)
    assert ("params", "fc", "bias") not in flat
    convs = [k for k in flat if k[-2:] == ("conv", "kernel")]
    assert len(convs) == 94
    # Keras' InceptionV3 (same layers, BN without gamma, 1000 classes) has 23,851,784 variables, 34,432 of them
    # BN statistics: so 21,751,136 conv weights and 17,216 BN channels; here BN has a scale and 1008 classes.
    num_params = sum(int(np.prod(s)) for k, s in flat.items() if k[0] == "params")
    assert num_params == 21_751_136 + 2 * 17_216 + 2048 * 1008


def _random_variables(shapes, seed=0):
    rng = np.random.default_rng(seed)
    flat = {}
    for key, shape in shapes.items():
        if key[-1] == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            flat[key] = rng.normal(scale=np.sqrt(2.0 / fan_in), size=shape).astype(np.float32)
        elif key[-1] in ("scale", "var"):
            flat[key] = rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
        else:
            flat[key] = rng.normal(scale=0.1, size=shape).astype(np.float32)
    return traverse_util.unflatten_dict(flat)


def test_forward_with_random_weights(shapes):
    variables = _random_variables(shapes)
    image = np.random.default_rng(1).integers(0, 256, size=(1, 299, 299, 3), dtype=np.uint8)
    out = jax.jit(inception.InceptionV3().apply)(variables, image)
    pool, logits = np.asarray(out["pool"]), np.asarray(out["logits"])
    assert pool.shape == (1, 2048) and logits.shape == (1, 1008)
    assert np.isfinite(pool).all() and (pool >= 0).all() and pool.max() > 0  # mean of ReLU outputs
    np.testing.assert_allclose(logits, pool @ variables["params"]["fc"]["kernel"], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- name tables


def _independent_tf_scopes():
    """The graph's conv scopes, enumerated from its structure (independently of the loader's table)."""
    scopes = [f"conv{s}" for s in ("", "_1", "_2", "_3", "_4")]
    conv = lambda i: "conv" if i == 0 else f"conv_{i}"  # noqa: E731
    for m in ("mixed", "mixed_1", "mixed_2"):
        scopes += [f"{m}/conv", f"{m}/tower/conv", f"{m}/tower/conv_1", f"{m}/tower_2/conv"]
        scopes += [f"{m}/tower_1/{conv(i)}" for i in range(3)]
    scopes += ["mixed_3/conv"] + [f"mixed_3/tower/{conv(i)}" for i in range(3)]
    for m in ("mixed_4", "mixed_5", "mixed_6", "mixed_7"):
        scopes += [f"{m}/conv", f"{m}/tower_2/conv"] + [f"{m}/tower/{conv(i)}" for i in range(3)]
        scopes += [f"{m}/tower_1/{conv(i)}" for i in range(5)]
    scopes += [f"mixed_8/tower/{conv(i)}" for i in range(2)] + [f"mixed_8/tower_1/{conv(i)}" for i in range(4)]
    for m in ("mixed_9", "mixed_10"):
        scopes += [f"{m}/conv", f"{m}/tower_2/conv", f"{m}/tower/conv", f"{m}/tower_1/conv", f"{m}/tower_1/conv_1"]
        scopes += [f"{m}/{t}/mixed/{c}" for t in ("tower", "tower_1") for c in ("conv", "conv_1")]
    return scopes


def test_tf_scope_table_covers_the_graph():
    table = inception_weights.tf_scope_to_module()
    assert sorted(table) == sorted(_independent_tf_scopes())
    assert len(set(table.values())) == len(table) == 94
    assert table["mixed_10/tower_1/mixed/conv_1"] == "Mixed_7c.branch3x3dbl_3b"
    assert table["mixed_8/tower/conv_1"] == "Mixed_7a.branch3x3_2"
    assert table["mixed_4/tower_1/conv_4"] == "Mixed_6b.branch7x7dbl_5"


# ----------------------------------------------------------------------------- GraphDef loading


def _module_shapes(shapes, module):
    path = tuple(module.split("."))
    kernel = shapes[("params", *path, "conv", "kernel")]
    return kernel, kernel[-1]


def _build_graph_def(shapes, special):
    """A GraphDef with the real node names, ops and shapes; tensor i is filled with i unless in `special`."""
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef()
    values = {}

    def add_const(name, shape):
        value = special.get(name, np.full(shape, float(len(values)), np.float32))
        values[name] = value
        node = graph_def.node.add(name=name, op="Const")
        node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
        node.attr["dtype"].type = tf.float32.as_datatype_enum

    for scope, module in inception_weights.tf_scope_to_module().items():
        kernel_shape, channels = _module_shapes(shapes, module)
        add_const(f"{scope}/conv2d_params", kernel_shape)
        graph_def.node.add(name=f"{scope}/Conv2D", op="Conv2D", input=["input", f"{scope}/conv2d_params"])
        inputs = [f"{scope}/Conv2D"]
        for part in ("moving_mean", "moving_variance", "beta", "gamma"):
            add_const(f"{scope}/batchnorm/{part}", (channels,))
            inputs.append(f"{scope}/batchnorm/{part}")
        norm = graph_def.node.add(name=f"{scope}/batchnorm", op="BatchNormWithGlobalNormalization", input=inputs)
        norm.attr["variance_epsilon"].f = 0.001
        norm.attr["scale_after_normalization"].b = False
    add_const("softmax/weights", (2048, 1008))
    graph_def.node.add(name="softmax/logits/MatMul", op="MatMul", input=["pool_3/_reshape", "softmax/weights"])
    return graph_def, values


def test_graph_def_weights_land_in_place(shapes, tmp_path):
    rng = np.random.default_rng(2)
    special = {
        "mixed_10/tower_1/mixed/conv_1/conv2d_params": rng.normal(size=(3, 1, 384, 384)).astype(np.float32),
        "conv/conv2d_params": rng.normal(size=(3, 3, 3, 32)).astype(np.float32),
        "mixed_2/tower_2/conv/batchnorm/moving_variance": rng.uniform(size=64).astype(np.float32),
        "mixed_2/tower_2/conv/batchnorm/beta": rng.normal(size=64).astype(np.float32),
        "softmax/weights": rng.normal(size=(2048, 1008)).astype(np.float32),
    }
    graph_def, values = _build_graph_def(shapes, special)
    path = str(tmp_path / inception_weights.TF_GRAPH_FILE)
    with open(path, "wb") as f:
        f.write(graph_def.SerializeToString())
    variables = inception_weights.load_inception_variables(path)
    params, stats = variables["params"], variables["batch_stats"]
    # Hand-written expectations for a few tensors (TF kernels are HWIO, as Flax's).
    np.testing.assert_array_equal(params["Mixed_7c"]["branch3x3dbl_3b"]["conv"]["kernel"],
                                  special["mixed_10/tower_1/mixed/conv_1/conv2d_params"])
    np.testing.assert_array_equal(params["Conv2d_1a_3x3"]["conv"]["kernel"], special["conv/conv2d_params"])
    np.testing.assert_array_equal(stats["Mixed_5d"]["branch_pool"]["bn"]["var"],
                                  special["mixed_2/tower_2/conv/batchnorm/moving_variance"])
    np.testing.assert_array_equal(params["Mixed_5d"]["branch_pool"]["bn"]["bias"],
                                  special["mixed_2/tower_2/conv/batchnorm/beta"])
    np.testing.assert_array_equal(params["fc"]["kernel"], special["softmax/weights"])
    # gamma is ignored, as the op does with scale_after_normalization=False.
    np.testing.assert_array_equal(params["Mixed_6e"]["branch1x1"]["bn"]["scale"], np.ones(192, np.float32))
    # Every other tensor: its fill value identifies its source node.
    for scope, module in inception_weights.tf_scope_to_module().items():
        node = params
        for part in module.split("."):
            node = node[part]
        np.testing.assert_array_equal(node["conv"]["kernel"], values[f"{scope}/conv2d_params"])
        stat = stats
        for part in module.split("."):
            stat = stat[part]
        np.testing.assert_array_equal(stat["bn"]["mean"], values[f"{scope}/batchnorm/moving_mean"])


def test_graph_def_with_another_input_normalisation_is_rejected(shapes, tmp_path):
    import tensorflow as tf

    graph_def, _ = _build_graph_def(shapes, {})
    node = graph_def.node.add(name="Sub/y", op="Const")
    node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.float32(127.5)))
    path = str(tmp_path / "graph.pb")
    with open(path, "wb") as f:
        f.write(graph_def.SerializeToString())
    with pytest.raises(ValueError, match="Sub/y"):
        inception_weights.load_inception_variables(path)


def test_graph_def_is_read_from_the_tgz(tmp_path):
    path = str(tmp_path / inception_weights.TF_GRAPH_ARCHIVE)
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in (("LICENSE", b"text"), (inception_weights.TF_GRAPH_FILE, b"graph bytes")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    assert inception_weights.read_graph_def_bytes(path) == b"graph bytes"


def test_graph_def_without_the_inception_nodes_is_rejected(tmp_path):
    import tensorflow as tf

    path = str(tmp_path / "other.pb")
    with open(path, "wb") as f:
        f.write(tf.compat.v1.GraphDef().SerializeToString())
    with pytest.raises(ValueError, match="not the inception-2015-12-05 graph"):
        inception_weights.load_inception_variables(path)


# ----------------------------------------------------------------------------- .pth loading (no torch)


@pytest.fixture
def fake_torch(monkeypatch):
    """Just enough of a `torch` module for pickle to write what torch.save writes (the names are what matter)."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only for pickling")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    storages = {}
    for name in ("FloatStorage", "LongStorage"):
        storages[name] = type(name, (), {"__module__": "torch"})
        setattr(torch, name, storages[name])
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return types.SimpleNamespace(rebuild=_rebuild_tensor_v2, storages=storages)


class _Storage:
    def __init__(self, key, storage_type, data):
        self.key, self.storage_type, self.data = key, storage_type, data


class _Tensor:
    def __init__(self, fake_torch, storage, size, stride):
        self.reduced = (fake_torch.rebuild, (storage, 0, size, stride, False, collections.OrderedDict()))

    def __reduce__(self):
        return self.reduced


def _torch_tensors(fake_torch, state):
    """{name: array} -> {name: _Tensor}; fc.weight is stored transposed (a strided view) to exercise strides."""
    tensors = {}
    for i, (name, value) in enumerate(state.items()):
        storage_type = fake_torch.storages["LongStorage" if value.dtype == np.int64 else "FloatStorage"]
        if name == "fc.weight":
            storage = _Storage(str(i), storage_type, np.ascontiguousarray(value.T))
            tensors[name] = _Tensor(fake_torch, storage, value.shape, (1, value.shape[0]))
        else:
            data = np.ascontiguousarray(value)
            stride = tuple(int(s) // data.itemsize for s in data.strides)
            tensors[name] = _Tensor(fake_torch, _Storage(str(i), storage_type, data), data.shape, stride)
    return collections.OrderedDict(tensors)


def _pickle_state(tensors, legacy):
    stored = []

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if not isinstance(obj, _Storage):
                return None
            stored.append(obj)
            saved = ("storage", obj.storage_type, obj.key, "cpu", obj.data.size)
            return saved + (None,) if legacy else saved

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(tensors)
    return buffer.getvalue(), stored


def _save_zip(path, tensors):
    data, stored = _pickle_state(tensors, legacy=False)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/byteorder", "little")
        for storage in stored:
            little_endian = storage.data.astype(storage.data.dtype.newbyteorder("<"))
            archive.writestr(f"archive/data/{storage.key}", little_endian.tobytes())
        archive.writestr("archive/version", "3\n")


def _save_legacy(path, tensors):
    data, stored = _pickle_state(tensors, legacy=True)
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(data)
        pickle.dump([s.key for s in stored], f, protocol=2)
        for storage in stored:
            f.write(struct.pack("<q", storage.data.size))
            f.write(storage.data.tobytes())


def _pytorch_fid_state(shapes, special):
    """pytorch-fid's state dict names and layouts (OIHW kernels, [1008, 2048] fc), filled with index values."""
    state = collections.OrderedDict()
    for module in inception_weights.tf_scope_to_module().values():
        kernel_shape, channels = _module_shapes(shapes, module)
        h, w, i, o = kernel_shape
        names = {"conv.weight": (o, i, h, w), "bn.weight": (channels,), "bn.bias": (channels,),
                 "bn.running_mean": (channels,), "bn.running_var": (channels,)}
        for suffix, shape in names.items():
            name = f"{module}.{suffix}"
            state[name] = special.get(name, np.full(shape, float(len(state)), np.float32))
        state[f"{module}.bn.num_batches_tracked"] = np.array(0, np.int64)
    state["fc.weight"] = special["fc.weight"]
    state["fc.bias"] = np.zeros(1008, np.float32)
    return state


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pth_weights_land_in_place(shapes, tmp_path, fake_torch, legacy):
    rng = np.random.default_rng(3)
    special = {
        "Mixed_7c.branch3x3dbl_3b.conv.weight": rng.normal(size=(384, 384, 3, 1)).astype(np.float32),
        "Mixed_6b.branch7x7_2.conv.weight": rng.normal(size=(128, 128, 1, 7)).astype(np.float32),
        "Mixed_5b.branch_pool.bn.weight": rng.normal(size=32).astype(np.float32),
        "Mixed_5b.branch_pool.bn.running_var": rng.uniform(size=32).astype(np.float32),
        "fc.weight": rng.normal(size=(1008, 2048)).astype(np.float32),
    }
    state = _pytorch_fid_state(shapes, special)
    path = str(tmp_path / inception_weights.PTH_FILE)
    (_save_legacy if legacy else _save_zip)(path, _torch_tensors(fake_torch, state))

    read = inception_weights.read_torch_state_dict(path)
    assert list(read) == list(state)
    np.testing.assert_array_equal(read["fc.weight"], special["fc.weight"])

    variables = inception_weights.load_inception_variables(path)
    params, stats = variables["params"], variables["batch_stats"]
    # OIHW (torch) -> HWIO (Flax): the 1x3 / 3x1 and 1x7 kernels would not survive a wrong transpose.
    np.testing.assert_array_equal(params["Mixed_7c"]["branch3x3dbl_3b"]["conv"]["kernel"],
                                  special["Mixed_7c.branch3x3dbl_3b.conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"][0, 3, 5, 7],
                                  special["Mixed_6b.branch7x7_2.conv.weight"][7, 5, 0, 3])
    np.testing.assert_array_equal(params["Mixed_5b"]["branch_pool"]["bn"]["scale"],
                                  special["Mixed_5b.branch_pool.bn.weight"])
    np.testing.assert_array_equal(stats["Mixed_5b"]["branch_pool"]["bn"]["var"],
                                  special["Mixed_5b.branch_pool.bn.running_var"])
    np.testing.assert_array_equal(params["fc"]["kernel"], special["fc.weight"].T)
    for module in inception_weights.tf_scope_to_module().values():
        node = variables["batch_stats"]
        for part in module.split("."):
            node = node[part]
        np.testing.assert_array_equal(node["bn"]["mean"], state[f"{module}.bn.running_mean"])


def test_pth_loader_refuses_code_and_unknown_tensors(tmp_path, fake_torch):
    path = str(tmp_path / "evil.pth")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(os.getcwd, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="Refusing"):
        inception_weights.read_torch_state_dict(path)

    partial = str(tmp_path / "partial.pth")
    state = collections.OrderedDict({"fc.weight": np.zeros((1008, 2048), np.float32)})
    _save_zip(partial, _torch_tensors(fake_torch, state))
    with pytest.raises(ValueError, match="Conv2d_1a_3x3.conv.weight"):
        inception_weights.load_inception_variables(partial)


# ----------------------------------------------------------------------------- finding the weights


def test_find_weights_prefers_present_files_and_explains_absence(tmp_path, monkeypatch):
    downloads = []
    monkeypatch.setattr(inception_weights, "_download", lambda url, dest: downloads.append((url, dest)))
    assert inception_weights.find_weights(str(tmp_path)) == str(tmp_path / inception_weights.TF_GRAPH_ARCHIVE)
    assert downloads == [(inception_weights.TF_GRAPH_URL, str(tmp_path / inception_weights.TF_GRAPH_ARCHIVE))]

    graph = tmp_path / inception_weights.TF_GRAPH_FILE
    graph.write_bytes(b"")
    assert inception_weights.find_weights(str(tmp_path)) == str(graph)
    assert inception_weights.find_weights(str(graph)) == str(graph)  # a file path is used as it is

    corrupt = tmp_path / inception_weights.PTH_FILE
    corrupt.write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="sha256"):
        inception_weights.find_weights(str(tmp_path))

    empty = tmp_path / "empty"
    with pytest.raises(FileNotFoundError) as error:
        inception_weights.find_weights(str(empty), allow_download=False)
    for expected in (inception_weights.TF_GRAPH_URL, inception_weights.PTH_URL, inception_weights.PTH_FILE, str(empty)):
        assert expected in str(error.value)


def test_inception_extractor_from_config_runs_the_loaded_network(shapes, tmp_path, fake_torch):
    """config -> weight file -> Flax variables -> sharded, batched features, equal to a direct forward pass."""
    import ml_collections

    from consistency_jax.evaluation import extractors

    variables = _random_variables(shapes, seed=4)
    state = collections.OrderedDict()
    for module in inception_weights.tf_scope_to_module().values():
        params, stats = variables["params"], variables["batch_stats"]
        for part in module.split("."):
            params, stats = params[part], stats[part]
        state[f"{module}.conv.weight"] = params["conv"]["kernel"].transpose(3, 2, 0, 1)  # HWIO -> OIHW
        state[f"{module}.bn.weight"] = params["bn"]["scale"]
        state[f"{module}.bn.bias"] = params["bn"]["bias"]
        state[f"{module}.bn.running_mean"] = stats["bn"]["mean"]
        state[f"{module}.bn.running_var"] = stats["bn"]["var"]
    state["fc.weight"] = variables["params"]["fc"]["kernel"].T
    path = str(tmp_path / "my_inception.pth")  # a file path in inception_dir is used as it is
    _save_zip(path, _torch_tensors(fake_torch, state))

    eval_config = ml_collections.ConfigDict({"feature_extractor": "inception", "inception_dir": path})
    extractor = extractors.create_feature_extractor(eval_config, cache_dir=str(tmp_path))
    images = np.random.default_rng(5).integers(0, 256, size=(3, 16, 16, 1), dtype=np.uint8)
    features = extractor(images)  # 3 images padded to the 8 test devices
    direct = jax.jit(inception.InceptionV3().apply)(variables, images)
    assert extractor.name == "inception" and features["pool"].shape == (3, 2048)
    np.testing.assert_allclose(features["pool"], np.asarray(direct["pool"]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(features["logits"], np.asarray(direct["logits"]), rtol=1e-4, atol=1e-4)
