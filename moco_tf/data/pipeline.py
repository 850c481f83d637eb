"""tf.data pipelines: two-view training batches and labelled eval batches.

Order (DESIGN §3): decode once → cache the uint8 images (small datasets) → shuffle → repeat →
batch → augment the whole batch (per-image randomness, seeded by (seed, batch index)) → prefetch.
"""
from __future__ import annotations

import tensorflow as tf

from moco_tf.data import augment, datasets

AUTOTUNE = tf.data.AUTOTUNE


def two_view_dataset(images_ds: tf.data.Dataset, *, batch_size: int, kind: str = "moco_v2",
                     image_size: int, crop_scale=(0.2, 1.0), seed: int = 0,
                     start_batch: int = 0, with_labels: bool = False) -> tf.data.Dataset:
    """Batches of two views from YOUR dataset of images; shuffle/repeat it beforehand.

    Args:
      images_ds: unbatched elements ``image`` or ``(image, label, ...)`` or ``{"image": ...}``,
        image uint8 [H,W,C] (or float in [0, 1]) of one fixed size, C in {1, 3}.
      batch_size: global batch size; the last partial batch is dropped (static shapes).
      kind, image_size, crop_scale: see ``augment.two_view_augment``.
      seed: batch ``i`` is augmented with seed fold_in([seed, 0], i), so a pipeline rebuilt with
        the same seed (and the same input order) reproduces its batches.
      start_batch: skip this many batches first (cheap: before augmentation) — to resume.
      with_labels: also yield ``"label"`` int32 [B] (e.g. for an online linear probe).
    Returns:
      dataset of ``{"view1": float32 [B,S,S,C], "view2": float32 [B,S,S,C]}`` (+ ``"label"``).
    """
    spec = images_ds.element_spec
    if isinstance(spec, dict):
        images_ds = images_ds.map(lambda d: (d["image"], d.get("label", -1)))
    elif not isinstance(spec, tuple):
        images_ds = images_ds.map(lambda x: (x, -1))
    else:
        images_ds = images_ds.map(lambda x, y, *rest: (x, y))
    base_seed = tf.constant([seed, 0], tf.int64)

    def make_views(index, batch):
        images, labels = batch
        view1, view2 = augment.two_view_augment(
            images, kind=kind, image_size=image_size, crop_scale=tuple(crop_scale),
            seed=tf.random.experimental.stateless_fold_in(base_seed, index))
        out = {"view1": view1, "view2": view2}
        if with_labels:
            out["label"] = tf.cast(labels, tf.int32)
        return out

    ds = images_ds.batch(batch_size, drop_remainder=True).enumerate()
    if start_batch:
        ds = ds.skip(start_batch)
    return ds.map(make_views, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


def train_dataset(data_cfg, batch_size: int, seed: int = 0, split: str | None = None, *,
                  start_batch: int = 0, with_labels: bool = False) -> tf.data.Dataset:
    """Infinite two-view training batches from ``data_cfg`` (the config's ``data`` section).

    Yields ``{"view1", "view2"}`` float32 [B,S,S,C] in [0, 1] (S = data.image_size,
    C = data.channels); the trainer passes steps_per_epoch (see ``datasets.num_examples``).
    Shuffling is seeded and reshuffled each epoch; augmentation is seeded by (seed, batch index).
    """
    split = split or data_cfg.train_split
    cache = bool(data_cfg.cache)
    # Without a cache, read files in a shuffled order: a shuffle buffer alone over a class-sorted
    # folder would see one class at a time.
    ds = datasets.load(data_cfg, split, shuffle_seed=None if cache else seed)
    if cache:
        ds = ds.cache()
    ds = ds.shuffle(int(data_cfg.shuffle_buffer), seed=seed, reshuffle_each_iteration=True)
    ds = ds.repeat()
    return two_view_dataset(ds, batch_size=batch_size, kind=data_cfg.augmentation,
                            image_size=int(data_cfg.image_size), crop_scale=data_cfg.crop_scale,
                            seed=seed, start_batch=start_batch, with_labels=with_labels)


def eval_dataset(data_cfg, split: str | None = None, batch_size: int = 256) -> tf.data.Dataset:
    """Finite, deterministic labelled batches ``(images float32 [B,S,S,C] in [0,1], labels int32
    [B])`` of ``split`` (default ``data.eval_split``); the last batch may be smaller."""
    split = split or data_cfg.eval_split
    ds = datasets.load(data_cfg, split)
    if data_cfg.cache:
        ds = ds.cache()
    size = int(data_cfg.image_size)
    ds = ds.batch(batch_size).map(
        lambda x, y: (augment.eval_transform(x, size), tf.cast(y, tf.int32)),
        num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)
