"""Two-view augmentation on a whole batch, each image with its own random parameters.

Runs after ``batch()``: one ``tf.image.crop_and_resize`` call crops every image of the batch with
its own box (``keras.layers.RandomCrop`` picks one window for the whole batch and Keras 3 has no
RandomResizedCrop), and colour jitter / grayscale / blur / solarize are vectorised with per-image
factors. All randomness is stateless, drawn from a seed of shape [2] — the pipeline folds the
batch index into the run seed, so batch ``i`` is the same in a resumed run.

Why not keras-cv ``RandomCropAndResize``: it is per image too, but it crops image by image
(vectorized_map) and draws from a stateful generator, so batches can't be replayed. Measured on
the 2-core CPU (benchmarks/pipeline_crop.py, random-resized crop only, uint8 → float32, img/s,
other jobs running):
    28 px,  batch 256:  keras-cv  9,700–13,000   batched crop_and_resize  65,000–68,000
    224 px, batch 64:   keras-cv    900–1,180    batched crop_and_resize   1,300–1,420
Full moco_v2 two views at 224 px: ~65–80 img/s per 2 cores (hue via HSV and the 23-tap blur
dominate; tf.data runs batches in parallel, so it scales with cores). Fashion-MNIST moco_v2
pipeline at batch 256: 38,000–48,000 img/s.

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

import tensorflow as tf


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
ASPECT_RATIO = (3.0 / 4.0, 4.0 / 3.0)


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
    recipes = RECIPES[kind] if isinstance(kind, str) else tuple(kind)
    if len(recipes) != 2:
        raise ValueError(f"kind must name a recipe in {sorted(RECIPES)} or be 2 ViewRecipes")
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    return tuple(
        augment_view(images, recipe, image_size=image_size, crop_scale=crop_scale, ratio=ratio,
                     seed=tf.random.experimental.stateless_fold_in(seed, view))
        for view, recipe in enumerate(recipes))


def augment_view(images, recipe: ViewRecipe, *, image_size, crop_scale, seed,
                 ratio=ASPECT_RATIO):
    """One augmented view of a batch: float32 [B,S,S,C] in [0, 1] (see ``two_view_augment``)."""
    images = tf.convert_to_tensor(images)
    channels = images.shape[-1]
    if channels not in (1, 3):
        raise ValueError(f"images need a static channel count of 1 or 3, got shape {images.shape}")
    crop_seed, param_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tf.shape(images)
    # A static batch size keeps the boxes' shape static (grappler warns on CropAndResize otherwise).
    batch = images.shape[0] if images.shape[0] is not None else shape[0]
    boxes = sample_crop_boxes(crop_seed, batch, shape[1], shape[2], image_size, crop_scale,
                              ratio, recipe.flip_p)
    # float input: CropAndResize's float kernel is faster than its uint8 one (measured ~1.4x).
    x = tf.image.crop_and_resize(tf.cast(images, tf.float32), boxes, tf.range(batch),
                                 [image_size, image_size])
    if images.dtype == tf.uint8:
        x = x * (1.0 / 255.0)

    # One uniform per image per random decision; columns named below.
    u = tf.random.stateless_uniform([batch, 9], param_seed)
    (u_jit, u_bri, u_con, u_sat, u_hue, u_gray, u_blur, u_sigma, u_sol) = tf.unstack(u, axis=1)

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
    if recipe.blur_p > 0:
        lo, hi = recipe.blur_sigma
        x = gaussian_blur(x, lo + (hi - lo) * u_sigma, u_blur < recipe.blur_p)
    if recipe.solarize_p > 0:
        x = tf.where((u_sol < recipe.solarize_p)[:, None, None, None] & (x >= 0.5), 1.0 - x, x)
    return tf.clip_by_value(x, 0.0, 1.0)


def sample_crop_boxes(seed, batch, height, width, out_size, scale, ratio, flip_p=0.0,
                      attempts=10):
    """Per-image random-resized-crop boxes for ``tf.image.crop_and_resize``: float32 [B, 4].

    torchvision's RandomResizedCrop, vectorised: 10 tries of (area ∈ scale·H·W, log-uniform
    aspect ∈ ratio) per image, the first that fits wins, else the whole image (centre crop at the
    nearest allowed ratio). Sizes stay continuous (no pixel rounding). Boxes are placed so the
    S output pixels sample the crop at half-pixel centres, like ``tf.image.resize``; a flipped
    image gets x1 > x2, which crop_and_resize reads as a horizontal flip.
    """
    seeds = tf.random.experimental.stateless_split(seed, 4)
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    area = h * w * tf.random.stateless_uniform([batch, attempts], seeds[0], scale[0], scale[1])
    log_r = tf.random.stateless_uniform([batch, attempts], seeds[1],
                                        tf.math.log(ratio[0]), tf.math.log(ratio[1]))
    aspect = tf.exp(log_r)
    cw, ch = tf.sqrt(area * aspect), tf.sqrt(area / aspect)
    fits = (cw <= w) & (ch <= h)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
    pick = lambda t: tf.gather(t, first, axis=1, batch_dims=1)  # noqa: E731
    # Fallback when no try fits: the whole image, trimmed to the allowed aspect ratio.
    in_ratio = w / h
    fb_w = tf.where(in_ratio > ratio[1], h * ratio[1], w)
    fb_h = tf.where(in_ratio < ratio[0], w / ratio[0], h)
    any_fit = tf.reduce_any(fits, axis=1)
    cw = tf.where(any_fit, pick(cw), fb_w)
    ch = tf.where(any_fit, pick(ch), fb_h)
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


def gaussian_blur(x, sigma, apply):
    """Per-image Gaussian blur: float [B,S,S,C], sigma [B], apply bool [B] (False = identity).

    Separable kernel of odd size ~10% of S (torchvision's choice: 23 at 224), reflect padding,
    all images in one depthwise convolution (batch folded into channels).
    """
    size = x.shape[1]
    channels = x.shape[-1]
    ksize = max(3, int(0.1 * size) // 2 * 2 + 1)
    r = ksize // 2
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
    S / crop_fraction (above 64 px; to S for small images, matching ``datasets.decode_size``)
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
