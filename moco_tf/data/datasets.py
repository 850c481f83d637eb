"""The data source of a config (``data.source``), in one of two shapes the pipelines read.

* **In memory, one image size** — ``fashion_mnist`` (IDX files), ``synthetic``, fixed-size
  ``tfds`` sets (CIFAR): ``images()`` gives decoded ``(uint8 [H, W, C], int32 label)``; training
  caches them and crops whole batches at once (``augment.crop_views``).
* **Records, any image size** — ``image_folder`` (``train/<class>/*.JPEG``) and variable-size
  ``tfds`` sets (ImageNet): ``records()`` gives encoded images and a decoder; each image is decoded
  and cropped on its own, from the whole original image (``records.py``). ``images()`` gives their
  evaluation view (centre crop at ``data.image_size``).

``check()`` runs before any model is built: paths, a tfds set prepared (or prepared now), labels
where evaluation needs them, the class count. Each problem is one ``DataError`` saying what to do.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import tensorflow as tf

from moco_tf.config import ConfigError, DataError, check_data_paths
from moco_tf.data import fashion_mnist, image_folder, records as records_lib, synthetic
from moco_tf.data import tfds_source
from moco_tf.data.records import convert_channels

SOURCES = ("fashion_mnist", "tfds", "image_folder", "synthetic")


def uses_records(data_cfg) -> bool:
    """True if the source's images are read one by one as records (variable image sizes)."""
    return data_cfg.source == "image_folder" or (
        data_cfg.source == "tfds" and tfds_source.is_variable_size(data_cfg))


@dataclasses.dataclass
class Records:
    """Encoded images of one split: what ``records.train_views`` / ``eval_images`` read.

    Attributes:
      ds: ``(data, label, kind)`` records, one pass, in file order (evaluation).
      decoder: the ``records.Decoder`` for them.
      epochs: ``(seed int64 [2], first_position) → dataset``: the endless training order, epoch
        e in an order drawn from (seed, e), started at record ``first_position`` without reading
        the epochs before it.
    """

    ds: tf.data.Dataset
    decoder: records_lib.Decoder
    epochs: Callable[[tf.Tensor, int], tf.data.Dataset]


def records(data_cfg, split: str, *, input_context=None, python=True) -> Records:
    """The records of ``split``; with ``input_context`` only this input pipeline's share of the
    files (``tf.distribute.InputContext``: every host reads its own files, none reads all).
    ``python=False``: a decoder without Python (tf.data service workers): files only PIL reads
    are left out, and broken images are replaced without a name."""
    channels = int(data_cfg.channels)
    on_bad = data_cfg.get("on_bad_image", "skip")
    if data_cfg.source == "image_folder":
        folder = _folder_for_split(data_cfg, split)
        listing = _listing(data_cfg, split)
        if input_context is not None:
            listing = listing.shard(input_context.input_pipeline_id,
                                    input_context.num_input_pipelines)
        if not listing.files:
            raise DataError(f"image folder {folder}: no files for input pipeline "
                            f"{input_context.input_pipeline_id} of "
                            f"{input_context.num_input_pipelines}")
        if not python:
            listing = listing.without_pil_files()
        table = (tf.constant(listing.files), tf.constant(listing.labels, tf.int32),
                 tf.constant(listing.kinds, tf.int32))
        bad = image_folder.BadImages(folder, channels, on_bad) if python else None
        decoder = records_lib.Decoder(channels, bad, reads_files=True)

        def epochs(seed, first_position):  # a new permutation of the files every epoch
            return epoch_orders(len(listing.files), seed, first_position).map(
                lambda i: tuple(tf.gather(column, i) for column in table))

        return Records(tf.data.Dataset.from_tensor_slices(table), decoder, epochs)
    if data_cfg.source == "tfds":
        bad = image_folder.BadImages(f"tfds:{data_cfg.name}", channels, on_bad) if python else None
        decoder = records_lib.Decoder(channels, bad, reads_files=False)

        def epochs(seed, first_position):
            return tfds_source.train_records(data_cfg, split, seed, first_position,
                                             input_context=input_context)

        return Records(tfds_source.records(data_cfg, split), decoder, epochs)
    raise ValueError(f"data.source {data_cfg.source!r} is read in memory, not as records")


def epoch_orders(n, seed, first_position=0):
    """Indices of an n-element source for an endless run: epoch e is the permutation drawn from
    (``seed``, e); starts at ``first_position`` without going through the epochs before it."""
    first_epoch, offset = divmod(int(first_position), n)

    def epoch(e):
        return tf.data.Dataset.from_tensor_slices(tf.random.experimental.stateless_shuffle(
            tf.range(n), tf.random.experimental.stateless_fold_in(seed, e)))

    return tf.data.Dataset.counter(first_epoch).flat_map(epoch).skip(offset)


def images(data_cfg, split: str, shuffle_seed=None) -> tf.data.Dataset:
    """``split`` as decoded ``(uint8 [H, W, data.channels], int32 label)`` pairs: the images of an
    in-memory source, the evaluation views (``data.image_size`` squares) of a records source.

    ``shuffle_seed`` (in-memory tfds only): read the files in a seeded order, reshuffled each
    epoch.
    """
    source = data_cfg.source
    channels = int(data_cfg.channels)
    if channels not in (1, 3):
        raise ValueError(f"data.channels must be 1 or 3, got {channels}")
    if source not in SOURCES:
        raise ValueError(f"data.source must be one of {', '.join(SOURCES)}; got {source!r}")
    if source == "synthetic":
        return synthetic.synthetic(
            _synthetic_count(data_cfg, split), data_cfg.image_size, channels,
            data_cfg.num_classes, seed=0 if split == data_cfg.train_split else 1)
    if uses_records(data_cfg):
        r = records(data_cfg, split)
        return records_lib.eval_images(r.decoder, r.ds, image_size=int(data_cfg.image_size))
    if source == "fashion_mnist":
        ds = fashion_mnist.fashion_mnist(data_cfg.data_dir, split)
    else:
        ds = tfds_source.images(data_cfg, split, shuffle_seed=shuffle_seed)
    return ds.map(lambda x, y: (convert_channels(x, channels), y))


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")


def class_names(data_cfg) -> list[str] | None:
    """The name of each label, where the source knows them (None for synthetic data)."""
    if data_cfg.source == "fashion_mnist":
        return list(FASHION_MNIST_CLASSES)
    if data_cfg.source == "image_folder":
        return image_folder.class_names(data_cfg.data_dir) or None
    if data_cfg.source == "tfds":
        return tfds_source.class_names(data_cfg)
    return None


def num_examples(data_cfg, split: str) -> int:
    """Number of examples in ``split`` (cheap: IDX headers, a folder listing, tfds' info): the
    trainer's steps per epoch. Image folders: the readable files (bad ones left out)."""
    source = data_cfg.source
    if source == "fashion_mnist":
        return fashion_mnist.num_examples(data_cfg.data_dir, split)
    if source == "synthetic":
        return _synthetic_count(data_cfg, split)
    if source == "image_folder":
        return len(_listing(data_cfg, split).files)
    if source == "tfds":
        return tfds_source.num_examples(data_cfg, split)
    raise ValueError(f"unknown data.source {source!r}")


def check(config) -> None:
    """Everything about the data that can be checked before a model is built.

    Paths exist (``config.check_data_paths``); a tfds set is prepared (downloading or preparing
    it now if the config allows); the training folder lists readable images; where the kNN
    monitor needs labels, both splits have them (class sub-folders) and ``data.num_classes``
    covers them. Raises ``ConfigError`` or ``DataError`` naming the value and the fix.
    """
    check_data_paths(config)
    d = config.data
    needs_labels = bool(config.eval.knn_every_epochs)
    splits = (d.train_split, d.eval_split) if (needs_labels or config.eval.export) else (
        d.train_split,)
    if d.source == "tfds":
        tfds_source.prepare(d, splits)
        classes = tfds_source.num_classes(d)
        if needs_labels and classes is None:
            raise DataError(f"tfds dataset '{d.name}' has no labels; the kNN monitor needs "
                            f"them: set eval.knn_every_epochs=0.")
        _check_class_count(d, classes, f"tfds dataset '{d.name}'")
    elif d.source == "image_folder":
        train = _listing(d, d.train_split)
        _check_decodable(train, d)
        if needs_labels:
            for split, key in ((d.train_split, "data.data_dir"), (d.eval_split, "data.eval_dir")):
                listing = _listing(d, split)
                if not listing.classes:
                    raise DataError(
                        f"{key} ({_folder_for_split(d, split)}) has no class sub-folders, but "
                        f"the kNN monitor needs labels. Sort the images into one folder per "
                        f"class (ILSVRC2012's flat validation folder: `python -m "
                        f"moco_tf.data.imagenet_val DIR`), or set eval.knn_every_epochs=0.")
            _check_class_count(d, len(train.classes), f"{d.data_dir}")


def _check_decodable(listing, data_cfg, sample=8):
    """DataError if none of the first `sample` images decodes: such a folder would give a
    training pipeline that drops every image and never yields a batch."""
    reasons = []
    for name, kind in list(zip(listing.files, listing.kinds))[:sample]:
        try:
            if kind == image_folder.PIL_IMAGE:
                image_folder.pil_decode(name, int(data_cfg.channels))
            else:
                records_lib.decode_tf(tf.io.read_file(name), int(data_cfg.channels))
            return
        except Exception as e:  # noqa: BLE001  TF and PIL raise many kinds for a broken file
            first = (str(e).strip().splitlines() or [""])[0][:120]
            reasons.append(f"{name} ({type(e).__name__}: {first})")
    raise DataError(f"None of the first {len(reasons)} images of {data_cfg.data_dir} can be "
                    f"decoded, e.g. {reasons[0]}; the folder is unusable as it is.")


def _check_class_count(d, classes, where):
    if classes is not None and classes > int(d.num_classes):
        raise ConfigError(f"'data.num_classes' ({d.num_classes}) is smaller than the {classes} "
                          f"classes of {where}; set data.num_classes={classes}.")


def data_error_in(message: str) -> str | None:
    """The message of a `DataError` raised inside a tf.data pipeline (TF wraps it in an
    InvalidArgumentError with a Python traceback), or None if there is none."""
    match = re.search(r"DataError: (.+)", message)
    return match.group(1).strip() if match else None


def _listing(data_cfg, split) -> image_folder.Listing:
    """The folder of ``split``, listed; the evaluation folder's labels follow the training
    folder's class names, so a class has one label in both."""
    on_bad = data_cfg.get("on_bad_image", "skip")
    if split == data_cfg.train_split:
        return image_folder.list_folder(data_cfg.data_dir, on_bad)
    train_classes = image_folder.class_names(data_cfg.data_dir) if data_cfg.data_dir else []
    return image_folder.list_folder(_folder_for_split(data_cfg, split), on_bad,
                                    classes=train_classes or None)


def _synthetic_count(data_cfg, split):
    n = int(data_cfg.synthetic_examples)
    return n if split == data_cfg.train_split else max(n // 4, int(data_cfg.num_classes))


def _folder_for_split(data_cfg, split):
    if split == data_cfg.train_split:
        return data_cfg.data_dir
    eval_dir = data_cfg.get("eval_dir", "")
    if not eval_dir:
        raise DataError(f"image_folder split {split!r}: set data.eval_dir to a labelled folder "
                        f"(class sub-folders) for evaluation; data.data_dir is the train folder")
    return eval_dir
