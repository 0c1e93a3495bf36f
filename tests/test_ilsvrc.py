"""ILSVRC preprocessing (data/ilsvrc.py) into array shards (data/array_shards.py), and ADM's centre crop.

The crop is checked against an independent numpy computation of what
ADM's `center_crop_arr` asks PIL for (openai/consistency_models,
cm/image_datasets.py): box halving while the short side is >= 2x the target,
bicubic (a = -0.5) to the target, centre crop. The numpy resampler follows
PIL's documented separable algorithm (filter support scaled by the reduction
factor, 22-bit fixed-point weights, horizontal pass rounded to uint8 first).
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from consistency_jax.data import array_shards, ilsvrc, pipeline, sources
from tests.helpers import tiny_config

_PRECISION_BITS = 22  # PIL: 32 - 8 - 2 for 8-bit images


def _box(x):
    return np.where((x > -0.5) & (x <= 0.5), 1.0, 0.0)


def _bicubic(x, a=-0.5):
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _weights(in_size, out_size, kernel, support):
    """[out, in] integer weights of one resampling pass (PIL's precompute_coeffs + 8-bit normalisation)."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = support * filter_scale
    weights = np.zeros((out_size, in_size), np.int64)
    for out in range(out_size):
        center = (out + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = kernel((np.arange(lo, hi) - center + 0.5) / filter_scale)
        taps = taps / taps.sum()
        fixed = np.where(taps < 0, -0.5, 0.5) + taps * (1 << _PRECISION_BITS)
        weights[out, lo:hi] = fixed.astype(np.int64)  # truncation toward zero, as C's (int) cast
    return weights


def _resample_axis(image, out_size, axis, kernel, support):
    weights = _weights(image.shape[axis], out_size, kernel, support)
    moved = np.moveaxis(image.astype(np.int64), axis, -1)
    summed = moved @ weights.T + (1 << (_PRECISION_BITS - 1))
    return np.moveaxis(np.clip(summed >> _PRECISION_BITS, 0, 255).astype(np.uint8), -1, axis)


def _resize(image, width, height, kernel, support):
    """PIL's Image.resize on an [H, W, C] uint8 array: horizontal pass first, then vertical."""
    if image.shape[1] != width:
        image = _resample_axis(image, width, 1, kernel, support)
    if image.shape[0] != height:
        image = _resample_axis(image, height, 0, kernel, support)
    return image


def numpy_center_crop(image, size, shift=0):
    """ADM's center_crop_arr, with numpy in place of PIL (`shift`: move the crop down-right, for the test)."""
    while min(image.shape[:2]) >= 2 * size:
        image = _resize(image, image.shape[1] // 2, image.shape[0] // 2, _box, 0.5)
    scale = size / min(image.shape[:2])
    image = _resize(image, round(image.shape[1] * scale), round(image.shape[0] * scale), _bicubic, 2.0)
    image = np.pad(image, ((0, shift), (0, shift), (0, 0)), mode="edge")
    top, left = (image.shape[0] - shift - size) // 2 + shift, (image.shape[1] - shift - size) // 2 + shift
    return image[top:top + size, left:left + size]


def smooth_random_image(rng, height, width, target=16):
    """Random pixels in blocks about one target pixel wide: a crop one pixel off changes them clearly."""
    block = max(1, min(height, width) // target)
    noise = rng.uniform(0, 255, (height // block + 2, width // block + 2, 3))
    upsampled = np.kron(noise, np.ones((block, block, 1)))[:height, :width]
    return np.clip(upsampled + rng.normal(0, 10, upsampled.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("width,height", [(300, 170), (129, 257), (80, 64), (50, 40), (64, 64), (517, 383)])
def test_adm_center_crop_matches_an_independent_numpy_resampler(width, height):
    image = smooth_random_image(np.random.default_rng(width * height), height, width)
    got = sources.adm_center_crop(Image.fromarray(image), 16, 3)
    expected = numpy_center_crop(image, 16)
    assert got.shape == expected.shape == (16, 16, 3)
    np.testing.assert_array_equal(got, expected)  # bit for bit (Pillow 13 here)
    # A crop one pixel off, or a plain squash to 16x16, is far from it.
    assert np.abs(numpy_center_crop(image, 16, shift=1).astype(int) - got.astype(int)).mean() > 3
    squashed = np.asarray(Image.fromarray(image).resize((16, 16), Image.BICUBIC))
    if width != height:
        assert np.abs(squashed.astype(int) - got.astype(int)).mean() > 3


def test_adm_center_crop_box_halves_while_twice_the_target():
    """300x170 -> 16: halvings 150x85, 75x42 (42 >= 32), 37x21 (21 < 32 stops), then bicubic to 28x16."""
    calls = []
    original = Image.Image.resize

    def recording(self, size, resample=None, *args, **kwargs):
        calls.append((self.size, tuple(size), resample))
        return original(self, size, resample, *args, **kwargs)

    try:
        Image.Image.resize = recording
        sources.adm_center_crop(Image.fromarray(np.zeros((170, 300, 3), np.uint8)), 16, 3)
    finally:
        Image.Image.resize = original
    assert calls == [((300, 170), (150, 85), Image.BOX), ((150, 85), (75, 42), Image.BOX),
                     ((75, 42), (37, 21), Image.BOX), ((37, 21), (28, 16), Image.BICUBIC)]


# ----------------------------------------------------------------------------- the preprocessing command


def make_train_dir(root, sizes=((40, 30), (25, 50), (33, 33))):
    """Three class folders (sorted names != creation order) of JPEG/PNG images, plus a non-image file."""
    rng = np.random.default_rng(0)
    originals = {}
    for class_name in ("n03", "n01", "n02"):
        folder = os.path.join(root, class_name)
        os.makedirs(os.path.join(folder, "sub"))
        for i, (w, h) in enumerate(sizes):
            name = os.path.join(folder, "sub" if i == 2 else "", f"{class_name}_{i}.{'png' if i else 'JPEG'}")
            image = smooth_random_image(rng, h, w)
            Image.fromarray(image).save(name)
            originals[os.path.relpath(name, root)] = name
        with open(os.path.join(folder, "notes.txt"), "w") as f:
            f.write("not an image")
    return originals


def expected_crops(root, listing, size):
    return np.stack([sources.adm_center_crop(Image.open(os.path.join(root, p)), size, 3) for p in listing.files])


def test_preprocess_writes_shards_with_sorted_class_labels_and_the_crop(tmp_path):
    root, out = str(tmp_path / "train"), str(tmp_path / "out")
    make_train_dir(root)
    manifest = ilsvrc.preprocess(root, out, 8, shard_size=4, workers=2)
    listing = ilsvrc.list_class_folders(root)
    assert listing.classes == ["n01", "n02", "n03"] and len(listing.files) == 9
    assert [os.path.basename(p) for p in listing.files[:3]] == ["n01_0.JPEG", "n01_1.png", "n01_2.png"]
    assert manifest["complete"] and manifest["num_examples"] == 9 and manifest["num_shards"] == 3
    source, _ = array_shards.open_shards(out)
    images = np.stack([source[i]["image"] for i in range(len(source))])
    np.testing.assert_array_equal(images, expected_crops(root, listing, 8))
    assert [source[i]["label"] for i in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert open(os.path.join(out, "files.txt")).read().split() == listing.files

    # The training pipeline reads it: shapes, classes and the training-set size.
    config = tiny_config()
    config.data.update(dict(name="array_shards", path=out, image_size=8, num_channels=3, num_classes=3))
    pipeline.check_dataset(config.data)
    assert pipeline.dataset_info(config.data).num_examples == 9
    batch = next(pipeline.create_train_iterator(config.data, global_batch_size=4, seed=0, process_index=0,
                                                process_count=1))
    assert batch["image"].shape == (4, 8, 8, 3) and set(batch["label"].tolist()) <= {0, 1, 2}
    config.data.num_classes = 5
    with pytest.raises(pipeline.DataConfigError, match="has 3 classes"):
        pipeline.check_dataset(config.data)


def test_preprocess_resumes_after_an_interruption(tmp_path):
    root, out = str(tmp_path / "train"), str(tmp_path / "out")
    make_train_dir(root)
    cropped = []

    def crop_then_fail(path, size):
        if len(cropped) == 6:  # during the second shard
            raise KeyboardInterrupt
        cropped.append(path)
        return ilsvrc.crop_file(path, size)

    with pytest.raises(KeyboardInterrupt):
        ilsvrc.preprocess(root, out, 8, shard_size=4, workers=1, crop=crop_then_fail)
    assert not array_shards.read_manifest(out)["complete"]
    config = tiny_config()
    config.data.update(dict(name="array_shards", path=out, image_size=8, num_channels=3, num_classes=3))
    with pytest.raises(pipeline.DataConfigError, match="unfinished"):
        pipeline.check_dataset(config.data)

    resumed = []
    ilsvrc.preprocess(root, out, 8, shard_size=4, workers=1,
                      crop=lambda path, size: resumed.append(path) or ilsvrc.crop_file(path, size))
    assert len(resumed) == 5  # shards 2 and 3 only; shard 1 was kept
    straight = str(tmp_path / "straight")
    ilsvrc.preprocess(root, straight, 8, shard_size=4, workers=1)
    for index in range(3):
        for kind in ("images", "labels"):
            np.testing.assert_array_equal(np.load(array_shards.shard_paths(out, index)[kind]),
                                          np.load(array_shards.shard_paths(straight, index)[kind]))
    # A changed input listing is not mixed with the shards of the old one.
    os.remove(os.path.join(root, "n01", "n01_1.png"))
    with open(os.path.join(out, array_shards.MANIFEST)) as f:
        manifest = json.load(f)
    manifest["complete"] = False
    array_shards.write_json_atomically(os.path.join(out, array_shards.MANIFEST), manifest)
    with pytest.raises(ilsvrc.PreprocessError, match="input files changed"):
        ilsvrc.preprocess(root, out, 8, shard_size=4)


def test_unreadable_images_stop_with_their_names_or_are_skipped(tmp_path):
    root = str(tmp_path / "train")
    make_train_dir(root)
    broken = os.path.join(root, "n02", "n02_0.JPEG")
    with open(broken, "wb") as f:
        f.write(b"\xff\xd8 truncated")
    with pytest.raises(ilsvrc.PreprocessError, match="n02_0.JPEG") as error:
        ilsvrc.preprocess(root, str(tmp_path / "a"), 8, shard_size=4)
    assert "--on_bad_image=skip" in str(error.value)
    manifest = ilsvrc.preprocess(root, str(tmp_path / "b"), 8, shard_size=4, on_bad_image="skip")
    assert manifest["num_examples"] == 8 and manifest["skipped"] == [os.path.join("n02", "n02_0.JPEG")]
    source, _ = array_shards.open_shards(str(tmp_path / "b"))
    assert [source[i]["label"] for i in range(8)] == [0, 0, 0, 1, 1, 2, 2, 2]


def test_a_missing_path_names_the_preprocessing_command():
    config = tiny_config()
    config.data.update(dict(name="array_shards", image_size=64, num_channels=3, num_classes=1000))
    with pytest.raises(pipeline.DataConfigError, match="consistency_jax.data.ilsvrc"):
        pipeline.check_dataset(config.data)
