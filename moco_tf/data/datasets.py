"""Data sources → unbatched ``tf.data.Dataset`` of ``(image uint8 [H, W, C], label int32 [])``.

Every source returns images of ONE fixed size per dataset (so they can be batched and augmented
after ``batch()``) with ``data.channels`` channels:

* ``fashion_mnist`` — the IDX ``.gz`` files parsed with numpy, 28x28x1.
* ``tfds``          — ``tfds.load(name, as_supervised=True)``; fixed-size datasets (CIFAR, MNIST)
  keep their native size, variable-size ones (ImageNet) are resized like ``image_folder``.
* ``image_folder``  — class sub-folders (label = index of the sorted sub-folder name) or a flat
  folder (label -1); each image is resized to ``decode_size(image_size)`` square, see below.
* ``synthetic``     — deterministic images whose class is learnable, for tests and smoke runs.

Resizing rule for variable-size images: the shorter side is resized to
``decode_size(image_size)`` and the centre square is kept. ``decode_size`` is
``round(image_size / 0.875)`` above 64 px (ImageNet style: 224 → 256, so the eval transform's
centre crop of 224 is the standard Resize(256) + CenterCrop(224)) and ``image_size`` itself for
small images (CIFAR/Fashion-MNIST style, where the object fills the frame and eval uses the
whole image). Training random-resized crops sample from this stored square.
"""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import tensorflow as tf

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_MNIST_INSTALL = (
    "Install it with `apt-get install dataset-fashion-mnist` (files go to "
    f"{DEFAULT_FASHION_MNIST_DIR}) or set data.data_dir to a folder holding "
    "{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz"
)
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")


def decode_size(image_size: int) -> int:
    """Side length at which variable-size images are stored (see module docstring)."""
    return image_size if image_size <= 64 else int(round(image_size / 0.875))


# ----------------------------------------------------------------------------- dispatch


def load(data_cfg, split: str, shuffle_seed: int | None = None) -> tf.data.Dataset:
    """The ``split`` of the source named by ``data_cfg.source`` as (uint8 [H,W,C], int32) pairs.

    ``shuffle_seed``: if given, file-backed sources (image_folder, tfds) read their files in a
    seeded order reshuffled each epoch — needed when the decoded data is too big to cache and a
    shuffle buffer alone would see one class at a time. In-memory sources ignore it.
    """
    source = data_cfg.source
    channels = int(data_cfg.channels)
    if channels not in (1, 3):
        raise ValueError(f"data.channels must be 1 or 3, got {channels}")
    if source == "fashion_mnist":
        ds = fashion_mnist(data_cfg.data_dir, split)
    elif source == "synthetic":
        return synthetic(
            _synthetic_count(data_cfg, split), data_cfg.image_size, channels,
            data_cfg.num_classes, seed=_synthetic_seed(data_cfg, split))
    elif source == "tfds":
        ds = tfds_source(data_cfg.name, split, data_cfg.data_dir, shuffle_seed=shuffle_seed)
        return ds.map(lambda x, y: (_fit_tfds_image(x, data_cfg.image_size, channels), y),
                      num_parallel_calls=tf.data.AUTOTUNE)
    elif source == "image_folder":
        return image_folder(_folder_for_split(data_cfg, split), image_size=data_cfg.image_size,
                            channels=channels, shuffle_seed=shuffle_seed)
    else:
        raise ValueError(f"data.source must be one of fashion_mnist, tfds, image_folder, "
                         f"synthetic; got {source!r}")
    return ds.map(lambda x, y: (convert_channels(x, channels), y))


def num_examples(data_cfg, split: str) -> int | None:
    """Number of examples in ``split``, or None when it can't be known without reading the data.

    The trainer uses it for steps per epoch. Cheap: reads IDX headers, lists folders, or asks
    tfds' dataset info.
    """
    source = data_cfg.source
    if source == "fashion_mnist":
        images_file = _resolve_idx(_fashion_mnist_paths(data_cfg.data_dir, split)[0])
        with _open_idx(images_file) as f:
            header = f.read(8)
        if len(header) < 8:
            raise ValueError(f"{images_file}: truncated IDX file (no header). "
                             f"{_FASHION_MNIST_INSTALL}")
        return struct.unpack(">II", header)[1]
    if source == "synthetic":
        return _synthetic_count(data_cfg, split)
    if source == "image_folder":
        return len(_list_image_folder(_folder_for_split(data_cfg, split))[0])
    if source == "tfds":
        import tensorflow_datasets as tfds
        try:
            builder = tfds.builder(data_cfg.name, data_dir=data_cfg.data_dir or None)
            return int(builder.info.splits[split].num_examples) or None
        except Exception:  # not prepared / unknown split: the caller must give steps per epoch
            return None
    raise ValueError(f"unknown data.source {source!r}")


# ----------------------------------------------------------------------------- fashion_mnist


def fashion_mnist(data_dir: str, split: str) -> tf.data.Dataset:
    """Fashion-MNIST ``split`` ("train": 60000, "test": 10000) from IDX files, [28,28,1] uint8."""
    images, labels = read_fashion_mnist(data_dir, split)
    return tf.data.Dataset.from_tensor_slices((images[..., None], labels))


def read_fashion_mnist(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Numpy arrays (uint8 [N,28,28], int32 [N]) of a Fashion-MNIST/MNIST-layout IDX split."""
    images_file, labels_file = _fashion_mnist_paths(data_dir, split)
    images = read_idx(images_file, _IDX_IMAGES_MAGIC)
    labels = read_idx(labels_file, _IDX_LABELS_MAGIC).astype(np.int32)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images_file} has {images.shape[0]} images but {labels_file} has "
                         f"{labels.shape[0]} labels")
    return images, labels


def read_idx(path: str, expected_magic: int) -> np.ndarray:
    """Parse one IDX file (gzip or raw) of unsigned bytes; errors name the file."""
    path = _resolve_idx(path)
    with _open_idx(path) as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: truncated IDX file (no header). {_FASHION_MNIST_INSTALL}")
    magic = struct.unpack(">I", data[:4])[0]
    if magic != expected_magic:
        raise ValueError(f"{path}: not an IDX file of the expected kind (magic number {magic}, "
                         f"expected {expected_magic}). {_FASHION_MNIST_INSTALL}")
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"{path}: truncated IDX header. {_FASHION_MNIST_INSTALL}")
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    size = int(np.prod(shape))
    if len(data) - header_len != size:
        raise ValueError(f"{path}: expected {size} data bytes for shape {shape}, found "
                         f"{len(data) - header_len} (truncated or corrupt). "
                         f"{_FASHION_MNIST_INSTALL}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape)


def _fashion_mnist_paths(data_dir: str, split: str) -> tuple[str, str]:
    data_dir = data_dir or DEFAULT_FASHION_MNIST_DIR
    if split not in _FASHION_MNIST_FILES:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"Fashion-MNIST folder {data_dir} does not exist. "
                                f"{_FASHION_MNIST_INSTALL}")
    return tuple(os.path.join(data_dir, name) for name in _FASHION_MNIST_FILES[split])


def _resolve_idx(path: str) -> str:
    """``path.gz`` if it exists, else the raw ``path``; clear error if neither does."""
    base = path[:-3] if path.endswith(".gz") else path
    for candidate in (base + ".gz", base):
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"{base}.gz not found. {_FASHION_MNIST_INSTALL}")


def _open_idx(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


# ----------------------------------------------------------------------------- tfds


def tfds_source(name: str, split: str, data_dir: str = "",
                shuffle_seed: int | None = None) -> tf.data.Dataset:
    """``tfds.load(name, split=split, as_supervised=True)`` with labels cast to int32.

    Images keep their native size and channels here (``load`` fits them). ``data_dir=""`` uses
    tfds' default (~/tensorflow_datasets). Downloads if the dataset isn't prepared there, which
    needs internet; ImageNet needs its manual download (see the tfds catalogue).
    """
    import tensorflow_datasets as tfds

    if not name:
        raise ValueError("data.source='tfds' needs data.name, e.g. 'cifar10' or 'imagenet2012'")
    read_config = None
    if shuffle_seed is not None:
        read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed,
                                      shuffle_reshuffle_each_iteration=True)
    try:
        ds = tfds.load(name, split=split, as_supervised=True, data_dir=data_dir or None,
                       shuffle_files=shuffle_seed is not None, read_config=read_config)
    except tfds.core.registered.DatasetNotFoundError as e:
        first_line = str(e).strip().splitlines()[0]  # the rest lists every tfds dataset
        raise ValueError(f"data.name={name!r} is not a tfds dataset ({first_line}); see "
                         "https://www.tensorflow.org/datasets/catalog") from e
    return ds.map(lambda x, y: (x, tf.cast(y, tf.int32)))


def _fit_tfds_image(image, image_size, channels):
    """Channels to ``channels``; variable-size images to a ``decode_size`` square."""
    image = convert_channels(image, channels)
    static = image.shape
    if static[0] is not None and static[0] == static[1]:
        return image  # fixed-size square dataset: keep native size, augment resizes
    return resize_center_square(image, decode_size(image_size))


# ----------------------------------------------------------------------------- image_folder


def image_folder(path: str, *, image_size: int, channels: int,
                 shuffle_seed: int | None = None) -> tf.data.Dataset:
    """Images under ``path`` → (uint8 [D,D,channels], int32), D = ``decode_size(image_size)``.

    Layout: ``path/<class>/*.jpg`` (label = index of the class in the sorted sub-folder names)
    or a flat ``path/*.jpg`` (label -1). Nested files inside a class folder belong to it.
    Grayscale, gray+alpha, RGB and RGBA files are converted to ``channels`` (alpha dropped).
    A file that is empty or not an image raises an error naming it; a truncated/corrupt image
    with a valid header raises TensorFlow's decode error.
    """
    files, labels, _ = _list_image_folder(path)
    order = tf.data.Dataset.range(len(files))
    if shuffle_seed is not None:
        order = order.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=True)
    files_t = tf.constant(files)
    labels_t = tf.constant(labels, tf.int32)
    side = decode_size(image_size)

    def decode(i):
        return (_decode_file(files_t[i], channels, side), labels_t[i])

    return order.map(decode, num_parallel_calls=tf.data.AUTOTUNE)


def image_folder_classes(path: str) -> list[str]:
    """Class names (sorted sub-folder names) of an image folder; [] for a flat folder."""
    return _list_image_folder(path)[2]


def _list_image_folder(path: str) -> tuple[list[str], list[int], list[str]]:
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"image folder {path!r} does not exist")
    entries = sorted(os.listdir(path))
    classes = [e for e in entries if os.path.isdir(os.path.join(path, e))]
    files, labels = [], []
    if classes:
        for label, name in enumerate(classes):
            for root, dirs, names in os.walk(os.path.join(path, name)):
                dirs.sort()
                for f in sorted(names):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        files.append(os.path.join(root, f))
                        labels.append(label)
    else:
        files = [os.path.join(path, f) for f in entries if f.lower().endswith(IMAGE_EXTENSIONS)]
        labels = [-1] * len(files)
    if not files:
        raise ValueError(f"image folder {path} contains no images "
                         f"(looked for {', '.join(IMAGE_EXTENSIONS)} in it and its sub-folders)")
    return files, labels, classes


def _decode_file(filename, channels, side):
    data = tf.io.read_file(filename)
    # decode_image's own error doesn't say which file: check the format first so an empty or
    # non-image file (e.g. an HTML error page saved as .jpg) fails with its name.
    head = tf.strings.substr(data, 0, 4)
    known = tf.reduce_any(tf.stack([
        tf.strings.substr(head, 0, 3) == b"\xff\xd8\xff",  # JPEG
        head == b"\x89PNG",
        tf.strings.substr(head, 0, 3) == b"GIF",
        tf.strings.substr(head, 0, 2) == b"BM",
        head == b"RIFF",  # WebP
    ]))
    check = tf.debugging.Assert(known, ["not a decodable image (empty or unknown format):",
                                        filename])
    with tf.control_dependencies([check]):
        image = tf.io.decode_image(data, expand_animations=False)
    image = convert_channels(image, channels)
    return resize_center_square(image, side)


# ----------------------------------------------------------------------------- image helpers


def convert_channels(image, channels: int):
    """uint8 [H,W,c] with c in {1,2,3,4} → [H,W,channels]: alpha dropped, gray ↔ RGB."""
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


def resize_center_square(image, side: int):
    """Resize so the shorter side is ``side`` (antialiased), keep the centre ``side`` square."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    scale = tf.cast(side, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
    new_h = tf.maximum(side, tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32))
    new_w = tf.maximum(side, tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32))
    resized = tf.image.resize(image, [new_h, new_w], antialias=True)
    top, left = (new_h - side) // 2, (new_w - side) // 2
    out = resized[top:top + side, left:left + side]
    out = tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)
    return tf.ensure_shape(out, [side, side, image.shape[-1]])


# ----------------------------------------------------------------------------- synthetic


def synthetic(num_examples: int, image_size: int, channels: int, num_classes: int,
              seed: int = 0) -> tf.data.Dataset:
    """Deterministic learnable images: class k = a grating at angle k·90°/(classes-1) with a
    class intensity/colour, plus noise. Orientation survives crops and flips keep classes apart
    (a mirrored angle θ → 180°-θ is outside [0°, 90°)). uint8 [S,S,C], labels int32."""
    images, labels = make_synthetic(num_examples, image_size, channels, num_classes, seed)
    return tf.data.Dataset.from_tensor_slices((images, labels))


def make_synthetic(num_examples, image_size, channels, num_classes, seed=0):
    """Numpy version of :func:`synthetic`: (uint8 [N,S,S,C], int32 [N])."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(num_examples) % num_classes).astype(np.int32)
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) / image_size
    angle = labels * (0.5 * np.pi / max(num_classes, 2)) + rng.uniform(-0.05, 0.05, num_examples)
    phase = rng.uniform(0, 2 * np.pi, num_examples)
    wave = np.sin(2 * np.pi * 3 * (np.cos(angle)[:, None, None] * xx
                                   + np.sin(angle)[:, None, None] * yy) + phase[:, None, None])
    level = 0.3 + 0.4 * labels / max(num_classes - 1, 1)
    # A smooth per-image blob field: instance identity that survives crops and colour jitter, so
    # instance discrimination (what MoCo learns) has something to find beyond pixel noise.
    coarse = rng.uniform(-1, 1, (num_examples, 4, 4)).astype(np.float32)
    field = tf.image.resize(coarse[..., None], (image_size, image_size), "bicubic").numpy()[..., 0]
    image = level[:, None, None] + 0.15 * wave + 0.2 * field
    if channels == 3:
        hue = 2 * np.pi * labels / num_classes
        tint = np.stack([np.cos(hue + k * 2 * np.pi / 3) for k in range(3)], -1)
        image = image[..., None] + 0.15 * tint[:, None, None, :]
    else:
        image = image[..., None]
    image = image + rng.normal(0, 0.05, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), labels


def _synthetic_count(data_cfg, split):
    n = int(data_cfg.synthetic_examples)
    return n if split == data_cfg.train_split else max(n // 4, int(data_cfg.num_classes))


def _synthetic_seed(data_cfg, split):
    return 0 if split == data_cfg.train_split else 1


def _folder_for_split(data_cfg, split):
    if split == data_cfg.train_split:
        return data_cfg.data_dir
    eval_dir = data_cfg.get("eval_dir", "")
    if not eval_dir:
        raise ValueError(f"image_folder split {split!r}: set data.eval_dir to a labelled folder "
                         f"(class sub-folders) for evaluation; data.data_dir is the train folder")
    return eval_dir
