"""Two-view augmentation on a whole batch, each image with its own random parameters.

Runs after ``batch()``: one ``tf.image.crop_and_resize`` call crops every image of the batch with
its own box (``keras.layers.RandomCrop`` picks one window for the whole batch and Keras 3 has no
RandomResizedCrop), and colour jitter / grayscale / blur / solarize are vectorised with per-image
factors. All randomness is stateless, drawn from a seed of shape [2] — the pipeline folds the
batch index into the run seed, so batch ``i`` is the same in a resumed run.

Why not keras-cv ``RandomCropAndResize``: it is per image too, but it crops image by image
(vectorized_map) and draws from a stateful generator, so batches can't be replayed; and the one
batched op is faster (benchmarks/pipeline_crop.py; the numbers are in docs/data.md). Large
images are read one by one instead (``records.py``) and only the photometric stage runs here,
batched.

Recipes (MoCo official code, torchvision semantics):
* moco_v1: RandomResizedCrop(scale), RandomGrayscale(0.2), ColorJitter(0.4, 0.4, 0.4, 0.4), flip.
* moco_v2 (aug+): RandomResizedCrop(scale), ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8,
  RandomGrayscale(0.2), GaussianBlur(σ ∈ [0.1, 2]) p=0.5, flip.
* moco_v3 (BYOL, asymmetric): as v2 with saturation 0.2; blur p=1.0 / 0.1, solarize p=0 / 0.2.
* crop: random resized crop only (no flip) — for debugging and tests.
Differences from torchvision: colour jitter applies brightness, contrast, saturation, hue in this
fixed order (torchvision shuffles the order per image; keras-cv's jitter is fixed-order too); the
blur kernel is ~10% of the output side (odd, ≥ 3) like torchvision's, truncating large σ on small
images. One-channel images: jitter is brightness + contrast only and grayscale is a no-op.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import keras
import tensorflow as tf

from moco_tf.data import crops
from moco_tf.data.crops import ASPECT_RATIO


@dataclasses.dataclass(frozen=True)
class ViewRecipe:
    """Random transforms of one view, applied after the random resized crop.

    ``jitter`` = (brightness, contrast, saturation, hue) strengths, torchvision ColorJitter style:
    factors uniform in [1 - s, 1 + s] (hue: shift uniform in [-s, s] of a full turn).
    """

    flip_p: float = 0.5
    jitter: tuple = (0.0, 0.0, 0.0, 0.0)
    jitter_p: float = 0.0
    gray_p: float = 0.0
    gray_first: bool = False  # MoCo v1 applies RandomGrayscale before ColorJitter
    blur_p: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)
    solarize_p: float = 0.0


_V1 = ViewRecipe(jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, gray_p=0.2, gray_first=True)
_V2 = ViewRecipe(jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.5)
_V3 = ViewRecipe(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=1.0)
RECIPES = {
    "moco_v1": (_V1, _V1),
    "moco_v2": (_V2, _V2),
    "moco_v3": (_V3, dataclasses.replace(_V3, blur_p=0.1, solarize_p=0.2)),
    "crop": (ViewRecipe(flip_p=0.0), ViewRecipe(flip_p=0.0)),
}


def recipes_of(kind) -> tuple:
    """The (view 1, view 2) recipes named ``kind`` (a key of ``RECIPES``), or ``kind`` itself."""
    recipes = RECIPES[kind] if isinstance(kind, str) else tuple(kind)
    if len(recipes) != 2:
        raise ValueError(f"kind must name a recipe in {sorted(RECIPES)} or be 2 ViewRecipes")
    return recipes


def batch_seed(seed, batch_index):
    """The seed of batch ``batch_index`` of a pipeline seeded ``seed`` (int64 [2])."""
    return tf.random.experimental.stateless_fold_in(
        tf.cast(tf.convert_to_tensor(seed), tf.int64), tf.cast(batch_index, tf.int64))


def view_seeds(batch_seed, view):
    """(crop seed, photometric seed), int64 [2] each, of view ``view`` (0 or 1) of the batch
    seeded ``batch_seed`` — the one split every path uses, so crops and colours are the same
    wherever they are computed (batched crops, per-image decoder, ``train_step``)."""
    view_seed = tf.random.experimental.stateless_fold_in(
        tf.cast(tf.convert_to_tensor(batch_seed), tf.int64), view)
    return tf.unstack(tf.random.experimental.stateless_split(view_seed, 2))


def two_view_augment(images, *, kind="moco_v2", image_size, crop_scale=(0.2, 1.0), seed,
                     ratio=ASPECT_RATIO):
    """Two independently augmented views of every image of a batch.

    Args:
      images: uint8 [B,H,W,C] (0..255) or float [B,H,W,C] in [0, 1]; C is 1 or 3 (static).
      kind: a name in ``RECIPES`` or a pair of ``ViewRecipe`` (view 1, view 2).
      image_size: output side S.
      crop_scale: range of the crop area as a fraction of the image area.
      seed: int tensor [2]; the same seed gives the same views.
      ratio: range of the crop aspect ratio (width / height).
    Returns:
      (view1, view2), float32 [B,S,S,C] in [0, 1].
    """
    recipes = recipes_of(kind)
    views = crop_views(images, recipes, image_size=image_size, crop_scale=crop_scale,
                       seed=seed, ratio=ratio)
    return photometric(views, recipes, seed)


def crop_views(images, kind, *, image_size, crop_scale, seed, ratio=ASPECT_RATIO):
    """The crop stage of ``two_view_augment``: per-image random resized crop and flip of both
    views, float32 [B,S,S,C] in [0, 1] — one ``tf.image.crop_and_resize`` per view."""
    images = tf.convert_to_tensor(images)
    channels = images.shape[-1]
    if channels not in (1, 3):
        raise ValueError(f"images need a static channel count of 1 or 3, got shape {images.shape}")
    shape = tf.shape(images)
    # A static batch size keeps the boxes' shape static (grappler warns on CropAndResize otherwise).
    batch = images.shape[0] if images.shape[0] is not None else shape[0]
    # float input: CropAndResize's float kernel is faster than its uint8 one (docs/data.md).
    pixels = tf.cast(images, tf.float32)
    views = []
    for view, recipe in enumerate(recipes_of(kind)):
        boxes = crops.sample_crop_boxes(view_seeds(seed, view)[0], batch, shape[1], shape[2],
                                        image_size, crop_scale, ratio, recipe.flip_p)
        x = tf.image.crop_and_resize(pixels, boxes, tf.range(batch), [image_size, image_size])
        views.append(x * (1.0 / 255.0) if images.dtype == tf.uint8 else x)
    return tuple(views)


def photometric(views, kind, seed, *, fast=False, rows=None):
    """The photometric stage of both views: colour jitter, grayscale, blur, solarize.

    Args:
      views: (view1, view2), uint8 or [0, 1] float [B,S,S,C] (crops, already flipped).
      kind: recipe name or pair, as in ``two_view_augment``.
      seed: the batch seed (int [2]), as in ``two_view_augment``.
      fast: the host path for large images: the colour ops fused by XLA, the blur computed for
        the images that get blurred only. Not for an XLA-compiled step (dynamic shapes); equal to
        the plain path to float rounding (~1e-6).
      rows: (offset, total): the views are rows [offset, offset + B) of a batch of ``total``
        (one replica's share of the global batch); the random draws are the whole batch's.
    Returns:
      (view1, view2), float32 [B,S,S,C] in [0, 1].
    """
    return tuple(
        _photometric_view(x, recipe, view_seeds(seed, view)[1], fast=fast, rows=rows)
        for view, (x, recipe) in enumerate(zip(views, recipes_of(kind))))


def _photometric_view(x, recipe, param_seed, *, fast=False, rows=None):
    x = tf.convert_to_tensor(x)
    batch = x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]
    offset, total = rows if rows is not None else (0, batch)
    # One uniform per image per random decision, drawn for the whole batch; columns named below.
    u = tf.random.stateless_uniform([total, 9], param_seed)
    if rows is not None:
        u = u[offset:offset + batch]
    x = (_fused_colour(recipe) if fast else functools.partial(_colour, recipe=recipe))(x, u)
    if recipe.blur_p > 0:
        lo, hi = recipe.blur_sigma
        sigma, apply = lo + (hi - lo) * u[:, 7], u[:, 6] < recipe.blur_p
        x = (_blur_selected if fast else gaussian_blur)(x, sigma, apply, sigma_max=hi)
    if recipe.solarize_p > 0:
        x = tf.where((u[:, 8] < recipe.solarize_p)[:, None, None, None] & (x >= 0.5), 1.0 - x, x)
    return tf.clip_by_value(x, 0.0, 1.0)


def _colour(x, u, recipe):
    """Grayscale and colour jitter of [B,S,S,C] images (uint8, or float in [0, 1]) by ``recipe``
    with the uniforms u [B, 9] (columns: apply jitter, brightness, contrast, saturation, hue,
    apply grayscale, ...): float32 in [0, 1]."""
    if x.dtype == tf.uint8:
        x = tf.cast(x, tf.float32) * (1.0 / 255.0)
    channels = x.shape[-1]
    u_jit, u_bri, u_con, u_sat, u_hue, u_gray = tf.unstack(u[:, :6], axis=1)

    def gray(x):
        if recipe.gray_p > 0 and channels == 3:
            x = tf.where((u_gray < recipe.gray_p)[:, None, None, None],
                         tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(x)), x)
        return x

    if recipe.gray_first:
        x = gray(x)
    if recipe.jitter_p > 0 and any(recipe.jitter):
        apply = u_jit < recipe.jitter_p
        b, c, s, h = recipe.jitter
        x = color_jitter(
            x,
            brightness=_factor(apply, u_bri, 1 - b, 1 + b, 1.0),
            contrast=_factor(apply, u_con, 1 - c, 1 + c, 1.0),
            saturation=_factor(apply, u_sat, 1 - s, 1 + s, 1.0) if s else None,
            hue=_factor(apply, u_hue, -h, h, 0.0) if h else None)
    if not recipe.gray_first:
        x = gray(x)
    return x


@functools.lru_cache(maxsize=None)
def _fused_colour(recipe):
    """``_colour`` compiled by XLA: its ~20 element-wise ops (and the HSV round trip of the hue)
    become one pass over the pixels (the timings are in docs/data.md)."""
    return tf.function(functools.partial(_colour, recipe=recipe), jit_compile=True)


def _blur_selected(x, sigma, apply, sigma_max=2.0):
    """``gaussian_blur`` computed for the images with ``apply`` only (half of them in MoCo v2)."""
    index = tf.where(apply)[:, 0]

    def blur():
        blurred = gaussian_blur(tf.gather(x, index), tf.gather(sigma, index),
                                tf.ones_like(index, tf.bool), sigma_max=sigma_max)
        return tf.tensor_scatter_nd_update(x, index[:, None], blurred)

    return tf.cond(tf.size(index) > 0, blur, lambda: x)


def color_jitter(x, brightness, contrast, saturation=None, hue=None):
    """torchvision-style colour jitter with per-image factors [B] (None skips an op).

    x: float32 [B,H,W,C] in [0, 1]. Each op clips to [0, 1] like torchvision. Saturation and hue
    need C == 3 and are skipped for one-channel images.
    """
    color = x.shape[-1] == 3
    x = tf.clip_by_value(x * brightness[:, None, None, None], 0.0, 1.0)
    gray = tf.image.rgb_to_grayscale(x) if color else x
    mean = tf.reduce_mean(gray, axis=[1, 2, 3], keepdims=True)
    c = contrast[:, None, None, None]
    x = tf.clip_by_value(c * x + (1.0 - c) * mean, 0.0, 1.0)
    if color and saturation is not None:
        s = saturation[:, None, None, None]
        x = tf.clip_by_value(s * x + (1.0 - s) * tf.image.rgb_to_grayscale(x), 0.0, 1.0)
    if color and hue is not None:
        hsv = tf.image.rgb_to_hsv(x)
        shifted = tf.math.floormod(hsv[..., 0] + hue[:, None, None], 1.0)
        x = tf.image.hsv_to_rgb(tf.concat([shifted[..., None], hsv[..., 1:]], axis=-1))
    return x


def gaussian_blur(x, sigma, apply, sigma_max=2.0):
    """Per-image Gaussian blur: float [B,S,S,C], sigma [B], apply bool [B] (False = identity).

    Separable kernel of odd size ~10% of S (torchvision's choice: 23 at 224) but no wider than
    4 ``sigma_max`` each side (17 taps for MoCo's σ ≤ 2: the weights cut off are < 1e-4 of the
    sum, and the blur costs a quarter less), reflect padding, all images in one depthwise
    convolution (batch folded into channels).
    """
    size = x.shape[1]
    channels = x.shape[-1]
    r = min(max(3, int(0.1 * size) // 2 * 2 + 1) // 2, math.ceil(4 * sigma_max))
    ksize = 2 * r + 1
    t = tf.range(-r, r + 1, dtype=tf.float32)
    k = tf.exp(-tf.square(t)[None, :] / (2.0 * tf.square(sigma)[:, None]))
    k = k / tf.reduce_sum(k, axis=1, keepdims=True)
    k = tf.where(apply[:, None], k, tf.one_hot(r, ksize)[None, :])  # exact identity if not applied
    k = tf.repeat(k, channels, axis=0)  # [B*C, k], matches the b*C + c channel order below
    shape = tf.shape(x)
    batch, h, w = shape[0], shape[1], shape[2]
    y = tf.reshape(tf.transpose(x, [1, 2, 0, 3]), [1, h, w, batch * channels])
    y = tf.pad(y, [[0, 0], [r, r], [r, r], [0, 0]], mode="REFLECT")
    kt = tf.transpose(k)  # [k, B*C]
    y = tf.nn.depthwise_conv2d(y, kt[:, None, :, None], [1, 1, 1, 1], "VALID")
    y = tf.nn.depthwise_conv2d(y, kt[None, :, :, None], [1, 1, 1, 1], "VALID")
    return tf.transpose(tf.reshape(y, [h, w, batch, channels]), [2, 0, 1, 3])


def eval_transform(images, image_size, crop_fraction=0.875):
    """Deterministic eval view: float32 [B,S,S,C] in [0, 1] from uint8/[0,1]-float [B,H,W,C].

    Images already S×S pass through unchanged. Larger ones: shorter side resized to
    S / crop_fraction (above 64 px; to S for small images, as ``records.eval_images`` crops)
    then the centre S×S crop — Resize(256) + CenterCrop(224) for ImageNet. Smaller ones are
    resized up to S (shorter side) and centre-cropped.
    """
    images = tf.convert_to_tensor(images)
    x = tf.cast(images, tf.float32)
    if images.dtype == tf.uint8:
        x = x * (1.0 / 255.0)
    h, w = images.shape[1], images.shape[2]
    if h == image_size and w == image_size:
        return x
    shape = tf.shape(x)
    h, w = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    side = tf.minimum(h, w)
    big = image_size if image_size <= 64 else int(round(image_size / crop_fraction))
    target = tf.where(side > image_size, float(big), float(image_size))
    new_h = tf.cast(tf.round(h * target / side), tf.int32)
    new_w = tf.cast(tf.round(w * target / side), tf.int32)
    x = tf.image.resize(x, [new_h, new_w], antialias=True)
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    x = x[:, top:top + image_size, left:left + image_size]
    x = tf.ensure_shape(x, [None, image_size, image_size, images.shape[-1]])
    return tf.clip_by_value(x, 0.0, 1.0)


def _factor(apply, u, lo, hi, identity):
    """Per-image factor uniform in [max(lo, 0), hi] where ``apply``, else ``identity``."""
    lo = max(lo, 0.0) if identity == 1.0 else lo
    return tf.where(apply, lo + (hi - lo) * u, identity)


@keras.saving.register_keras_serializable(package="moco_tf")
class PhotometricAugmenter(keras.layers.Layer):
    """The photometric stage as a Keras layer, for ``data.augment_on = "device"``: the model
    runs it at the start of ``train_step``, on the accelerator, on the crops the host sent.

    ``call((view1, view2), step)`` gives what the host pipeline gives for batch ``step`` (the
    data position is the step counter): the same ops, the same seeds — so host and device
    augmentation give the same images on the same hardware. Under a strategy each replica takes
    its rows of the global batch's random draws.

    Args:
      kind: recipe name in ``RECIPES`` (or a pair of ``ViewRecipe``, not serialisable).
      seed: the run seed (``config.seed``).
    Input/output: views [B, S, S, C], uint8 or float in [0, 1] → float32 in [0, 1].
    """

    def __init__(self, kind="moco_v2", seed=0, **kwargs):
        kwargs.setdefault("dtype", "float32")  # no autocast to a mixed policy's bfloat16
        super().__init__(**kwargs)
        self.kind, self.seed = kind, int(seed)

    def call(self, views, step):
        seed = batch_seed(tf.constant([self.seed, 0], tf.int64), step)
        rows = None
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and ctx.num_replicas_in_sync > 1:
            n = tf.shape(views[0])[0]
            rows = (n * tf.cast(ctx.replica_id_in_sync_group, tf.int32),
                    n * ctx.num_replicas_in_sync)
        return photometric(views, self.kind, seed, rows=rows)

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "seed": self.seed}
