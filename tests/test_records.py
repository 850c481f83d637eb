"""Images of any size read one by one (image folders, tfds ImageNet): torchvision's crops of the
whole image, decoding of every format, resume, host vs device augmentation, per-host shards,
the tf.data service."""
import io
import math
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from moco_tf import data
from moco_tf.data import augment, crops, datasets, image_folder, pipeline


def folder_cfg(folder, **overrides):
    cfg = ml_collections.ConfigDict(dict(
        source="image_folder", name="", data_dir=str(folder), train_split="train",
        eval_split="test", eval_dir=str(folder), image_size=16, channels=3,
        augmentation="moco_v2", crop_scale=(0.2, 1.0), cache=False, shuffle_buffer=64,
        synthetic_examples=40, num_classes=4, augment_on="host", antialias=False,
        on_bad_image="skip", service_address=""))
    cfg.update(overrides)
    return cfg


def save(path, array, **kwargs):
    Image.fromarray(np.asarray(array, np.uint8)).save(path, **kwargs)


def gray_folder(root, n=12, size=(20, 30)):
    """n images, image k a constant gray level 10 + 20k: a crop tells which image it came from."""
    (root / "c").mkdir(parents=True)
    for k in range(n):
        save(root / "c" / f"{k:02d}.png", np.full((*size, 3), 10 + 20 * k))
    return root


def image_ids(views):
    """Which gray image each view of a batch shows (from its constant level)."""
    levels = np.asarray(views, np.float32).reshape(len(views), -1).mean(1)
    if levels.max() <= 1.0:
        levels = levels * 255
    return np.round((levels - 10) / 20).astype(int).tolist()


# ----------------------------------------------------------------------------- crop boxes


def torchvision_get_params(rng, height, width, scale, ratio=(3 / 4, 4 / 3)):
    """torchvision.transforms.RandomResizedCrop.get_params, transcribed (numpy RNG)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = rng.integers(0, height - h + 1)
            j = rng.integers(0, width - w + 1)
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov statistic max |F_a - F_b|."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return np.abs(fa - fb).max()


@pytest.mark.parametrize("height,width,scale", [
    (375, 500, (0.2, 1.0)),    # a 4:3 photo, MoCo's scale
    (224, 224, (0.08, 1.0)),   # MoCo v3's scale
    (40, 400, (0.5, 1.0)),     # 1:10 panorama: most tries fail, the centre fallback is common
])
def test_crop_windows_follow_torchvision_distribution(height, width, scale):
    n = 4000
    ours = crops.crop_windows(tf.constant([0, 7], tf.int64), height, width, n, scale).numpy()
    rng = np.random.default_rng(0)
    ref = np.array([torchvision_get_params(rng, height, width, scale) for _ in range(n)])
    top, left, h, w = ours.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all() and (h > 0).all()
    # Same distribution of area fraction, aspect ratio and corner (KS test, alpha ~ 0.001:
    # 1.95 * sqrt(2 / n) = 0.044).
    for name, f in [("area", lambda t: t[:, 2] * t[:, 3] / (height * width)),
                    ("log aspect", lambda t: np.log(t[:, 3] / t[:, 2])),
                    ("top", lambda t: t[:, 0]), ("left", lambda t: t[:, 1])]:
        d = ks_statistic(f(ours), f(ref))
        assert d < 1.95 * math.sqrt(2 / n), f"{name}: KS statistic {d:.3f}"
    # The centre fallback, exactly as torchvision computes it, as often.
    fallback = torchvision_get_params(np.random.default_rng(1), height, width, (2.0, 2.0))
    ours_fallback = (ours == np.array(fallback)).all(1).mean()
    ref_fallback = (ref == np.array(fallback)).all(1).mean()
    assert abs(ours_fallback - ref_fallback) < 0.03
    if width / height > 4 / 3 * 2:
        assert ref_fallback > 0.1  # the panorama case exercises it


def test_crops_reach_the_image_borders(tmp_path):
    # A 4:3 image with a red left margin and a blue right margin: a crop of the centre square
    # (the old decode) never sees either; torchvision's crops of the whole image do.
    (tmp_path / "c").mkdir()
    image = np.full((60, 80, 3), 128, np.uint8)
    image[:, :8] = (255, 0, 0)
    image[:, -8:] = (0, 0, 255)
    for k in range(4):
        save(tmp_path / "c" / f"{k}.png", image)
    cfg = folder_cfg(tmp_path, augmentation="crop", image_size=16)
    ds = data.train_dataset(cfg, batch_size=4, seed=0)
    views = np.concatenate([np.concatenate([b["view1"], b["view2"]])
                            for b in ds.take(25).as_numpy_iterator()])
    red = ((views[..., 0] > 0.9) & (views[..., 2] < 0.1)).any(axis=(1, 2))
    blue = ((views[..., 2] > 0.9) & (views[..., 0] < 0.1)).any(axis=(1, 2))
    assert 0.1 < red.mean() < 0.9 and 0.1 < blue.mean() < 0.9
    assert (red & blue).any()  # some crops span (nearly) the whole width


# ----------------------------------------------------------------------------- decoding


def encoded(array, fmt, mode=None, **kwargs):
    image = Image.fromarray(np.asarray(array))
    buffer = io.BytesIO()
    (image.convert(mode) if mode else image).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_with_a_broken_crc(array):
    """A PNG whose pixel chunk's checksum is wrong: TensorFlow (libpng) rejects it, PIL reads it."""
    content = bytearray(encoded(array, "PNG"))
    idat = content.index(b"IDAT")
    length = int.from_bytes(content[idat - 4:idat], "big")
    content[idat + 4 + length] ^= 0xFF
    return bytes(content)


def test_every_format_is_routed_and_decoded(tmp_path):
    colour, level = (200, 40, 10), 90
    rgb = np.full((20, 24, 3), colour, np.uint8)
    gray = np.full((20, 24), level, np.uint8)
    files = {  # name: (bytes, decoder, expected colour, tolerance)
        "jpeg.jpg": (encoded(rgb, "JPEG", quality=95), image_folder.TF_IMAGE, colour, 6),
        "progressive.jpg": (encoded(rgb, "JPEG", quality=95, progressive=True),
                            image_folder.TF_IMAGE, colour, 6),
        "cmyk.jpg": (encoded(rgb, "JPEG", mode="CMYK", quality=95), image_folder.TF_IMAGE,
                     colour, 6),
        "gray.jpg": (encoded(gray, "JPEG", quality=95), image_folder.TF_IMAGE, (level,) * 3, 2),
        "rgba.png": (encoded(np.dstack([rgb, np.zeros((20, 24), np.uint8)]), "PNG"),
                     image_folder.TF_IMAGE, colour, 0),
        "gray_alpha.png": (encoded(gray, "PNG", mode="LA"), image_folder.TF_IMAGE,
                           (level,) * 3, 0),
        "palette.gif": (encoded(rgb, "GIF"), image_folder.TF_IMAGE, colour, 0),
        "bmp24.bmp": (encoded(rgb, "BMP"), image_folder.TF_IMAGE, colour, 0),
        "lossless.webp": (encoded(rgb, "WEBP", lossless=True), image_folder.TF_IMAGE, colour, 0),
        # PIL only: no TensorFlow decoder, or TensorFlow would lose bits.
        "palette.bmp": (encoded(rgb, "BMP", mode="P"), image_folder.PIL_IMAGE, colour, 8),
        "bilevel.bmp": (encoded(np.full((20, 24), 255, np.uint8), "BMP", mode="1"),
                        image_folder.PIL_IMAGE, (255,) * 3, 0),
        "scan.tif": (encoded(rgb, "TIFF"), image_folder.PIL_IMAGE, colour, 0),
        "cmyk.tif": (encoded(rgb, "TIFF", mode="CMYK"), image_folder.PIL_IMAGE, colour, 0),
        "gray16.tif": (encoded(np.full((20, 24), 32768, np.uint16), "TIFF"),
                       image_folder.PIL_IMAGE, (128,) * 3, 0),  # 32768 * 255 / 65535
        "gray16.png": (encoded(np.full((20, 24), 32768, np.uint16), "PNG"),
                       image_folder.PIL_IMAGE, (128,) * 3, 0),
        # Routed to TensorFlow, which rejects it at decode time: PIL decodes it instead.
        "broken_crc.png": (png_with_a_broken_crc(rgb), image_folder.TF_IMAGE, colour, 0),
    }
    (tmp_path / "c").mkdir()
    for name, (content, _, _, _) in files.items():
        (tmp_path / "c" / name).write_bytes(content)
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.io.decode_image(files["broken_crc.png"][0])
    listing = image_folder.list_folder(str(tmp_path))
    kinds = {os.path.basename(f): k for f, k in zip(listing.files, listing.kinds)}
    assert kinds == {name: kind for name, (_, kind, _, _) in files.items()}
    for channels in (3, 1):
        cfg = folder_cfg(tmp_path, image_size=8, channels=channels)
        out = list(data.images(cfg, "train").as_numpy_iterator())
        assert len(out) == len(files)
        for (image, label), (name, (_, _, expected, atol)) in zip(out, sorted(files.items())):
            assert image.shape == (8, 8, channels) and label == 0, name
            if channels == 1:  # ITU-R 601 luma, as PIL and libjpeg
                expected = (np.dot(expected, (0.299, 0.587, 0.114)),)
                atol = atol + 1
            np.testing.assert_allclose(image.reshape(-1, channels).mean(0), expected,
                                       atol=atol, err_msg=name)
    # Training reads every one of them too (the crop-only recipe keeps the colours).
    cfg = folder_cfg(tmp_path, augmentation="crop")
    batch = next(iter(data.train_dataset(cfg, batch_size=len(files), seed=0)))
    assert image_folder.skipped_files(str(tmp_path)) == {}
    means = sorted(map(tuple, batch["view1"].numpy().reshape(len(files), -1, 3).mean(1) * 255))
    expected = sorted(tuple(map(float, e)) for _, _, e, _ in files.values())
    np.testing.assert_allclose(means, expected, atol=9)


def test_eval_view_is_the_centre_crop(tmp_path):
    # Resize(S / 0.875) + CenterCrop(S) for large images: a 100x200 image whose centre
    # 87.5% square is white and the rest black gives a white 72x72 view.
    (tmp_path / "c").mkdir()
    image = np.zeros((100, 200, 3), np.uint8)
    side = round(0.875 * 100)
    top, left = (100 - side) // 2, (200 - side) // 2
    image[top:top + side, left:left + side] = 255
    save(tmp_path / "c" / "x.png", image)
    ((view, _),) = list(data.images(folder_cfg(tmp_path, image_size=72), "train")
                        .as_numpy_iterator())
    assert view.shape == (72, 72, 3) and view.min() == 255


# ----------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("augment_on", ["host", "device"])
def test_resume_replays_the_same_crops_and_colours(tmp_path, augment_on):
    gray_folder(tmp_path)
    cfg = folder_cfg(tmp_path, augment_on=augment_on)
    full = list(data.train_dataset(cfg, batch_size=4, seed=3).take(6).as_numpy_iterator())
    resumed = list(data.train_dataset(cfg, batch_size=4, seed=3, start_batch=4)
                   .take(2).as_numpy_iterator())
    for a, b in zip(full[4:], resumed):
        np.testing.assert_array_equal(a["view1"], b["view1"])
        np.testing.assert_array_equal(a["view2"], b["view2"])
    assert full[0]["view1"].dtype == (np.float32 if augment_on == "host" else np.uint8)
    other = next(iter(data.train_dataset(cfg, batch_size=4, seed=4)))
    assert not np.array_equal(other["view1"], full[0]["view1"])


def test_every_image_once_per_epoch_in_a_new_order(tmp_path):
    gray_folder(tmp_path)  # 12 images = 3 batches of 4
    cfg = folder_cfg(tmp_path, augmentation="crop")  # no colour change: views keep their level
    ids = [image_ids(b["view1"])
           for b in data.train_dataset(cfg, batch_size=4, seed=3).take(6).as_numpy_iterator()]
    assert sorted(sum(ids[:3], [])) == list(range(12)) == sorted(sum(ids[3:], []))
    assert sum(ids[:3], []) != sum(ids[3:], [])


def corrupt_png(path):
    """A PNG whose header and end are intact but whose pixel data is destroyed: it passes the
    listing's checks and fails in every decoder."""
    content = bytearray(encoded(np.random.default_rng(0).integers(0, 256, (32, 32, 3),
                                                                  dtype=np.uint8), "PNG"))
    idat = content.index(b"IDAT") + 4
    content[idat:idat + 200] = b"\x00" * 200
    path.write_bytes(bytes(content))


def test_resume_replays_the_same_batches_with_a_broken_image(tmp_path):
    # 12 good images and one that fails to decode: batch i is always records [4i, 4i + 4), the
    # broken image's slot is filled with another image of its batch, so a run resumed at any
    # batch gives the batches the uninterrupted run gave.
    gray_folder(tmp_path)
    corrupt_png(tmp_path / "c" / "05_corrupt.png")
    cfg = folder_cfg(tmp_path, augmentation="crop")
    full = list(data.train_dataset(cfg, batch_size=4, seed=3).take(9).as_numpy_iterator())
    bad = str(tmp_path / "c" / "05_corrupt.png")
    assert list(image_folder.skipped_files(str(tmp_path))) == [bad]
    ids = [image_ids(b["view1"]) for b in full]
    # Every batch is full and shows good images only, one of them twice where the broken one was.
    assert all(len(i) == 4 and set(i) <= set(range(12)) for i in ids)
    assert sum(len(set(i)) == 3 for i in ids) >= 1
    for start in (2, 5):
        resumed = list(data.train_dataset(cfg, batch_size=4, seed=3, start_batch=start)
                       .take(9 - start).as_numpy_iterator())
        for a, b in zip(full[start:], resumed):
            np.testing.assert_array_equal(a["view1"], b["view1"])
            np.testing.assert_array_equal(a["view2"], b["view2"])
    cfg.on_bad_image = "error"
    with pytest.raises(tf.errors.InvalidArgumentError, match="05_corrupt.png: cannot decode"):
        list(data.train_dataset(cfg, batch_size=13, seed=3).take(1))


def test_a_batch_of_broken_images_stops_training_naming_them(tmp_path):
    (tmp_path / "c").mkdir()
    for k in range(3):
        corrupt_png(tmp_path / "c" / f"{k}.png")
    message = r"none of the 3 images of a training batch could be decoded \(.*0.png"
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        next(iter(data.train_dataset(folder_cfg(tmp_path), batch_size=3, seed=0)))


def test_a_broken_image_at_the_end_of_an_evaluation_folder_is_named(tmp_path):
    gray_folder(tmp_path, n=3)
    corrupt_png(tmp_path / "c" / "99_last.png")
    bad = str(tmp_path / "c" / "99_last.png")
    out = list(data.images(folder_cfg(tmp_path), "train").as_numpy_iterator())
    assert len(out) == 3
    assert image_ids([image for image, _ in out]) == [0, 1, 2]
    assert list(image_folder.skipped_files(str(tmp_path))) == [bad]
    with pytest.raises(tf.errors.InvalidArgumentError, match="99_last.png: cannot decode"):
        list(data.images(folder_cfg(tmp_path, on_bad_image="error"), "train"))


class TinyGrayPhotos(tfds.core.GeneratorBasedBuilder):
    """A variable-size tfds set made here: image k a constant gray level 10 + 20k (as
    ``gray_folder``), label k % 3."""

    VERSION = tfds.core.Version("1.0.0")
    COUNT = 12

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for k in range(self.COUNT):
            yield k, {"image": np.full((20 + k, 30, 3), 10 + 20 * k, np.uint8), "label": k % 3}


def test_tfds_resume_in_a_later_epoch_replays_the_same_batches(tmp_path):
    # Three files, each epoch read in its own seeded order: a resume in epoch 2 skips only
    # inside epoch 2 (and one in epoch 10^6 starts at once), and gives the same batches.
    builder = tfds.builder("tiny_gray_photos", data_dir=str(tmp_path))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=3))
    assert len(builder.info.splits["train"].file_instructions) == 3
    cfg = folder_cfg(tmp_path, source="tfds", name="tiny_gray_photos", data_dir=str(tmp_path),
                     augmentation="crop", shuffle_buffer=4)
    assert datasets.uses_records(cfg)
    full = list(data.train_dataset(cfg, batch_size=4, seed=3).take(9).as_numpy_iterator())
    ids = [image_ids(b["view1"]) for b in full]
    epochs = [sum(ids[3 * e:3 * e + 3], []) for e in range(3)]  # 12 images = 3 batches
    assert all(sorted(epoch) == list(range(12)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    resumed = list(data.train_dataset(cfg, batch_size=4, seed=3, start_batch=4)
                   .take(5).as_numpy_iterator())
    for a, b in zip(full[4:], resumed):
        np.testing.assert_array_equal(a["view1"], b["view1"])
        np.testing.assert_array_equal(a["view2"], b["view2"])
    far = next(iter(data.train_dataset(cfg, batch_size=4, seed=3, start_batch=3 * 10**6 + 1)))
    assert set(image_ids(far["view1"])) <= set(range(12))
    # The tfds training pipeline is graph ops only: tf.data service workers can run it
    # (config.py admits image_folder only so far).
    service = tf.data.experimental.service
    dispatcher = service.DispatchServer()
    worker = service.WorkerServer(service.WorkerConfig(  # noqa: F841  serves until deleted
        dispatcher_address=dispatcher.target.split("://")[1]))
    cfg.service_address = dispatcher.target
    served = list(data.train_dataset(cfg, batch_size=4, seed=3).take(3).as_numpy_iterator())
    assert sorted(sum((image_ids(b["view1"]) for b in served), [])) == list(range(12))


@pytest.mark.parametrize("source", ["records", "in_memory"])
def test_device_augmentation_equals_host_augmentation(tmp_path, source):
    if source == "records":
        (tmp_path / "c").mkdir()
        rng = np.random.default_rng(0)
        for k in range(8):
            save(tmp_path / "c" / f"{k}.jpg", rng.integers(0, 256, (30 + k, 40, 3)), quality=90)
        cfg = folder_cfg(tmp_path, image_size=24)
    else:
        cfg = folder_cfg(tmp_path, source="synthetic", cache=True, image_size=24)
    host = list(data.train_dataset(cfg, batch_size=8, seed=5).take(3))
    cfg.augment_on = "device"
    crops_only = list(data.train_dataset(cfg, batch_size=8, seed=5).take(3))
    augmenter = augment.PhotometricAugmenter("moco_v2", seed=5)
    for step, (h, c) in enumerate(zip(host, crops_only)):
        d1, d2 = augmenter((c["view1"], c["view2"]), tf.constant(step, tf.int64))
        # The same ops and seeds, to float rounding: the host's records path fuses its colour
        # ops (XLA), and tf.data's graph optimiser may fuse others.
        atol = 1e-5 if source == "records" else 1e-6
        np.testing.assert_allclose(d1, h["view1"], atol=atol)
        np.testing.assert_allclose(d2, h["view2"], atol=atol)
        assert not np.allclose(d1, tf.cast(c["view1"], tf.float32) / (255.0 if source ==
                                                                      "records" else 1.0))


def test_replica_rows_take_their_share_of_the_global_draws():
    views = tuple(tf.random.stateless_uniform([8, 12, 12, 3], [k, 1]) for k in range(2))
    whole = augment.photometric(views, "moco_v2", [3, 4])
    for offset in (0, 4):
        part = augment.photometric(tuple(v[offset:offset + 4] for v in views), "moco_v2",
                                   [3, 4], rows=(offset, 8))
        np.testing.assert_allclose(part[0], whole[0][offset:offset + 4], atol=1e-6)


def test_per_host_shards_are_disjoint_and_cover(tmp_path):
    gray_folder(tmp_path)
    listing = image_folder.list_folder(str(tmp_path))
    shards = [listing.shard(k, 3).files for k in range(3)]
    assert sorted(sum(shards, [])) == sorted(listing.files)
    assert all(not set(a) & set(b) for i, a in enumerate(shards) for b in shards[i + 1:])
    # Two input pipelines (hosts), per-replica batches of 3: each reads its own 6 images.
    cfg = folder_cfg(tmp_path, augmentation="crop")
    seen = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2,
                                             input_pipeline_id=pipeline_id,
                                             num_replicas_in_sync=2)
        ds = data.train_dataset(cfg, batch_size=6, seed=0, input_context=context)
        batches = list(ds.take(2).as_numpy_iterator())
        assert batches[0]["view1"].shape[0] == 3
        seen.append(sorted(sum((image_ids(b["view1"]) for b in batches), [])))
    assert seen[0] == [0, 2, 4, 6, 8, 10] and seen[1] == [1, 3, 5, 7, 9, 11]


def test_evaluation_folder_labels_follow_the_training_folder_classes(tmp_path):
    for split, classes in (("train", ["cat", "dog", "emu"]), ("val", ["dog", "emu"])):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            save(tmp_path / split / name / "x.png", np.zeros((8, 8, 3)))
    cfg = folder_cfg(tmp_path / "train", eval_dir=str(tmp_path / "val"))
    labels = [int(y) for _, y in data.images(cfg, "test").as_numpy_iterator()]
    assert labels == [1, 2]  # dog and emu keep the training folder's labels
    (tmp_path / "val" / "yak").mkdir()
    save(tmp_path / "val" / "yak" / "x.png", np.zeros((8, 8, 3)))
    with pytest.raises(datasets.DataError, match="class folders yak are not classes of the "
                                                 "training folder"):
        data.images(cfg, "test")


def test_training_through_the_tf_data_service_with_two_workers(tmp_path):
    # A dispatcher and two workers in-process on localhost; train_and_evaluate reads its
    # batches through them (data.service_address), and both workers run the pipeline.
    from configs import synthetic
    from moco_tf import train_lib

    gray_folder(tmp_path / "images", n=16)
    service = tf.data.experimental.service
    dispatcher = service.DispatchServer()
    address = dispatcher.target.split("://")[1]
    workers = [service.WorkerServer(service.WorkerConfig(dispatcher_address=address))
               for _ in range(2)]
    assert dispatcher._num_workers() == 2  # noqa: SLF001  the servers' own counters
    config = synthetic.get_config()
    config.data.update(dict(source="image_folder", data_dir=str(tmp_path / "images"),
                            eval_dir=str(tmp_path / "images"), channels=3,
                            mean=(0.5,) * 3, std=(0.25,) * 3, cache=False,
                            service_address=dispatcher.target))
    config.train.update(dict(batch_size=4, epochs=1, steps_per_epoch=3, verbose=0))
    config.moco.queue_size = 8
    config.eval.update(dict(knn_every_epochs=0, export=False))
    _, results = train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    assert results["steps"] == 3 and np.isfinite(results["final_loss"])
    assert all(w._num_tasks() >= 1 for w in workers)  # noqa: SLF001
    batch = next(iter(pipeline.train_dataset(config.data, batch_size=4, seed=0)))
    assert batch["view1"].shape == (4, 16, 16, 3) and np.isfinite(batch["view1"]).all()
    del workers, dispatcher
