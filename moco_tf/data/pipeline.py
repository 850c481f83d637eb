"""tf.data pipelines: two-view training batches and labelled evaluation batches.

In-memory sources (DESIGN §3): decode once → cache the uint8 images → shuffle → repeat → batch →
crop every view of the batch at once → photometric augmentation → prefetch.
Records (image folders, tfds ImageNet): every epoch a seeded order of the records (file paths or
JPEG bytes) → batches fixed by position → decode each image once (a JPEG only inside the box of
its two crops) and crop its two views from the whole image → photometric → prefetch.

Every random draw is a pure function of (seed, batch index, image slot), so a pipeline started
at batch ``start_batch`` gives the batches an uninterrupted one gave (resume). The photometric
stage (colour jitter, grayscale, blur, solarize) runs here (``data.augment_on = "host"``) or at
the start of ``train_step`` on the accelerator (``"device"``, ``moco_tf.models.augmenter``), with
the same seeds: the host then only decodes and crops.
"""
from __future__ import annotations

import tensorflow as tf

from moco_tf.data import augment, datasets, records as records_lib

AUTOTUNE = tf.data.AUTOTUNE


def two_view_dataset(images_ds: tf.data.Dataset, *, batch_size: int, kind: str = "moco_v2",
                     image_size: int, crop_scale=(0.2, 1.0), seed: int = 0,
                     start_batch: int = 0, photometric: bool = True) -> tf.data.Dataset:
    """Batches of two views from YOUR dataset of images; shuffle/repeat it beforehand.

    Args:
      images_ds: unbatched elements ``image`` or ``(image, label, ...)`` or ``{"image": ...}``,
        image uint8 [H,W,C] (or float in [0, 1]) of one fixed size, C in {1, 3}.
      batch_size: global batch size; the last partial batch is dropped (static shapes).
      kind, image_size, crop_scale: see ``augment.two_view_augment``.
      seed: batch ``i`` is augmented with seed fold_in([seed, 0], i), so a pipeline rebuilt with
        the same seed (and the same input order) reproduces its batches.
      start_batch: skip this many batches first (cheap: before augmentation) — to resume.
      photometric: False leaves colour jitter, grayscale, blur and solarize to the model
        (``augment_on="device"``): the views are the crops only.
    Returns:
      dataset of ``{"view1": float32 [B,S,S,C], "view2": float32 [B,S,S,C]}``.
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
        seed_i = augment.batch_seed(base_seed, index)
        views = augment.crop_views(images, kind, image_size=image_size,
                                   crop_scale=tuple(crop_scale), seed=seed_i)
        if photometric:
            views = augment.photometric(views, kind, seed_i)
        return {"view1": views[0], "view2": views[1]}

    ds = images_ds.batch(batch_size, drop_remainder=True).enumerate()
    if start_batch:
        ds = ds.skip(start_batch)
    return ds.map(make_views, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


def train_dataset(data_cfg, batch_size: int, seed: int = 0, split: str | None = None, *,
                  start_batch: int = 0,
                  input_context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    """Infinite two-view training batches from ``data_cfg`` (the config's ``data`` section).

    Yields ``{"view1", "view2"}`` [B,S,S,C] (S = data.image_size, C = data.channels): float32 in
    [0, 1], or — with ``data.augment_on="device"`` — the crops only (uint8 from records, float32
    from in-memory sources) for the model's augmenter. Shuffling is seeded and reshuffled each
    epoch; augmentation is seeded by (seed, batch index).

    With ``data.service_address`` the pipeline runs on the tf.data service workers (see
    ``_through_service``).

    Args:
      batch_size: the global batch; with ``input_context`` (``distribute_datasets_from_function``)
        this pipeline yields per-replica batches and reads only its share of the files.
      start_batch: the first batch (resume): records are skipped before they are decoded.
    """
    split = split or data_cfg.train_split
    if data_cfg.get("service_address", ""):
        return _through_service(data_cfg, batch_size, seed, split)
    return _train_dataset(data_cfg, batch_size, seed, split, start_batch, input_context)


def _train_dataset(data_cfg, batch_size, seed, split, start_batch, input_context, salt=None):
    """``train_dataset``. ``salt`` (a tensor; tf.data service workers) replaces the pipeline id
    in the seeds and builds a pipeline without Python functions, which the workers cannot run."""
    python = salt is None
    photometric = data_cfg.get("augment_on", "host") == "host"
    if not datasets.uses_records(data_cfg):
        cache = bool(data_cfg.cache)
        # Without a cache, read files in a shuffled order: a shuffle buffer alone over a
        # class-sorted source would see one class at a time.
        ds = datasets.images(data_cfg, split, shuffle_seed=None if cache else seed)
        if cache:
            ds = ds.cache()
        ds = ds.shuffle(int(data_cfg.shuffle_buffer), seed=seed, reshuffle_each_iteration=True)
        ds = ds.repeat()
        return two_view_dataset(ds, batch_size=batch_size, kind=data_cfg.augmentation,
                                image_size=int(data_cfg.image_size),
                                crop_scale=data_cfg.crop_scale, seed=seed,
                                start_batch=start_batch,
                                photometric=photometric)

    # Records consumed per step by this pipeline, and the batches it yields.
    per_step, pipeline_id = batch_size, 0
    if input_context is not None:
        per_step = batch_size // input_context.num_input_pipelines
        batch_size = input_context.get_per_replica_batch_size(batch_size)
        pipeline_id = input_context.input_pipeline_id
    r = datasets.records(data_cfg, split, input_context=input_context, python=python)
    base_seed = tf.cast(tf.stack([seed, pipeline_id if salt is None else salt]), tf.int64)
    first = start_batch * per_step
    recipes = augment.recipes_of(data_cfg.augmentation)
    ds = records_lib.train_views(
        r.decoder, r.epochs(base_seed, first), image_size=int(data_cfg.image_size),
        crop_scale=tuple(data_cfg.crop_scale),
        flip_p=tuple(recipe.flip_p for recipe in recipes), seed=base_seed,
        batch_size=batch_size, first_position=first,
        antialias=bool(data_cfg.get("antialias", False)))

    def batch_views(index, batch):
        views, _ = batch
        if photometric:
            views = augment.photometric(views, recipes, augment.batch_seed(base_seed, index),
                                        fast=True)
        return {"view1": views[0], "view2": views[1]}

    ds = ds.enumerate(first // batch_size)
    return ds.map(batch_views, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


def _through_service(data_cfg, batch_size, seed, split):
    """The training pipeline run by the tf.data service at ``data.service_address``.

    Each worker runs the whole pipeline (``ShardingPolicy.OFF``): it draws its own permutation of
    the image folder every epoch and the trainer takes batches from all workers. A worker's
    randomness is salted with the time it starts, or every worker would produce the same
    batches; so the data order is not replayed on resume (the training state is). Workers run
    graph ops only: no PIL files, and a broken image is dropped unnamed.
    """
    @tf.autograph.experimental.do_not_convert  # plain Python that builds a pipeline
    def build(salt):
        return _train_dataset(data_cfg, batch_size, seed, split, 0, None, salt)

    salted = tf.data.Dataset.from_tensors(0).map(
        lambda _: tf.cast(tf.timestamp() * 1e6, tf.int64)).flat_map(build)
    return salted.apply(tf.data.experimental.service.distribute(
        processing_mode=tf.data.experimental.service.ShardingPolicy.OFF,
        service=data_cfg.service_address, job_name=f"moco_tf_train_{seed}_{batch_size}"))


def eval_dataset(data_cfg, split: str | None = None, batch_size: int = 256) -> tf.data.Dataset:
    """Finite, deterministic labelled batches ``(images float32 [B,S,S,C] in [0,1], labels int32
    [B])`` of ``split`` (default ``data.eval_split``); the last batch may be smaller."""
    split = split or data_cfg.eval_split
    ds = datasets.images(data_cfg, split)
    if data_cfg.cache and not datasets.uses_records(data_cfg):
        ds = ds.cache()
    size = int(data_cfg.image_size)
    ds = ds.batch(batch_size).map(
        lambda x, y: (augment.eval_transform(x, size), tf.cast(y, tf.int32)),
        num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)
