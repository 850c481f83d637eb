"""Variable-size encoded images (JPEG folders, tfds ImageNet) → fixed-size uint8 views.

A *record* is ``(data, label, kind)``: ``data`` a file path (image folders) or the encoded bytes
(tfds, TFRecords); ``kind`` says which decoder reads it (``image_folder.TF_IMAGE | PIL_IMAGE``).
Raw records travel through the shuffle; decoding happens after it, in parallel:

* training: every image is decoded once and cropped twice — torchvision's RandomResizedCrop
  drawn on the *original* image (``crops.crop_windows``), resized to the view size (bilinear,
  ``resize_to``), flipped — giving two uint8 views. One full decode and two slices beat one
  ``decode_and_crop_jpeg`` per view by ~1.5x (two crops of 20–100% of the image cover more rows
  than one decode; docs/data.md).
* evaluation: the centre crop (``crops.centre_window``) resized: ImageNet's Resize + CenterCrop.

TensorFlow ops decode JPEG, PNG, GIF, BMP and WebP in the graph; PIL the rest (TIFF, 16-bit
PNG). An image that cannot be decoded is dropped and named, or stops the run (``Decoder``).
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from moco_tf.config import DataError
from moco_tf.data import augment, crops, image_folder

AUTOTUNE = tf.data.AUTOTUNE


def decode_tf(data, channels):
    """TF decode of an encoded image → uint8 [H, W, channels]."""
    def jpeg():
        return tf.io.decode_jpeg(data, channels=channels)  # also CMYK and gray → channels

    def other():  # PNG, GIF, BMP, WebP; channels fixed below (GIF has no gray mode)
        return convert_channels(tf.io.decode_image(data, channels=0, expand_animations=False),
                                channels)

    image = tf.cond(tf.io.is_jpeg(data), jpeg, other)
    return tf.ensure_shape(image, [None, None, channels])


def convert_channels(image, channels: int):
    """uint8 [H,W,c] with c in {1,2,3,4} (static or not) → [H,W,channels]: alpha dropped,
    gray ↔ RGB (ITU-R 601 luma, as PIL and libjpeg)."""
    c = image.shape[-1]
    if c is None:  # decode_image: the channel count is known only at run time
        has_color = tf.shape(image)[-1] >= 3
        if channels == 3:
            image = tf.cond(has_color, lambda: image[..., :3],
                            lambda: tf.tile(image[..., :1], [1, 1, 3]))
        else:
            image = tf.cond(has_color, lambda: tf.image.rgb_to_grayscale(image[..., :3]),
                            lambda: image[..., :1])
        return tf.ensure_shape(image, [None, None, channels])
    if c in (2, 4):
        image, c = image[..., : c - 1], c - 1
    if c == channels:
        return image
    if channels == 3:
        return tf.image.grayscale_to_rgb(image)
    return tf.image.rgb_to_grayscale(image)


def resize_to(image, size: int, antialias: bool = False):
    """uint8 [h, w, C] → uint8 [size, size, C], bilinear.

    ``antialias`` widens the filter when shrinking, as PIL (torchvision's RandomResizedCrop on
    PIL images) does. It is off by default, as in TensorFlow's and JAX's reference SSL pipelines
    (SimCLR, BYOL, big_vision): decoding and cropping ran ~2.8x slower with it (docs/data.md).
    """
    out = tf.image.resize(image, [size, size], method="bilinear", antialias=antialias)
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def _crop(image, window):
    top, left, height, width = tf.unstack(window)
    return image[top:top + height, left:left + width]


class Decoder:
    """Decodes records in a tf.data pipeline; drops, names and counts the ones it cannot.

    Records are decoded by a parallel ``map`` (TensorFlow ops, or PIL for ``PIL_IMAGE`` files)
    followed by ``ignore_errors``: one broken file must not end a long run, and an error inside
    tf.data can only be caught for the whole map. Every record carries its position in the
    stream, so a dropped one shows as a gap in the positions (found by a ``scan``, no Python per
    image); only then is it looked up again (``locate``) and handed to ``bad`` to be named and
    skipped, or to stop the run. A per-image try/except (each image its own small dataset in an
    ``interleave``) cost 25-30% of the decode rate here; this costs nothing while nothing breaks.

    Args:
      channels: 1 or 3, the output channels.
      bad: an ``image_folder.BadImages`` (its ``on_bad_image`` decides skip or stop), or None
        where no Python may run (tf.data service workers): PIL files are then refused and a bad
        image is dropped silently.
      reads_files: ``data`` is a file path to read (image folders), not the encoded bytes.
    """

    def __init__(self, channels, bad, reads_files):
        self.channels, self.bad, self.reads_files = int(channels), bad, reads_files

    def _image(self, data, kind):
        def by_tf():
            return decode_tf(tf.io.read_file(data) if self.reads_files else data, self.channels)

        if self.bad is None:
            return by_tf()

        def by_pil():
            image = tf.numpy_function(self._pil, [data], tf.uint8)
            return tf.ensure_shape(image, [None, None, self.channels])

        return tf.cond(tf.equal(kind, image_folder.PIL_IMAGE), by_pil, by_tf)

    def _pil(self, data):
        return image_folder.pil_decode(self._source(data), self.channels)

    def _source(self, data):
        """What PIL opens: the file name, or the encoded bytes."""
        return os.fsdecode(data) if self.reads_files else bytes(data)

    def map(self, records, fn, locate, first_position=0, give_up_after=1000):
        """``fn(image uint8 [H, W, C], position) → outputs`` over ``(data, label, kind)`` records.

        Args:
          locate: ``position → data`` of a record (to name one that was dropped).
          first_position: the position of the first record.
          give_up_after: this many failures in a row raise ``DataError`` whatever
            ``on_bad_image`` says: the data is unusable, and an endless stream of records that
            all fail would otherwise never yield a batch.
        Returns:
          a dataset of ``(outputs, label)``, in record order, without the images that failed.
        """
        positions = tf.data.Dataset.counter(first_position)

        def decode(record, position):
            data, label, kind = record
            return fn(self._image(data, kind), position), label, position

        ds = (tf.data.Dataset.zip((records, positions))
              .map(decode, num_parallel_calls=AUTOTUNE).ignore_errors())
        if self.bad is not None:
            def report(first, end):
                for position in range(int(first), int(end)):
                    data = locate(position)
                    name = os.fsdecode(data) if self.reads_files else f"record {position}"
                    self.bad.report(name, self._source(data))
                    if position - int(first) + 1 >= give_up_after:
                        raise DataError(
                            f"{give_up_after} images in a row could not be decoded (the last: "
                            f"{name}); the data is unusable as it is. Check the files, e.g. "
                            f"with PIL: python -c \"from PIL import Image; "
                            f"Image.open('{name}').load()\"")
                return np.int64(end)

            def find_gaps(expected, element):
                position = element[2]
                expected = tf.cond(
                    position > expected,
                    lambda: tf.numpy_function(report, [expected, position], tf.int64),
                    lambda: expected)
                return position + 1, element

            ds = ds.scan(tf.constant(first_position, tf.int64), find_gaps)
        return ds.map(lambda outputs, label, position: (outputs, label))


def locator(records, first_position=0):
    """``position → data`` of the stream ``records`` (numbered from ``first_position``): replays
    it — names only, nothing decoded — to name a record the decoder dropped. Rare, so slow is
    fine."""
    def locate(position):
        element = next(iter(records.skip(position - first_position).take(1)))
        return element[0].numpy()

    return locate


def train_views(decoder, records, locate, *, image_size, crop_scale, flip_p, seed, batch_size,
                first_position=0, antialias=False):
    """Two uint8 views [S, S, C] per record, with torchvision's crops of the original image.

    Record ``p`` (counting from ``first_position``) is image ``slot = p % batch_size`` of batch
    ``i = p // batch_size``; view ``v`` of it is cropped with the crop seed of
    ``augment.view_seeds`` (batch i, view v) folded with ``slot``, so a resumed pipeline crops
    exactly as the uninterrupted one.

    Args:
      records: ``(data, label, kind)`` in training order.
      locate: ``position → data`` of a record (see ``Decoder.map``).
      flip_p: (view 1, view 2) probabilities of a horizontal flip.
      seed: int64 [2].
      antialias: see ``resize_to``.
    Returns:
      a dataset of ``((view1, view2), label)``, uint8 views.
    """
    def views(image, position):
        i, slot = position // batch_size, position % batch_size
        shape = tf.shape(image)
        out = []
        for v in range(2):
            crop_seed = augment.view_seeds(augment.batch_seed(seed, i), v)[0]
            window_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(
                tf.random.experimental.stateless_fold_in(crop_seed, slot), 2))
            window = crops.crop_windows(window_seed, shape[0], shape[1], 1, crop_scale)[0]
            view = resize_to(_crop(image, window), image_size, antialias)
            flip = tf.random.stateless_uniform([], flip_seed) < flip_p[v]
            out.append(tf.cond(flip, lambda: tf.reverse(view, [1]), lambda: view))
        return tuple(out)

    return decoder.map(records, views, locate, first_position)


def eval_images(decoder, records, locate, *, image_size, antialias=True):
    """The evaluation view of each record: uint8 [S, S, C], the centre crop resized.

    Centre crop of 87.5% of the shorter side above 64 px (Resize(S/0.875) + CenterCrop(S), the
    ImageNet protocol); the whole centre square for small images, antialiased by default (as
    the evaluation transforms of the reference code: features are compared across runs, and
    evaluation decodes each image once). Yields ``(image, label)``.
    """
    fraction = 1.0 if image_size <= 64 else 0.875

    def centre(image, position):
        shape = tf.shape(image)
        return resize_to(_crop(image, crops.centre_window(shape[0], shape[1], fraction)),
                         image_size, antialias)

    return decoder.map(records, centre, locate)
