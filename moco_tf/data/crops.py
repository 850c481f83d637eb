"""Random resized crops with torchvision's rule, drawn statelessly, and crop-before-decode.

torchvision's ``RandomResizedCrop(size, scale, ratio)`` (the MoCo recipes' first transform): up to
10 tries of (area = U(scale) · H · W, aspect = exp(U(log ratio))), width = round(sqrt(area ·
aspect)), height = round(sqrt(area / aspect)); the first box that fits the *original* image wins,
its corner uniform over the positions where it fits; if none fits, the whole image trimmed to the
nearest allowed aspect ratio, centred. Every draw here is a pure function of a seed (int [2]), so
a resumed run crops the same images the same way.

Two users:
* ``crop_windows`` — integer windows ``(top, left, height, width)`` of one image, exactly
  torchvision's rule, for images of any size read one by one (JPEG folders, tfds ImageNet; the
  windows are also what ``tf.io.decode_and_crop_jpeg`` takes).
* ``sample_crop_boxes`` — the same draws for a whole batch of equal-size in-memory images as
  continuous ``tf.image.crop_and_resize`` boxes (one op crops the batch; Fashion-MNIST, CIFAR).
"""
from __future__ import annotations

import tensorflow as tf

ASPECT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
ATTEMPTS = 10


def _first_fit(area_seed, ratio_seed, shape, height, width, scale, ratio, integer):
    """Crop sizes (ch, cw) [*shape] and whether a try fitted, by torchvision's tries.

    The seeds [2] give the area and the aspect draws ([*shape, ATTEMPTS] each). ``integer``: round
    the sizes like torchvision (then the fallback rounds too); else keep them continuous.
    """
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    tries = [*shape, ATTEMPTS]
    area = h * w * tf.random.stateless_uniform(tries, area_seed, scale[0], scale[1])
    aspect = tf.exp(tf.random.stateless_uniform(
        tries, ratio_seed, tf.math.log(ratio[0]), tf.math.log(ratio[1])))
    cw, ch = tf.sqrt(area * aspect), tf.sqrt(area / aspect)
    if integer:
        cw, ch = tf.round(cw), tf.round(ch)  # round half to even, as Python's round()
    fits = (cw <= w) & (ch <= h) & (cw > 0) & (ch > 0)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=-1, output_type=tf.int32)
    pick = lambda t: tf.gather(t, first, axis=-1, batch_dims=len(shape))  # noqa: E731
    # No try fits: the whole image, trimmed to the allowed aspect ratio.
    in_ratio = w / h
    fb_w = tf.where(in_ratio > ratio[1], h * ratio[1], w)
    fb_h = tf.where(in_ratio < ratio[0], w / ratio[0], h)
    if integer:
        fb_w, fb_h = tf.round(fb_w), tf.round(fb_h)
    any_fit = tf.reduce_any(fits, axis=-1)
    return tf.where(any_fit, pick(ch), fb_h), tf.where(any_fit, pick(cw), fb_w), any_fit


def crop_windows(seed, height, width, num=2, scale=(0.2, 1.0), ratio=ASPECT_RATIO):
    """``num`` random-resized-crop windows of one ``height`` x ``width`` image.

    Returns int32 [num, 4] rows ``(top, left, crop_height, crop_width)`` — the argument
    ``tf.io.decode_and_crop_jpeg`` takes — exactly torchvision's ``RandomResizedCrop.get_params``
    distribution (integer sizes, the corner uniform over the fitting positions, the centre
    fallback).
    """
    area_seed, ratio_seed, corner_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    ch, cw, any_fit = _first_fit(area_seed, ratio_seed, [num], height, width, scale, ratio,
                                 integer=True)
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    u = tf.random.stateless_uniform([num, 2], corner_seed)
    # torch.randint(0, H - h + 1): floor(u · (H - h + 1)), u in [0, 1).
    top = tf.minimum(tf.floor(u[:, 0] * (h - ch + 1.0)), h - ch)
    left = tf.minimum(tf.floor(u[:, 1] * (w - cw + 1.0)), w - cw)
    top = tf.where(any_fit, top, tf.floor((h - ch) / 2.0))
    left = tf.where(any_fit, left, tf.floor((w - cw) / 2.0))
    return tf.cast(tf.stack([top, left, ch, cw], axis=1), tf.int32)


def centre_window(height, width, fraction):
    """The centred square window of side ``fraction`` · min(height, width): int32 [4] as in
    ``crop_windows``. fraction 0.875 then a resize to 224 is torchvision's Resize(256) +
    CenterCrop(224) (the evaluation view), up to the rounding of one resize."""
    side = tf.cast(tf.round(fraction * tf.cast(tf.minimum(height, width), tf.float32)), tf.int32)
    side = tf.maximum(side, 1)
    return tf.stack([(height - side) // 2, (width - side) // 2, side, side])


def sample_crop_boxes(seed, batch, height, width, out_size, scale, ratio=ASPECT_RATIO, flip_p=0.0):
    """Per-image random-resized-crop boxes for ``tf.image.crop_and_resize``: float32 [B, 4].

    For a batch of ``height`` x ``width`` images: the tries of ``crop_windows`` with continuous
    sizes (no pixel rounding: small images keep sub-pixel variety). Boxes are placed so the
    ``out_size`` output pixels sample the crop at half-pixel centres, like ``tf.image.resize``; a
    flipped image gets x1 > x2, which crop_and_resize reads as a horizontal flip.
    """
    seeds = tf.random.experimental.stateless_split(seed, 4)
    ch, cw, _ = _first_fit(seeds[0], seeds[1], [batch], height, width, scale, ratio, integer=False)
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    offsets = tf.random.stateless_uniform([batch, 2], seeds[2])
    y0 = offsets[:, 0] * (h - ch)
    x0 = offsets[:, 1] * (w - cw)
    # Output pixel k samples source coordinate (pixel-index units) x0 + (k + .5)·cw/S - .5.
    s = tf.cast(out_size, tf.float32)
    y1, y2 = y0 + 0.5 * ch / s - 0.5, y0 + ch - 0.5 * ch / s - 0.5
    x1, x2 = x0 + 0.5 * cw / s - 0.5, x0 + cw - 0.5 * cw / s - 0.5
    flip = tf.random.stateless_uniform([batch], seeds[3]) < flip_p
    x1, x2 = tf.where(flip, x2, x1), tf.where(flip, x1, x2)
    hn, wn = tf.maximum(h - 1.0, 1.0), tf.maximum(w - 1.0, 1.0)
    return tf.stack([y1 / hn, x1 / wn, y2 / hn, x2 / wn], axis=1)
