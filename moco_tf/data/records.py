"""Variable-size encoded images (JPEG folders, tfds ImageNet) → fixed-size uint8 views.

A *record* is ``(data, label, kind)``: ``data`` a file path (image folders) or the encoded bytes
(tfds, TFRecords); ``kind`` says which decoder reads it (``image_folder.TF_IMAGE | PIL_IMAGE``).
Raw records travel through the shuffle; decoding happens after it, in parallel:

* training: two windows per image, torchvision's RandomResizedCrop drawn on the *original*
  image (``crops.crop_windows``); a JPEG is decoded once, only inside the box that holds both
  windows (``tf.io.extract_jpeg_shape``, then one ``tf.io.decode_and_crop_jpeg``), and the two
  views are sliced from it, resized to the view size (bilinear, ``resize_to``) and flipped.
* evaluation: the centre crop (``crops.centre_window``) resized: ImageNet's Resize + CenterCrop.

Batches are fixed by position: batch ``i`` holds records ``[i B, (i + 1) B)`` whatever fails to
decode, so a resumed run (which starts at record ``start_batch · B``) sees the batches the
uninterrupted run saw. TensorFlow ops decode JPEG, PNG, GIF, BMP and WebP in the graph; PIL
(through ``tf.numpy_function``, on that path only) decodes TIFF, 16-bit PNG, palette BMP and any
file TensorFlow rejects. An image neither can decode is named and its slot in the batch filled
with another image of the same batch, or it stops the run (``Decoder``).
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from moco_tf.config import DataError
from moco_tf.data import augment, crops, image_folder

AUTOTUNE = tf.data.AUTOTUNE
EVAL_CHUNK = 64  # evaluation records decoded together: a failed one is found within its chunk


def decode_tf(data, channels):
    """TF decode of an encoded image → uint8 [H, W, channels]."""
    def jpeg():
        return tf.io.decode_jpeg(data, channels=channels)  # also CMYK and gray → channels

    image = tf.cond(tf.io.is_jpeg(data), jpeg, lambda: _decode_other(data, channels))
    return tf.ensure_shape(image, [None, None, channels])


def _decode_other(data, channels):
    """PNG, GIF, BMP, WebP; channels fixed here (GIF has no gray mode)."""
    return convert_channels(tf.io.decode_image(data, channels=0, expand_animations=False),
                            channels)


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
    (SimCLR, BYOL, big_vision): it makes decoding and cropping much slower (docs/data.md).
    """
    out = tf.image.resize(image, [size, size], method="bilinear", antialias=antialias)
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def _union(windows):
    """The smallest window (int32 [4]) holding every window of ``windows`` [k, 4]."""
    top, left = tf.reduce_min(windows[:, 0]), tf.reduce_min(windows[:, 1])
    bottom = tf.reduce_max(windows[:, 0] + windows[:, 2])
    right = tf.reduce_max(windows[:, 1] + windows[:, 3])
    return tf.stack([top, left, bottom - top, right - left])


def _crop(image, window):
    top, left, height, width = tf.unstack(window)
    return image[top:top + height, left:left + width]


class Views:
    """What is made of one record: ``num`` windows of the image (``windows(h, w, position)`` →
    int32 [num, 4] rows (top, left, height, width)), and ``finish(crops, position)`` → the
    outputs from the ``num`` cropped uint8 [h, w, C] regions."""

    def __init__(self, num, windows, finish):
        self.num, self.windows, self.finish = num, windows, finish


class Decoder:
    """Decodes records into position-fixed batches; names, counts and replaces the ones it
    cannot decode.

    Records are grouped into batches *before* decoding. Each batch is decoded by a parallel
    ``map`` over its records followed by ``ignore_errors`` (an error inside tf.data can only be
    caught for a whole dataset, and one broken file must not end a long run); the survivors
    carry their slot, so the failed slots are known when the batch is complete — also at the end
    of a finite stream. PIL then decodes, one by one, the files only it reads and those
    TensorFlow rejected; images that still fail are handed to ``bad`` (skip and name, or stop)
    and, in training, their slots are filled with other images of the batch (slot j with the
    (j mod n)-th of the n decoded ones). One small dataset per batch, not per image, keeps this
    cheap while nothing breaks.

    Args:
      channels: 1 or 3, the output channels.
      bad: an ``image_folder.BadImages`` (its ``on_bad_image`` decides skip or stop), or None
        where no Python may run (tf.data service workers): PIL files are then refused and a bad
        image is replaced without a name.
      reads_files: ``data`` is a file path to read (image folders), not the encoded bytes.
    """

    def __init__(self, channels, bad, reads_files):
        self.channels, self.bad, self.reads_files = int(channels), bad, reads_files

    # --- one record

    def _tf_regions(self, data, views, position):
        """TensorFlow decode: a JPEG only inside the union of its windows, other formats whole."""
        # One decode of the union box of both windows costs as much CPU per image as a whole
        # decode and two slices (within 1%) and decodes less; one decode_and_crop_jpeg per
        # window costs ~35% more, as two crops of 20-100% of the image cover more rows than one
        # (benchmarks/pipeline_crop.py --jpeg; the numbers in docs/data.md).
        contents = tf.io.read_file(data) if self.reads_files else data

        def jpeg():
            shape = tf.io.extract_jpeg_shape(contents)
            windows = views.windows(shape[0], shape[1], position)
            box = _union(windows)
            region = tf.io.decode_and_crop_jpeg(contents, box, channels=self.channels)
            return (tf.ensure_shape(region, [None, None, self.channels]),
                    windows - tf.stack([box[0], box[1], 0, 0]))

        def other():
            image = tf.ensure_shape(_decode_other(contents, self.channels),
                                    [None, None, self.channels])
            shape = tf.shape(image)
            return image, views.windows(shape[0], shape[1], position)

        return tf.cond(tf.io.is_jpeg(contents), jpeg, other)

    def _pil(self, data):
        return image_folder.pil_decode(self._source(data), self.channels)

    def _source(self, data):
        """What PIL opens: the file name, or the encoded bytes."""
        return os.fsdecode(data) if self.reads_files else bytes(data)

    def _record(self, data, position, views):
        image, windows = self._tf_regions(data, views, position)
        return views.finish([_crop(image, windows[j]) for j in range(views.num)], position)

    # --- batches

    def batches(self, records, views, batch_size, *, first_position=0, fill=True):
        """Batches ``(outputs [B, ...], labels int32 [B])`` of records ``[i B, (i + 1) B)``.

        Args:
          records: ``(data, label, kind)`` in order, the first at ``first_position``.
          views: a ``Views``.
          fill: training: a failed slot is filled with another image of its batch (a batch of
            which no image decodes raises ``DataError``), and the last partial batch is dropped.
            Evaluation (False): failed images are left out, the last batch may be partial.
        """
        positions = tf.data.Dataset.counter(first_position)
        grouped = tf.data.Dataset.zip((records, positions)).batch(batch_size,
                                                                  drop_remainder=fill)

        def decode_batch(record, position):
            data, label, kind = record
            slot = tf.range(tf.shape(position)[0])
            batch = (data, label, kind, position, slot)
            return self._decode_all(batch, views, batch_size).map(
                lambda *ok: self._complete(ok, batch, views, fill))

        out = grouped.interleave(decode_batch, cycle_length=2, num_parallel_calls=2,
                                 deterministic=True)
        if fill:
            out = out.map(lambda outputs, labels: (
                tf.nest.map_structure(
                    lambda t: tf.ensure_shape(t, [batch_size, *t.shape[1:]]), outputs),
                tf.ensure_shape(labels, [batch_size])))
        return out

    def _decode_all(self, batch, views, batch_size):
        """One element: the records of ``batch`` that decode, as (outputs [n, ...], labels [n],
        slots [n]) in slot order (n may be 0)."""
        def one(data, label, kind, position, slot):
            return self._record(data, position, views), label, slot

        tf_decoded = tf.not_equal(batch[2], image_folder.PIL_IMAGE)  # the others: ``_rescue``
        ok = (tf.data.Dataset.from_tensor_slices(
                  tf.nest.map_structure(lambda t: tf.boolean_mask(t, tf_decoded), batch))
              .map(one, num_parallel_calls=AUTOTUNE).ignore_errors().batch(batch_size))
        none = tf.nest.map_structure(lambda s: tf.zeros([0, *s.shape[1:]], s.dtype),
                                     ok.element_spec)
        return ok.concatenate(tf.data.Dataset.from_tensors(none)).take(1)

    def _rescue(self, ok, batch, views):
        """``ok`` plus the other records of ``batch`` decoded by PIL where it can: files only PIL
        reads, and files TensorFlow failed on (one by one; rare in the data this is for)."""
        outputs, labels, slots = ok
        data, label, _, position, slot = batch
        failed = tf.where(~_found(slots, tf.shape(slot)[0]))[:, 0]

        def one(i):
            image, decoded = tf.numpy_function(self._pil_or_nothing, [data[i]],
                                               (tf.uint8, tf.bool), stateful=False)
            image = tf.ensure_shape(image, [None, None, self.channels])
            shape = tf.shape(image)
            windows = views.windows(shape[0], shape[1], position[i])
            regions = [_crop(image, windows[j]) for j in range(views.num)]
            return views.finish(regions, position[i]), tf.ensure_shape(decoded, [])

        spec = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape[1:], t.dtype), outputs)
        more, decoded = tf.map_fn(one, failed, fn_output_signature=(spec, tf.bool))
        every = tf.concat([slots, tf.cast(tf.boolean_mask(failed, decoded), tf.int32)], 0)
        order = tf.argsort(every)

        def join(a, b):
            return tf.gather(tf.concat([a, tf.boolean_mask(b, decoded)], 0), order)

        return (tf.nest.map_structure(join, outputs, more),
                join(labels, tf.gather(label, failed)), tf.gather(every, order))

    def _pil_or_nothing(self, data):
        """PIL's decode, and whether it worked (a 1x1 image if not: a map cannot drop it)."""
        try:
            return self._pil(data), np.bool_(True)
        except Exception:  # noqa: BLE001  PIL raises many types for a broken file
            return np.zeros((1, 1, self.channels), np.uint8), np.bool_(False)

    def _complete(self, ok, batch, views, fill):
        """PIL's second try at the failed slots of a batch; names the ones that still fail (or
        stops), and fills their slots in training."""
        data, _, _, position, _ = batch
        if self.bad is not None:
            ok = tf.cond(tf.reduce_any(~_found(ok[2], tf.shape(position)[0])),
                         lambda: self._rescue(ok, batch, views), lambda: ok)
        outputs, labels, slots = ok
        total, decoded = tf.shape(position)[0], tf.shape(slots)[0]
        missing = tf.where(~_found(slots, total))[:, 0]
        if self.bad is not None:
            checked = tf.cond(
                tf.size(missing) > 0,
                lambda: tf.numpy_function(
                    self._report, [tf.gather(data, missing), tf.gather(position, missing),
                                   decoded, fill], tf.int64),
                lambda: tf.constant(0, tf.int64))
        elif fill:
            checked = tf.debugging.Assert(decoded > 0, [
                "No image of a training batch could be decoded, e.g.", data[0]])
        else:
            checked = tf.no_op()
        with tf.control_dependencies([checked]):
            labels = tf.identity(labels)
            outputs = tf.nest.map_structure(tf.identity, outputs)
        if not fill:
            return outputs, labels
        # Slot j keeps its image, or takes the (j mod n)-th of the n decoded ones.
        index = tf.scatter_nd(slots[:, None], tf.range(decoded) + 1, [total]) - 1
        source = tf.where(index >= 0, index, tf.range(total) % tf.maximum(decoded, 1))
        return tf.nest.map_structure(lambda t: tf.gather(t, source), outputs), tf.gather(
            labels, source)

    def _report(self, data, positions, decoded, fill):
        names = [self._name(d, int(p)) for d, p in zip(data, positions)]
        if fill and decoded == 0:
            raise DataError(
                f"none of the {len(names)} images of a training batch could be decoded "
                f"({_describe(names)}); the data is unusable as it is. Check the files, e.g. "
                f"with PIL: python -c \"from PIL import Image; Image.open('{names[0]}').load()\"")
        for name, d in zip(names, data):
            self.bad.report(name, self._source(d))
        return np.int64(len(names))

    def _name(self, data, position):
        return os.fsdecode(data) if self.reads_files else f"record {position}"


def _found(slots, total):
    """bool [total]: which slots are in ``slots``."""
    return tf.scatter_nd(slots[:, None], tf.ones_like(slots), [total]) > 0


def _describe(names, shown=5):
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def train_views(decoder, records, *, image_size, crop_scale, flip_p, seed, batch_size,
                first_position=0, antialias=False):
    """Batches of two uint8 views [B, S, S, C] per record, torchvision's crops of the original.

    Record ``p`` (counting from ``first_position``) is slot ``p % batch_size`` of batch
    ``i = p // batch_size``; view ``v`` of it is cropped with the crop seed of
    ``augment.view_seeds`` (batch i, view v) folded with the slot, so a resumed pipeline crops
    exactly as the uninterrupted one.

    Args:
      records: ``(data, label, kind)`` in training order.
      flip_p: (view 1, view 2) probabilities of a horizontal flip.
      seed: int64 [2].
      antialias: see ``resize_to``.
    Returns:
      a dataset of ``((view1, view2), labels)``: uint8 [B, S, S, C] views, int32 [B] labels.
    """
    def draws(position):
        i, slot = position // batch_size, position % batch_size
        out = []
        for v in range(2):
            crop_seed = augment.view_seeds(augment.batch_seed(seed, i), v)[0]
            out.append(tf.unstack(tf.random.experimental.stateless_split(
                tf.random.experimental.stateless_fold_in(crop_seed, slot), 2)))
        return out  # [(window seed, flip seed)] per view

    def windows(height, width, position):
        return tf.stack([crops.crop_windows(window_seed, height, width, 1, crop_scale)[0]
                         for window_seed, _ in draws(position)])

    def finish(regions, position):
        out = []
        for v, (region, (_, flip_seed)) in enumerate(zip(regions, draws(position))):
            view = resize_to(region, image_size, antialias)
            flip = tf.random.stateless_uniform([], flip_seed) < flip_p[v]
            out.append(tf.cond(flip, lambda: tf.reverse(view, [1]), lambda: view))
        return tuple(out)

    return decoder.batches(records, Views(2, windows, finish), batch_size,
                           first_position=first_position)


def eval_images(decoder, records, *, image_size, antialias=True):
    """The evaluation view of each record: uint8 [S, S, C], the centre crop resized.

    Centre crop of 87.5% of the shorter side above 64 px (Resize(S/0.875) + CenterCrop(S), the
    ImageNet protocol); the whole centre square for small images, antialiased by default (as
    the evaluation transforms of the reference code: features are compared across runs, and
    evaluation decodes each image once). Yields ``(image, label)``; images that cannot be
    decoded are left out and named (or stop the run, ``on_bad_image=error``).
    """
    fraction = 1.0 if image_size <= 64 else 0.875

    def windows(height, width, position):
        return crops.centre_window(height, width, fraction)[None]

    def finish(regions, position):
        return resize_to(regions[0], image_size, antialias)

    return decoder.batches(records, Views(1, windows, finish), EVAL_CHUNK,
                           fill=False).unbatch()
