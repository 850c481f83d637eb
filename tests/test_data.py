"""Data sources, per-image two-view augmentation and the tf.data pipelines."""
import gzip
import os
import struct

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from moco_tf import data
from moco_tf.config import DataError
from moco_tf.data import augment, crops, fashion_mnist, synthetic, tfds_source

FMNIST_DIR = fashion_mnist.DEFAULT_FASHION_MNIST_DIR


def data_cfg(**overrides):
    cfg = ml_collections.ConfigDict(dict(
        source="synthetic", name="", data_dir="", train_split="train", eval_split="test",
        eval_dir="", image_size=16, channels=1, augmentation="moco_v2", crop_scale=(0.2, 1.0),
        cache=True, shuffle_buffer=64, synthetic_examples=40, num_classes=4))
    cfg.update(overrides)
    return cfg


def write_idx(path, array, magic=None):
    array = np.asarray(array, np.uint8)
    magic = magic if magic is not None else 0x800 + array.ndim
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def write_tiny_fashion_mnist(folder, n_train=12, n_test=5):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, prefix, n in [("train", "train", n_train), ("test", "t10k", n_test)]:
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), images)
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), labels)
        arrays[split] = (images, labels)
    return arrays


def ramp_images(batch, size, channels=1):
    """Images whose every pixel differs, so different crops give different outputs."""
    ramp = np.arange(size * size, dtype=np.float32).reshape(size, size) / (size * size - 1)
    image = np.repeat((ramp * 255).round().astype(np.uint8)[..., None], channels, -1)
    return tf.constant(np.stack([image] * batch))


# ----------------------------------------------------------------------------- Fashion-MNIST


def test_idx_parsing_of_written_files(tmp_path):
    arrays = write_tiny_fashion_mnist(str(tmp_path))
    for split in ("train", "test"):
        images, labels = fashion_mnist.read_fashion_mnist(str(tmp_path), split)
        np.testing.assert_array_equal(images, arrays[split][0])
        np.testing.assert_array_equal(labels, arrays[split][1])
        assert labels.dtype == np.int32
    cfg = data_cfg(source="fashion_mnist", data_dir=str(tmp_path))
    assert data.num_examples(cfg, "train") == 12 and data.num_examples(cfg, "test") == 5
    pairs = list(data.images(cfg, "test").as_numpy_iterator())
    assert len(pairs) == 5 and pairs[0][0].shape == (28, 28, 1) and pairs[0][0].dtype == np.uint8
    np.testing.assert_array_equal(pairs[3][0][..., 0], arrays["test"][0][3])
    assert [int(y) for _, y in pairs] == [0, 1, 2, 3, 4]
    rgb = next(iter(data.images(data_cfg(source="fashion_mnist", data_dir=str(tmp_path),
                                       channels=3), "test")))[0].numpy()
    assert rgb.shape == (28, 28, 3) and (rgb[..., 0] == rgb[..., 2]).all()


def test_idx_errors_name_the_file(tmp_path):
    write_tiny_fashion_mnist(str(tmp_path))
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    write_idx(str(bad), np.zeros(5), magic=2051)  # an images magic in a labels file
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz.*magic.*apt-get install "
                                         "dataset-fashion-mnist"):
        fashion_mnist.read_fashion_mnist(str(tmp_path), "test")
    images = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(images, "rb") as f:
        content = f.read()
    with gzip.open(images, "wb") as f:
        f.write(content[:-100])  # truncated
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*truncated"):
        fashion_mnist.read_fashion_mnist(str(tmp_path), "train")
    os.remove(images)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz.*apt-get install"):
        fashion_mnist.read_fashion_mnist(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="no_such_dir.*apt-get install"):
        fashion_mnist.fashion_mnist(str(tmp_path / "no_such_dir"), "train")
    with pytest.raises(ValueError, match="'val'"):
        fashion_mnist.fashion_mnist(str(tmp_path), "val")


@pytest.mark.skipif(not os.path.isdir(FMNIST_DIR), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist():
    cfg = data_cfg(source="fashion_mnist")
    assert data.num_examples(cfg, "train") == 60000
    assert data.num_examples(cfg, "test") == 10000
    images, labels = fashion_mnist.read_fashion_mnist("", "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.min() == 0 and labels.max() == 9 and np.bincount(labels).tolist() == [1000] * 10
    assert 50 < images.mean() < 100  # real clothing images, not zeros/noise


def test_load_rejects_bad_config():
    with pytest.raises(ValueError, match="data.source"):
        data.images(data_cfg(source="imagenet"), "train")
    with pytest.raises(ValueError, match="data.channels"):
        data.images(data_cfg(channels=2), "train")


def test_tfds_unknown_name_is_a_clear_error():
    with pytest.raises(DataError, match="no_such_dataset_xyz.*not a tfds dataset"):
        tfds_source.builder(data_cfg(source="tfds", name="no_such_dataset_xyz"))
    with pytest.raises(DataError, match="data.name"):
        tfds_source.builder(data_cfg(source="tfds", name=""))


def test_synthetic_is_deterministic_and_learnable():
    x1, y1 = synthetic.make_synthetic(200, 16, 3, 5, seed=0)
    x2, _ = synthetic.make_synthetic(200, 16, 3, 5, seed=0)
    np.testing.assert_array_equal(x1, x2)
    assert x1.shape == (200, 16, 16, 3) and x1.dtype == np.uint8 and set(y1) == set(range(5))
    xt, yt = synthetic.make_synthetic(100, 16, 3, 5, seed=1)
    flat = lambda x: x.reshape(len(x), -1).astype(np.float32)  # noqa: E731
    centroids = np.stack([flat(x1)[y1 == k].mean(0) for k in range(5)])
    pred = np.argmin(((flat(xt)[:, None] - centroids[None]) ** 2).sum(-1), 1)
    assert (pred == yt).mean() > 0.8


# ----------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("kind", ["moco_v1", "moco_v2", "moco_v3"])
@pytest.mark.parametrize("channels", [1, 3])
def test_views_in_range_finite_and_shaped(kind, channels):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 20, 20, channels)).astype(np.uint8)
    images[0] = 0  # black and white images: hue/saturation maths must not produce NaN
    images[1] = 255
    for batch in (tf.constant(images), tf.constant(images, tf.float32) / 255.0):
        v1, v2 = data.two_view_augment(batch, kind=kind, image_size=12, seed=[3, 4])
        for v in (v1, v2):
            v = v.numpy()
            assert v.shape == (6, 12, 12, channels) and v.dtype == np.float32
            assert np.isfinite(v).all() and v.min() >= 0.0 and v.max() <= 1.0
        assert not np.allclose(v1.numpy(), v2.numpy())


def test_every_image_gets_its_own_crop():
    # Identical images: keras.layers.RandomCrop (one window per batch) would give identical
    # outputs across the batch; per-image crops must not.
    images = ramp_images(8, 16)
    v1, v2 = data.two_view_augment(images, kind="crop", image_size=8, crop_scale=(0.2, 0.6),
                                   seed=[0, 1])
    v1, v2 = v1.numpy(), v2.numpy()
    for i in range(8):
        assert not np.allclose(v1[i], v2[i]), "view1/view2 of one image share a crop"
        for j in range(i):
            assert not np.allclose(v1[i], v1[j]), f"images {i} and {j} share a crop"


def test_colour_randomness_is_per_image_and_per_view():
    images = tf.fill([8, 12, 12, 3], tf.constant(128, tf.uint8))  # crop-invariant
    recipe = augment.ViewRecipe(flip_p=0.0, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=1.0)
    v1, v2 = data.two_view_augment(images, kind=(recipe, recipe), image_size=12, seed=[5, 6])
    means1 = v1.numpy().mean(axis=(1, 2, 3))
    assert len(np.unique(means1.round(5))) == 8  # brightness drawn per image
    assert not np.allclose(means1, v2.numpy().mean(axis=(1, 2, 3)))  # and per view


def test_same_seed_same_views_other_seed_other_views():
    images = ramp_images(4, 16, channels=3)
    a = data.two_view_augment(images, kind="moco_v2", image_size=12, seed=[7, 8])
    b = data.two_view_augment(images, kind="moco_v2", image_size=12, seed=[7, 8])
    c = data.two_view_augment(images, kind="moco_v2", image_size=12, seed=[7, 9])
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[0], c[0])


def test_full_scale_crop_without_flip_is_the_resized_image():
    images = ramp_images(3, 16, channels=3)
    no_flip = augment.RECIPES["crop"]
    v1, v2 = data.two_view_augment(images, kind=no_flip, image_size=16, crop_scale=(1.0, 1.0),
                                   seed=[1, 1])
    expected = images.numpy() / 255.0
    np.testing.assert_allclose(v1, expected, atol=1e-6)
    np.testing.assert_allclose(v2, expected, atol=1e-6)
    np.testing.assert_allclose(data.eval_transform(images, 16), expected, atol=1e-6)
    # Downscaled: the box maths sample pixel centres exactly like tf.image.resize (bilinear).
    small, _ = data.two_view_augment(images, kind=no_flip, image_size=8, crop_scale=(1.0, 1.0),
                                     seed=[2, 2])
    np.testing.assert_allclose(small, tf.image.resize(images, [8, 8]) / 255.0, atol=1e-5)
    always_flip = augment.ViewRecipe(flip_p=1.0)
    flipped, _ = data.two_view_augment(images, kind=(always_flip, always_flip), image_size=16,
                                       crop_scale=(1.0, 1.0), seed=[1, 1])
    np.testing.assert_allclose(flipped, expected[:, :, ::-1], atol=1e-6)


def test_crop_boxes_respect_scale_ratio_and_bounds():
    h, w, s, n = 30, 40, 10, 500
    scale, ratio = (0.3, 0.5), (3 / 4, 4 / 3)
    boxes = crops.sample_crop_boxes(tf.constant([1, 2]), n, h, w, s, scale, ratio).numpy()
    y1, x1, y2, x2 = (boxes[:, i] for i in range(4))
    # Invert the half-pixel placement: extent = (x2 - x1)·(W-1) / (1 - 1/S).
    ch, cw = (y2 - y1) * (h - 1) / (1 - 1 / s), (x2 - x1) * (w - 1) / (1 - 1 / s)
    top = y1 * (h - 1) - 0.5 * ch / s + 0.5
    left = x1 * (w - 1) - 0.5 * cw / s + 0.5
    area = ch * cw / (h * w)
    assert area.min() >= scale[0] - 1e-4 and area.max() <= scale[1] + 1e-4
    assert (cw / ch).min() >= ratio[0] - 1e-4 and (cw / ch).max() <= ratio[1] + 1e-4
    assert top.min() >= -1e-3 and (top + ch).max() <= h + 1e-3
    assert left.min() >= -1e-3 and (left + cw).max() <= w + 1e-3
    assert area.std() > 0.03 and left.std() > 1  # actually random


def test_grayscale_and_one_channel_jitter():
    images = tf.constant(np.random.default_rng(1).integers(0, 256, (4, 10, 10, 3)), tf.uint8)
    gray = augment.ViewRecipe(flip_p=0.0, gray_p=1.0)
    v, _ = data.two_view_augment(images, kind=(gray, gray), image_size=10, crop_scale=(1, 1),
                                 seed=[0, 0])
    v = v.numpy()
    np.testing.assert_allclose(v[..., 0], v[..., 1], atol=1e-6)
    np.testing.assert_allclose(v[..., 0], v[..., 2], atol=1e-6)
    one = images[..., :1]
    jitter = augment.ViewRecipe(flip_p=0.0, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=1.0,
                                gray_p=1.0)
    v, _ = data.two_view_augment(one, kind=(jitter, jitter), image_size=10, crop_scale=(1, 1),
                                 seed=[0, 0])
    assert v.shape == (4, 10, 10, 1) and not np.allclose(v, one.numpy() / 255.0)


def test_gaussian_blur():
    impulse = np.zeros((3, 21, 21, 1), np.float32)
    impulse[:, 10, 10] = 1.0
    out = augment.gaussian_blur(tf.constant(impulse), tf.constant([0.5, 1.0, 1.0]),
                                tf.constant([True, True, False])).numpy()
    np.testing.assert_allclose(out.sum(axis=(1, 2, 3)), 1.0, atol=1e-5)
    np.testing.assert_array_equal(out[2], impulse[2])  # not applied → exact identity
    assert out[0, 10, 10, 0] > out[1, 10, 10, 0]  # larger sigma spreads more
    np.testing.assert_allclose(out[1, :, :, 0], out[1, :, :, 0].T, atol=1e-6)  # isotropic
    assert (out[1] > 0).sum() == 9  # 21 px → 3-tap kernel (~10% of the side, odd)


def test_eval_transform_centre_crops_large_images():
    images = tf.constant(np.random.default_rng(2).integers(0, 256, (2, 82, 82, 3)), tf.uint8)
    out = data.eval_transform(images, 72).numpy()  # Resize(72 / 0.875 = 82) + CenterCrop(72)
    np.testing.assert_allclose(out, images.numpy()[:, 5:77, 5:77] / 255.0, atol=1e-5)
    up = data.eval_transform(images[:, :10, :20], 16).numpy()
    assert up.shape == (2, 16, 16, 3) and 0 <= up.min() and up.max() <= 1


# ----------------------------------------------------------------------------- pipelines


def test_train_dataset_shapes_infinite_and_reproducible():
    cfg = data_cfg(channels=3)
    ds = data.train_dataset(cfg, batch_size=16, seed=1)
    assert ds.element_spec["view1"].shape == (16, 16, 16, 3)
    batches = list(ds.take(6).as_numpy_iterator())  # 96 views > 40 examples: repeats
    for b in batches:
        assert set(b) == {"view1", "view2"}
        for v in b.values():
            assert v.dtype == np.float32 and np.isfinite(v).all() and 0 <= v.min() <= v.max() <= 1
    again = list(data.train_dataset(cfg, batch_size=16, seed=1).take(6).as_numpy_iterator())
    for b, c in zip(batches, again):
        np.testing.assert_array_equal(b["view1"], c["view1"])
        np.testing.assert_array_equal(b["view2"], c["view2"])
    resumed = next(iter(data.train_dataset(cfg, batch_size=16, seed=1, start_batch=4)))
    np.testing.assert_array_equal(resumed["view1"], batches[4]["view1"])
    other = next(iter(data.train_dataset(cfg, batch_size=16, seed=2)))
    assert not np.allclose(other["view1"], batches[0]["view1"])


def test_two_view_dataset_seeds_by_batch_index():
    images = tf.data.Dataset.from_tensors(ramp_images(1, 12)[0]).repeat(8)  # all identical
    ds = data.two_view_dataset(images, batch_size=4, kind="moco_v2", image_size=12, seed=3)
    b0, b1 = list(ds.as_numpy_iterator())
    assert not np.allclose(b0["view1"], b1["view1"])  # same pixels, other batch index
    b0_again = next(iter(data.two_view_dataset(images, batch_size=4, kind="moco_v2",
                                               image_size=12, seed=3)))
    np.testing.assert_array_equal(b0["view1"], b0_again["view1"])
    # {"image", "label"} elements (tfds style) work too.
    dicts = images.map(lambda x: {"image": x, "label": tf.constant(7)})
    b = next(iter(data.two_view_dataset(dicts, batch_size=4, image_size=12, seed=3)))
    np.testing.assert_array_equal(b["view1"], b0["view1"])
    assert set(b) == {"view1", "view2"}


def test_train_and_eval_from_idx_files(tmp_path):
    write_tiny_fashion_mnist(str(tmp_path), n_train=20, n_test=7)
    cfg = data_cfg(source="fashion_mnist", data_dir=str(tmp_path), image_size=28)
    b = next(iter(data.train_dataset(cfg, batch_size=8, seed=0)))
    assert b["view1"].shape == (8, 28, 28, 1)
    ev = list(data.eval_dataset(cfg, "test", batch_size=4).as_numpy_iterator())
    assert [x.shape[0] for x, _ in ev] == [4, 3]
    np.testing.assert_array_equal(np.concatenate([y for _, y in ev]), np.arange(7))


def test_eval_dataset_deterministic_finite_and_complete():
    cfg = data_cfg(channels=3, image_size=12)
    n = data.num_examples(cfg, "test")
    ds = data.eval_dataset(cfg, "test", batch_size=4)
    first = list(ds.as_numpy_iterator())
    second = list(ds.as_numpy_iterator())
    assert sum(len(y) for _, y in first) == n
    for (x1, y1), (x2, y2) in zip(first, second):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
        assert x1.dtype == np.float32 and y1.dtype == np.int32
        assert x1.shape[1:] == (12, 12, 3) and np.isfinite(x1).all()
        assert 0 <= x1.min() <= x1.max() <= 1
