"""TensorFlow Datasets (``data.source = "tfds"``): prepared or preparable, checked before training.

Fixed-size image datasets (CIFAR, MNIST) come decoded and go the in-memory batched path.
Variable-size ones (ImageNet, Imagenette) come as the encoded JPEG bytes (``SkipDecoding``):
records for the per-image decoder (``records.py``), so the shuffle buffer holds ~110 KB JPEGs
instead of ~500 KB decoded images and each view is cropped from the original image.

``prepare(data_cfg)`` runs before any model is built: a prepared dataset passes; one tfds can
download is downloaded and prepared (``data.tfds_download``); one that needs files a user must
fetch (ImageNet) is prepared from ``data.tfds_manual_dir`` if given, else refused with what to do
(``python -m moco_tf.data.prepare``, as ``tfds build`` fails in the pinned environment).
"""
from __future__ import annotations

import os

import tensorflow as tf

from moco_tf.config import DataError
from moco_tf.data import image_folder

_CATALOG = "https://www.tensorflow.org/datasets/catalog"


def builder(data_cfg):
    """The tfds builder of ``data.name`` in ``data.data_dir``; a clear error for unknown names."""
    import tensorflow_datasets as tfds

    if not data_cfg.name:
        raise DataError("data.source='tfds' needs data.name, e.g. 'cifar10' or 'imagenet2012'")
    try:
        return tfds.builder(data_cfg.name, data_dir=data_cfg.data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as e:
        first_line = str(e).strip().splitlines()[0]  # the rest lists every tfds dataset
        raise DataError(f"data.name={data_cfg.name!r} is not a tfds dataset ({first_line}); "
                        f"see {_CATALOG}") from e


def _where(b) -> str:
    return os.path.dirname(os.path.dirname(str(b.data_dir)))  # <data_dir>/<name>/<version>


def prepare_command(name: str, data_dir: str, manual: bool = False) -> str:
    """The command line that prepares tfds dataset ``name`` in ``data_dir`` (``prepare.py``)."""
    return (f"python -m moco_tf.data.prepare {name}" + (" --manual_dir=DIR" if manual else "")
            + f" --data_dir={data_dir}")


def prepare(data_cfg, splits=(), *, by_hand=False) -> str:
    """Makes sure ``data.name`` is prepared (downloading it if allowed) and has ``splits``;
    returns the data_dir it is in. ``by_hand``: called by ``python -m moco_tf.data.prepare``
    (the errors name its options, not the config's).

    Raises:
      DataError: unknown name, not prepared and not preparable here, a failed download, or a
        missing split — each with the command or setting that fixes it.
    """
    import tensorflow_datasets as tfds

    b = builder(data_cfg)
    name = data_cfg.name
    if not b.is_prepared():
        manual = b.MANUAL_DOWNLOAD_INSTRUCTIONS
        manual_dir = data_cfg.get("tfds_manual_dir", "")
        if manual and not manual_dir:
            instructions = " ".join(manual.split())
            fix = (f"Then run `{prepare_command(name, _where(b), manual=True)}` with that "
                   f"folder." if by_hand else
                   f"Then set data.tfds_manual_dir to that folder (training prepares it first, "
                   f"once), or run `{prepare_command(name, _where(b), manual=True)}`; or set "
                   f"data.data_dir to where it is prepared.")
            raise DataError(f"tfds dataset '{name}' is not prepared in {_where(b)} and tfds "
                            f"cannot download it: {instructions} {fix}")
        if not manual and not data_cfg.get("tfds_download", True):
            raise DataError(
                f"tfds dataset '{name}' is not prepared in {_where(b)}. Run "
                f"`{prepare_command(name, _where(b))}` (it downloads it), or set "
                f"data.tfds_download=True to download it now, or set data.data_dir to where it "
                f"is prepared.")
        config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
        try:
            b.download_and_prepare(download_config=config)
        except Exception as e:  # noqa: BLE001  network, archive and disk errors of all kinds
            first = next((ln for ln in str(e).strip().splitlines() if ln.strip()), type(e).__name__)
            where = "--manual_dir" if by_hand else "data.tfds_manual_dir"
            raise DataError(
                f"could not prepare tfds dataset '{name}' in {_where(b)} ({type(e).__name__}: "
                f"{first[:300]}). "
                + (f"Check that {where} ({manual_dir}) holds the files tfds asks for." if manual
                   else f"Preparing it downloads it: check the internet connection, or prepare "
                   f"it on a machine that has one (`{prepare_command(name, 'DIR')}`) and set "
                   f"data.data_dir to a copy.")) from e
    available = sorted(b.info.splits.keys())
    for split in splits:
        base = split.split("[")[0]  # tfds slicing: "train[:10%]"
        if base not in available:
            raise DataError(f"tfds dataset '{name}' has no split {split!r}; it has "
                            f"{', '.join(available)} (set data.train_split / data.eval_split).")
    return _where(b)


def num_examples(data_cfg, split: str) -> int:
    """Examples in ``split`` of the prepared dataset (slices like ``train[:10%]`` included)."""
    import tensorflow_datasets as tfds

    b = builder(data_cfg)
    if not b.is_prepared():
        prepare(data_cfg, [split])
    return int(b.info.splits[split].num_examples)


def _label_feature(data_cfg):
    import tensorflow_datasets as tfds

    features = builder(data_cfg).info.features
    label = features["label"] if "label" in features.keys() else None
    return label if isinstance(label, tfds.features.ClassLabel) else None


def num_classes(data_cfg) -> int | None:
    """Classes of the dataset's ``label`` feature; None if it has no labels."""
    label = _label_feature(data_cfg)
    return None if label is None else int(label.num_classes)


def class_names(data_cfg) -> list[str] | None:
    """The names of the ``label`` feature's classes (ImageNet: wnids), or None."""
    label = _label_feature(data_cfg)
    return None if label is None else list(label.names)


def is_variable_size(data_cfg) -> bool:
    """True if the images have no fixed size (ImageNet), False for CIFAR-like datasets."""
    shape = _image_feature(builder(data_cfg)).shape
    return shape[0] is None or shape[1] is None


def _image_feature(b):
    import tensorflow_datasets as tfds

    features = b.info.features
    for key in ("image", *features.keys()):
        if key in features.keys() and isinstance(features[key], tfds.features.Image):
            return features[key]
    raise DataError(f"tfds dataset '{b.name}' has no image feature "
                    f"(features: {', '.join(features.keys())})")


def _load(data_cfg, split, *, decode, shuffle_seed=None):
    import tensorflow_datasets as tfds

    b = builder(data_cfg)
    feature = _image_feature(b)
    key = next(k for k, f in b.info.features.items() if f is feature)
    label_key = "label" if "label" in b.info.features.keys() else None
    read_config = tfds.ReadConfig(
        shuffle_seed=shuffle_seed, shuffle_reshuffle_each_iteration=True)
    ds = b.as_dataset(
        split=split, shuffle_files=shuffle_seed is not None, read_config=read_config,
        decoders=None if decode else {key: tfds.decode.SkipDecoding()})
    ds = ds.map(lambda ex: (ex[key], tf.cast(ex[label_key], tf.int32) if label_key else
                            tf.constant(-1, tf.int32)), num_parallel_calls=tf.data.AUTOTUNE)
    return ds, feature


def images(data_cfg, split, shuffle_seed=None) -> tf.data.Dataset:
    """Decoded (uint8 [H, W, C], int32 label) pairs of a fixed-size dataset, native size and
    channels (the caller converts channels)."""
    return _load(data_cfg, split, decode=True, shuffle_seed=shuffle_seed)[0]


def records(data_cfg, split) -> tf.data.Dataset:
    """``(jpeg/png bytes, label, kind)`` records of a variable-size dataset, in file order."""
    ds, _ = _load(data_cfg, split, decode=False)
    return ds.map(lambda data, label: (data, label, tf.constant(image_folder.TF_IMAGE, tf.int32)))


FILE_READERS = 16  # TFRecord files read at once (tfds' default interleave)


def train_records(data_cfg, split, seed, first_position=0, *, input_context=None):
    """The endless training order of ``split`` as ``(bytes, label, kind)`` records.

    Epoch e reads the split's files in the order drawn from (``seed``, e), interleaved, then
    shuffles them in blocks of ``data.shuffle_buffer`` records seeded by (seed, e, block): a run
    resumed at record ``first_position`` reads only its own epoch up to there (records, not
    decoded), never the epochs before it. ``input_context``: every ``num_input_pipelines``-th file
    from ``input_pipeline_id`` (each host reads its own files).
    """
    import tensorflow_datasets as tfds

    b = builder(data_cfg)
    if str(b.info.file_format.value) != "tfrecord":
        raise DataError(f"tfds dataset '{b.name}' is stored as {b.info.file_format.value}; "
                        f"training reads tfrecord files: prepare it with the default file format.")
    instructions = list(b.info.splits[split].file_instructions)
    if input_context is not None:
        count = input_context.num_input_pipelines
        instructions = instructions[input_context.input_pipeline_id::count]
        if not instructions:
            raise DataError(f"tfds dataset '{b.name}' split {split!r} has fewer files than the "
                            f"{count} input pipelines; use fewer hosts or an image folder.")
    files = tf.constant([os.fspath(i.filename) for i in instructions])
    skips = tf.constant([i.skip for i in instructions], tf.int64)
    takes = tf.constant([i.take for i in instructions], tf.int64)
    size = sum(i.take for i in instructions)
    feature = _image_feature(b)
    key = next(k for k, f in b.info.features.items() if f is feature)
    has_label = "label" in b.info.features.keys()
    decoders = {key: tfds.decode.SkipDecoding()}

    def epoch(e):
        epoch_seed = tf.random.experimental.stateless_fold_in(seed, e)
        order = tf.random.experimental.stateless_shuffle(tf.range(len(instructions)), epoch_seed)
        shards = tf.data.Dataset.from_tensor_slices(
            (tf.gather(files, order), tf.gather(skips, order), tf.gather(takes, order)))
        serialized = shards.interleave(
            lambda f, skip, take: tf.data.TFRecordDataset(f).skip(skip).take(take),
            cycle_length=min(FILE_READERS, len(instructions)), block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        # Shuffled in blocks of data.shuffle_buffer records, each by a stateless permutation:
        # Dataset.shuffle takes no seed computed in the graph, and a fixed one would reshuffle
        # by iteration count, which a resumed run does not share.
        def shuffle_block(index, block):
            order = tf.random.experimental.stateless_shuffle(
                tf.range(tf.shape(block)[0]),
                tf.random.experimental.stateless_fold_in(epoch_seed, index))
            return tf.data.Dataset.from_tensor_slices(tf.gather(block, order))

        return serialized.batch(int(data_cfg.shuffle_buffer)).enumerate().flat_map(
            shuffle_block)

    def parse(serialized):
        example = b.info.features.deserialize_example(serialized, decoders=decoders)
        label = tf.cast(example["label"], tf.int32) if has_label else tf.constant(-1, tf.int32)
        return example[key], label, tf.constant(image_folder.TF_IMAGE, tf.int32)

    first_epoch, offset = divmod(int(first_position), size)
    return (tf.data.Dataset.counter(first_epoch).flat_map(epoch).skip(offset)
            .map(parse, num_parallel_calls=tf.data.AUTOTUNE))
