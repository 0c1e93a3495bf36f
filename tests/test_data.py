"""Input pipeline: sources by name, value checks, sharding over processes, exact resume, clear errors."""

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from configs import default
from consistency_jax.data import digits as digits_lib
from consistency_jax.data import pipeline, sources
from tests.helpers import child_xla_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_config(**overrides):
    config = default.get_config().data
    config.unlock()
    for key, value in overrides.items():
        config[key] = value
    return config


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Inverse of the pipeline's [0, 255] -> [-1, 1] map, computed independently."""
    return np.round((images + 1.0) * 127.5).astype(np.uint8)


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def write_indexed_npz(path, count, size=6, with_labels=True):
    """Image i is constant with value 3*i (unique per image), label i % 5."""
    images = np.broadcast_to(
        (3 * np.arange(count, dtype=np.uint8))[:, None, None, None], (count, size, size, 3)
    )
    arrays = {"images": np.ascontiguousarray(images)}
    if with_labels:
        arrays["labels"] = np.arange(count) % 5
    np.savez(path, **arrays)
    return arrays


def indices_of(batch) -> np.ndarray:
    """The example indices of a batch of write_indexed_npz images."""
    return to_uint8(batch["image"])[:, 0, 0, 0].astype(np.int64) // 3


# ---------------------------------------------------------------- image fitting


def test_fit_image_centre_crops_the_longer_side():
    image = np.random.RandomState(0).randint(0, 256, (4, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(sources.fit_image(image, 4, 3), image[:, 2:6])


def test_fit_image_box_downsamples_before_bicubic():
    blocks = np.random.RandomState(1).randint(0, 256, (4, 4, 3), dtype=np.uint8)
    image = blocks.repeat(2, axis=0).repeat(2, axis=1)  # 8x8 of constant 2x2 blocks
    np.testing.assert_array_equal(sources.fit_image(image, 4, 3), blocks)


def test_fit_image_converts_grey_to_rgb():
    grey = np.random.RandomState(2).randint(0, 256, (5, 5, 1), dtype=np.uint8)
    np.testing.assert_array_equal(sources.fit_image(grey, 5, 3), np.repeat(grey, 3, axis=-1))


# ---------------------------------------------------------------- TFDS datasets (mocked, no download)

TFDS_CASES = [
    # name, image_size, num_classes, stored image size (None: varies, needs the centre crop)
    ("cifar10", 32, 10, 32),
    ("imagenet_resized/64x64", 64, 1000, 64),
    ("lsun/cat", 16, 0, None),
]


@pytest.mark.parametrize("name,image_size,num_classes,stored_size", TFDS_CASES)
def test_tfds_dataset_yields_the_source_examples(name, image_size, num_classes, stored_size):
    num_examples, batch = 10, 4
    config = data_config(name=name, image_size=image_size, num_channels=3, num_classes=num_classes)
    with tfds.testing.mock_data(num_examples=num_examples):
        pipeline.check_dataset(config)
        info = pipeline.dataset_info(config)
        raw = tfds.data_source(name, split="train", download=False)
        raw_examples = [raw[i] for i in range(num_examples)]
        batches = take(pipeline.create_train_iterator(config, global_batch_size=batch, seed=0), 2)
    assert info == pipeline.DatasetInfo((image_size, image_size, 3), num_classes, num_examples)
    images = np.concatenate([b["image"] for b in batches])
    assert images.dtype == np.float32 and images.shape == (2 * batch, image_size, image_size, 3)
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert ("label" in batches[0]) == (num_classes > 0)
    if stored_size is None:
        return  # variable-size LSUN images: shape and range only; the crop is checked by the fit_image tests
    # Every yielded example is a distinct stored example, with its own label.
    by_bytes = {ex["image"].tobytes(): i for i, ex in enumerate(raw_examples)}
    picked = [by_bytes[img.tobytes()] for img in to_uint8(images)]
    assert len(set(picked)) == len(picked)
    labels = np.concatenate([b["label"] for b in batches])
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, [raw_examples[i]["label"] for i in picked])


def test_unprepared_tfds_dataset_says_how_to_build_it(tmp_path):
    config = data_config(name="cifar10", image_size=32, num_channels=3, data_dir=str(tmp_path))
    with pytest.raises(pipeline.DataConfigError, match="tfds build cifar10 --file_format=array_record"):
        pipeline.check_dataset(config)


def test_unprepared_imagenet_explains_the_manual_download(tmp_path):
    config = data_config(name="imagenet_resized/64x64", image_size=64, num_channels=3, data_dir=str(tmp_path))
    with pytest.raises(pipeline.DataConfigError, match="(?s)manual download.*Imagenet64_train_part1_npz.zip"):
        pipeline.check_dataset(config)


# ---------------------------------------------------------------- in-memory datasets


def test_digits_batches_are_the_digits_with_their_labels():
    config = data_config(name="digits", image_size=8, num_channels=1, num_classes=10)
    images, labels = digits_lib.load_digits_split("train")
    iterator = pipeline.create_train_iterator(config, global_batch_size=100, seed=3)
    batches = take(iterator, 15)  # one epoch: 1500 / 100
    got_images = to_uint8(np.concatenate([b["image"] for b in batches]))
    got_labels = np.concatenate([b["label"] for b in batches])
    # Compare as multisets of (image, label): the epoch is a permutation of the split.
    expected = sorted(img.tobytes() + bytes([lab]) for img, lab in zip(images, labels))
    got = sorted(img.tobytes() + bytes([lab]) for img, lab in zip(got_images, got_labels))
    assert got == expected


def test_digits_resized_to_the_config_resolution():
    config = data_config(name="digits", image_size=16, num_channels=3)
    images, _ = pipeline.load_eval_images(config, "test", max_examples=5)
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
    originals, _ = digits_lib.load_digits_split("test")
    # Upsampled, the grey digit keeps its mean brightness (within bicubic ringing) and is grey in RGB.
    np.testing.assert_allclose(images.mean(axis=(1, 2, 3)), originals[:5].mean(axis=(1, 2, 3)), atol=4.0)
    np.testing.assert_array_equal(images[..., 0], images[..., 2])


def test_npz_epoch_is_a_permutation_with_labels(tmp_path):
    path = tmp_path / "data.npz"
    arrays = write_indexed_npz(path, count=22)
    config = data_config(name="npz", path=str(path), image_size=6, num_channels=3, num_classes=5)
    iterator = pipeline.create_train_iterator(config, global_batch_size=4, seed=0)
    epoch1 = take(iterator, 5)  # 22 // 4 batches; the last 2 of each epoch's order are dropped
    epoch2 = take(iterator, 5)
    for epoch in (epoch1, epoch2):
        seen = np.concatenate([indices_of(b) for b in epoch])
        assert len(set(seen)) == 20 and set(seen) <= set(range(22))
        np.testing.assert_array_equal(np.concatenate([b["label"] for b in epoch]), arrays["labels"][seen])
    assert not np.array_equal(indices_of(epoch1[0]), indices_of(epoch2[0]))  # reshuffled each epoch


def test_eval_images_are_the_first_stored_examples(tmp_path):
    arrays = write_indexed_npz(tmp_path / "d.npz", count=12)
    config = data_config(
        name="npz", path=str(tmp_path / "d.npz"), image_size=6, num_channels=3, num_classes=5
    )
    images, labels = pipeline.load_eval_images(config, "train", max_examples=7)
    np.testing.assert_array_equal(images, arrays["images"][:7])
    np.testing.assert_array_equal(labels, arrays["labels"][:7])
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    digits_config = data_config(name="digits", image_size=8, num_channels=1, num_classes=10)
    digit_images, digit_labels = pipeline.load_eval_images(digits_config, "test", max_examples=None)
    expected_images, expected_labels = digits_lib.load_digits_split("test")
    np.testing.assert_array_equal(digit_images, expected_images)
    np.testing.assert_array_equal(digit_labels, expected_labels)


@pytest.mark.parametrize("name,split", [("digits", "test"), ("cifar10", "test"),
                                        ("imagenet_resized/64x64", "validation"), ("lsun/cat", None),
                                        ("npz", None)])
def test_heldout_split(name, split):
    assert pipeline.heldout_split(data_config(name=name)) == split


def test_npz_images_are_resized_to_the_config_resolution(tmp_path):
    blocks = np.random.RandomState(0).randint(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "big.npz", images=blocks.repeat(2, axis=1).repeat(2, axis=2))
    config = data_config(name="npz", path=str(tmp_path / "big.npz"), image_size=4, num_channels=3)
    images, labels = pipeline.load_eval_images(config, "train", max_examples=None)
    np.testing.assert_array_equal(images, blocks)
    np.testing.assert_array_equal(labels, [-1, -1, -1])


def write_image_folder(root, corrupt: bool):
    """Two class folders of 3 images each; pixel value 10*class + image index; optionally a corrupt file."""
    expected = {}
    for label in range(2):
        (root / f"class_{label}").mkdir(parents=True)
        for i in range(3):
            value = 10 * label + i
            path = root / f"class_{label}" / f"img_{i}.png"
            Image.fromarray(np.full((12, 12, 3), value, np.uint8)).save(path)
            expected[value] = label
    if corrupt:
        (root / "class_1" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    (root / "class_0" / "notes.txt").write_text("not an image, ignored")
    return expected


def test_folder_with_class_subfolders(tmp_path):
    expected = write_image_folder(tmp_path, corrupt=False)
    config = data_config(name="folder", path=str(tmp_path), image_size=6, num_channels=3, num_classes=2)
    pipeline.check_dataset(config)
    assert pipeline.dataset_info(config).num_examples == 6
    batches = take(pipeline.create_train_iterator(config, global_batch_size=3, seed=0), 2)
    images = to_uint8(np.concatenate([b["image"] for b in batches]))
    assert images.shape == (6, 6, 6, 3)
    values = images[:, 0, 0, 0]
    assert sorted(values) == sorted(expected)
    np.testing.assert_array_equal(
        np.concatenate([b["label"] for b in batches]), [expected[v] for v in values]
    )


def test_folder_corrupt_image_stops_with_its_path(tmp_path):
    write_image_folder(tmp_path, corrupt=True)
    config = data_config(
        name="folder", path=str(tmp_path), image_size=6, num_channels=3, on_bad_image="error"
    )
    with pytest.raises(pipeline.DataConfigError, match="broken.jpg"):
        pipeline.check_dataset(config)


def test_folder_corrupt_image_is_skipped_and_counted(tmp_path, caplog):
    write_image_folder(tmp_path, corrupt=True)
    config = data_config(name="folder", path=str(tmp_path), image_size=6, num_channels=3, on_bad_image="skip")
    with caplog.at_level(logging.WARNING):
        info = pipeline.dataset_info(config)
    assert info.num_examples == 6
    assert "Skipping 1 of 7" in caplog.text and "broken.jpg" in caplog.text


# ---------------------------------------------------------------- flip, determinism, resume


def flip_config(tmp_path):
    # Asymmetric images (a left-to-right ramp), so a flip is visible.
    ramp = np.broadcast_to(np.arange(0, 240, 40, dtype=np.uint8)[None, None, :, None], (16, 6, 6, 3))
    np.savez(tmp_path / "ramp.npz", images=np.ascontiguousarray(ramp))
    return data_config(
        name="npz", path=str(tmp_path / "ramp.npz"), image_size=6, num_channels=3, random_flip=True
    )


def test_random_flip_mirrors_some_images(tmp_path):
    config = flip_config(tmp_path)
    images = to_uint8(
        np.concatenate(
            [b["image"] for b in take(pipeline.create_train_iterator(config, global_batch_size=8, seed=0), 4)]
        )
    )
    ramp = np.arange(0, 240, 40, dtype=np.uint8)
    rows = images[:, 0, :, 0]
    is_plain = (rows == ramp).all(axis=1)
    is_mirror = (rows == ramp[::-1]).all(axis=1)
    assert (is_plain | is_mirror).all()
    assert 4 <= is_mirror.sum() <= 28  # about half of 32 flipped


def test_same_seed_same_batches_other_seed_other_batches(tmp_path):
    write_indexed_npz(tmp_path / "d.npz", count=40)
    config = data_config(
        name="npz", path=str(tmp_path / "d.npz"), image_size=6, num_channels=3, random_flip=True
    )

    def run(seed):
        return [
            indices_of(b)
            for b in take(pipeline.create_train_iterator(config, global_batch_size=8, seed=seed), 6)
        ]

    np.testing.assert_array_equal(run(7), run(7))
    assert not np.array_equal(run(7), run(8))


def test_resume_yields_the_batches_of_an_uninterrupted_run(tmp_path):
    config = flip_config(tmp_path)
    uninterrupted = pipeline.create_train_iterator(config, global_batch_size=6, seed=1)
    first = take(uninterrupted, 3)
    state = json.loads(json.dumps(uninterrupted.get_state()))  # as stored in a checkpoint
    rest = take(uninterrupted, 5)  # crosses the epoch boundary (16 // 6 = 2 batches per epoch)
    resumed = pipeline.create_train_iterator(config, global_batch_size=6, seed=1)
    resumed.set_state(state)
    assert state["global_batches_consumed"] == len(first)
    for expected, got in zip(rest, take(resumed, 5)):
        np.testing.assert_array_equal(expected["image"], got["image"])


def test_state_from_one_process_resumes_on_two(tmp_path):
    write_indexed_npz(tmp_path / "d.npz", count=30)
    config = data_config(
        name="npz", path=str(tmp_path / "d.npz"), image_size=6, num_channels=3, random_flip=True
    )
    single = pipeline.create_train_iterator(
        config, global_batch_size=8, seed=0, process_index=0, process_count=1
    )
    take(single, 2)
    state = single.get_state()
    expected = take(single, 3)
    shares = []
    for process_index in range(2):
        share = pipeline.create_train_iterator(
            config, global_batch_size=8, seed=0, process_index=process_index, process_count=2
        )
        share.set_state(state)
        shares.append(take(share, 3))
    for step in range(3):
        np.testing.assert_array_equal(
            expected[step]["image"], np.concatenate([shares[0][step]["image"], shares[1][step]["image"]])
        )


def test_state_from_another_pipeline_is_refused(tmp_path):
    write_indexed_npz(tmp_path / "d.npz", count=30)
    config = data_config(name="npz", path=str(tmp_path / "d.npz"), image_size=6, num_channels=3)
    state = pipeline.create_train_iterator(config, global_batch_size=8, seed=0).get_state()
    other = pipeline.create_train_iterator(config, global_batch_size=4, seed=0)
    with pytest.raises(ValueError, match="global_batch_size: saved 8, now 4"):
        other.set_state(state)


# ---------------------------------------------------------------- clear errors


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(pipeline.DataConfigError, match="cifar10.*lsun/cat.*digits.*npz.*folder"):
        pipeline.check_dataset(data_config(name="cifar100"))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(name="cifar10", image_size=32, num_channels=3, num_classes=100), "cifar10 has 10 classes"),
        (dict(name="lsun/cat", image_size=256, num_channels=3, num_classes=1), "lsun/cat has no labels"),
        (dict(name="npz"), "needs data.path"),
        (dict(name="npz", path="/nonexistent/data.npz"), "is not a file"),
        (dict(name="folder", path="/nonexistent/images"), "is not a directory"),
        (dict(on_bad_image="ignore"), "on_bad_image must be one of"),
        (dict(num_channels=2), "num_channels must be 1 or 3"),
    ],
)
def test_bad_data_config_fails_with_what_is_wrong(overrides, message):
    with pytest.raises(pipeline.DataConfigError, match=message):
        pipeline.check_dataset(data_config(**overrides))


def test_npz_without_images_array_names_what_it_needs(tmp_path):
    np.savez(tmp_path / "x.npz", pixels=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(pipeline.DataConfigError, match="has arrays \\['pixels'\\]; it needs uint8 'images'"):
        pipeline.check_dataset(data_config(name="npz", path=str(tmp_path / "x.npz"), image_size=4))


def test_npz_labels_required_for_class_conditional(tmp_path):
    write_indexed_npz(tmp_path / "d.npz", count=10, with_labels=False)
    config = data_config(
        name="npz", path=str(tmp_path / "d.npz"), image_size=6, num_channels=3, num_classes=5
    )
    with pytest.raises(pipeline.DataConfigError, match="no 'labels' array"):
        pipeline.check_dataset(config)


def test_global_batch_must_split_over_processes():
    with pytest.raises(
        ValueError,
        match="global batch size \\(10\\) must be a positive multiple of the number of processes \\(4\\)",
    ):
        pipeline.create_train_iterator(
            data_config(), global_batch_size=10, seed=0, process_index=0, process_count=4
        )


def test_global_batch_larger_than_dataset_is_refused(tmp_path):
    write_indexed_npz(tmp_path / "d.npz", count=10)
    config = data_config(name="npz", path=str(tmp_path / "d.npz"), image_size=6, num_channels=3)
    with pytest.raises(ValueError, match="10 training examples, fewer than one global batch"):
        pipeline.create_train_iterator(config, global_batch_size=16, seed=0)


# ---------------------------------------------------------------- global batch on the mesh


def test_to_global_batch_places_the_batch_on_the_data_axis():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    batch = {
        "image": np.arange(16 * 2 * 2 * 1, dtype=np.float32).reshape(16, 2, 2, 1),
        "label": np.arange(16, dtype=np.int32),
    }
    global_batch = pipeline.to_global_batch(batch, sharding)
    for key, value in batch.items():
        assert global_batch[key].sharding == sharding
        np.testing.assert_array_equal(np.asarray(global_batch[key]), value)
        assert global_batch[key].addressable_shards[0].data.shape[0] == 2


def test_to_global_batch_needs_a_multiple_of_the_devices():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = {"image": np.zeros((12, 2, 2, 1), np.float32)}
    with pytest.raises(
        ValueError,
        match="global batch size \\(12\\) must be divisible by the number of devices it is split over \\(8",
    ):
        pipeline.to_global_batch(batch, NamedSharding(mesh, PartitionSpec("data")))


# ---------------------------------------------------------------- two real processes

_WORKER = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec
    from configs import default
    from consistency_jax.data import pipeline

    port, process_id, npz_path, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=60)
    config = default.get_config().data
    config.unlock()
    config.update(dict(name="npz", path=npz_path, image_size=6, num_channels=3, num_classes=5))
    iterator = pipeline.create_train_iterator(config, global_batch_size=8, seed=0)  # jax's process index/count
    batches = [next(iterator) for _ in range(6)]  # 2 epochs of 26 // 8 = 3 batches
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    global_batch = pipeline.to_global_batch(batches[0], NamedSharding(mesh, PartitionSpec("data")))
    shards = sorted(global_batch["label"].addressable_shards, key=lambda s: s.index[0].start)
    np.savez(out_path,
             images=np.stack([b["image"] for b in batches]),
             labels=np.stack([b["label"] for b in batches]),
             shard_rows=np.array([[s.index[0].start, s.index[0].stop] for s in shards]),
             shard_labels=np.concatenate([np.asarray(s.data) for s in shards]),
             global_shape=np.array(global_batch["image"].shape))
    jax.distributed.shutdown()
    """)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_read_disjoint_shares_covering_each_epoch(tmp_path):
    arrays = write_indexed_npz(tmp_path / "d.npz", count=26)
    (tmp_path / "worker.py").write_text(_WORKER)
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=child_xla_flags(2),
        PYTHONPATH=REPO_ROOT,
    )
    port = free_port()
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                str(tmp_path / "worker.py"),
                str(port),
                str(pid),
                str(tmp_path / "d.npz"),
                str(tmp_path / f"out{pid}.npz"),
            ],
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for pid in range(2)
    ]
    try:
        logs = [w.communicate(timeout=120)[0].decode() for w in workers]
    finally:
        for w in workers:
            w.kill()
    for w, log in zip(workers, logs):
        assert w.returncode == 0, log[-3000:]
    outs = [np.load(tmp_path / f"out{pid}.npz") for pid in range(2)]
    single = pipeline.create_train_iterator(
        data_config(name="npz", path=str(tmp_path / "d.npz"), image_size=6, num_channels=3, num_classes=5),
        global_batch_size=8,
        seed=0,
        process_index=0,
        process_count=1,
    )
    for step in range(6):
        share0, share1 = ({"image": o["images"][step]} for o in outs)
        assert not set(indices_of(share0)) & set(indices_of(share1))  # disjoint
        # Together, in process order, they are the single-process global batch.
        expected = next(single)
        np.testing.assert_array_equal(np.concatenate([share0["image"], share1["image"]]), expected["image"])
        np.testing.assert_array_equal(np.concatenate([o["labels"][step] for o in outs]), expected["label"])
    for epoch in range(2):
        seen = np.concatenate(
            [indices_of({"image": o["images"][s]}) for o in outs for s in range(3 * epoch, 3 * epoch + 3)]
        )
        assert len(set(seen)) == 24  # the epoch, less the 26 % 8 dropped remainder
        np.testing.assert_array_equal(
            np.concatenate([o["labels"][s] for o in outs for s in range(3 * epoch, 3 * epoch + 3)]),
            arrays["labels"][seen],
        )
    # Each process's devices hold its own rows of the global batch.
    for pid, out in enumerate(outs):
        np.testing.assert_array_equal(out["global_shape"], [8, 6, 6, 3])
        np.testing.assert_array_equal(out["shard_rows"], [[4 * pid, 4 * pid + 2], [4 * pid + 2, 4 * pid + 4]])
        np.testing.assert_array_equal(out["shard_labels"], out["labels"][0])
