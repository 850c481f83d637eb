"""Data sources → unbatched ``tf.data.Dataset`` of ``(image uint8 [H, W, C], label int32 [])``.

Every source returns images of ONE fixed size per dataset (so they can be batched and augmented
after ``batch()``) with ``data.channels`` channels:

* ``fashion_mnist`` — the IDX ``.gz`` files parsed with numpy, 28x28x1.
* ``tfds``          — ``tfds.load(name, as_supervised=True)``; fixed-size datasets (CIFAR, MNIST)
  keep their native size, variable-size ones (ImageNet) are resized like ``image_folder``.
* ``image_folder``  — class sub-folders (label = index of the sorted sub-folder name) or a flat
  folder (label -1); each image is resized to ``decode_size(image_size)`` square, see below.
  Files that are not readable images are skipped and counted, or raise (``data.on_bad_image``).
* ``synthetic``     — deterministic images whose class is learnable, for tests and smoke runs.

Resizing rule for variable-size images: the shorter side is resized to
``decode_size(image_size)`` and the centre square is kept. ``decode_size`` is
``round(image_size / 0.875)`` above 64 px (ImageNet style: 224 → 256, so the eval transform's
centre crop of 224 is the standard Resize(256) + CenterCrop(224)) and ``image_size`` itself for
small images (CIFAR/Fashion-MNIST style, where the object fills the frame and eval uses the
whole image). Training random-resized crops sample from this stored square.
"""
from __future__ import annotations

import concurrent.futures
import gzip
import os
import re
import struct
import threading

import numpy as np
import tensorflow as tf
from absl import logging

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

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")


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
                            channels=channels, shuffle_seed=shuffle_seed,
                            on_bad_image=data_cfg.get("on_bad_image", "skip"))
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
        images_file, _ = fashion_mnist_files(data_cfg.data_dir, split)
        with _open_idx(images_file) as f:
            header = f.read(8)
        if len(header) < 8:
            raise ValueError(f"{images_file}: truncated IDX file (no header). "
                             f"{_FASHION_MNIST_INSTALL}")
        return struct.unpack(">II", header)[1]
    if source == "synthetic":
        return _synthetic_count(data_cfg, split)
    if source == "image_folder":
        folder = _folder_for_split(data_cfg, split)
        return len(_list_image_folder(folder, data_cfg.get("on_bad_image", "skip"))[0])
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
        raise FileNotFoundError(f"the Fashion-MNIST folder {data_dir} does not exist. "
                                f"{_FASHION_MNIST_INSTALL}")
    return tuple(os.path.join(data_dir, name) for name in _FASHION_MNIST_FILES[split])


def fashion_mnist_files(data_dir: str, split: str) -> tuple[str, str]:
    """The (images, labels) IDX files of ``split`` as they exist on disk (``.gz`` or raw).

    Raises FileNotFoundError naming the missing folder or file, ValueError for an unknown split.
    """
    return tuple(_resolve_idx(path) for path in _fashion_mnist_paths(data_dir, split))


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
#
# Bad files are found in two places, so that one corrupt JPEG never kills a long run:
#  * when listing (before any model is built): a cheap sniff of each file's first bytes catches
#    empty files, files that are no image at all (an HTML error page saved as .jpg) and unreadable
#    ones — the usual debris of a failed download — with a count up front, and with
#    `on_bad_image="error"` a clear error before training starts;
#  * when decoding: a truncated or corrupt image (valid header, broken data) fails only when its
#    pixels are decoded. Decoding uses PIL inside `tf.numpy_function`, in a try/except per file,
#    so a bad file is dropped with its name logged (or raises an error naming it) instead of
#    failing the whole tf.data pipeline. `tf.io.decode_image` cannot be caught per file inside
#    tf.data (only `ignore_errors()`, which neither counts nor names what it drops), and it does
#    not read TIFF; PIL reads every common mode (1, L, P, LA, RGBA, CMYK, 16-bit, float).
#    PIL's JPEG draft mode decodes large JPEGs at 1/2-1/8 scale, which made it as fast as
#    tf.io.decode_image here (500x375 JPEGs → 82 px: 444 vs 211 images/s; → 256 px: 117 vs 113).

BAD_IMAGE_POLICIES = ("skip", "error")
_NAMES_SHOWN = 5  # bad files named in a log line or error; the rest are counted
_MAGIC = (  # first bytes of the formats PIL decodes here
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
)
# Bad files per image folder found so far in this process: {folder: {file: reason}}.
_BAD_FILES: dict[str, dict[str, str]] = {}
_BAD_FILES_LOCK = threading.Lock()
_SNIFF_CACHE: dict[tuple, str | None] = {}  # (file, size, mtime) -> reason or None


class DataError(ValueError):
    """A data source that cannot be used as it is; the message names the path and why."""


def data_error_in(message: str) -> str | None:
    """The message of a `DataError` raised inside a tf.data pipeline (TF wraps it in an
    InvalidArgumentError with a Python traceback), or None if there is none."""
    match = re.search(r"DataError: (.+)", message)
    return match.group(1).strip() if match else None


def image_folder(path: str, *, image_size: int, channels: int,
                 shuffle_seed: int | None = None, on_bad_image: str = "skip") -> tf.data.Dataset:
    """Images under ``path`` → (uint8 [D,D,channels], int32), D = ``decode_size(image_size)``.

    Layout: ``path/<class>/*.jpg`` (label = index of the class in the sorted sub-folder names)
    or a flat ``path/*.jpg`` (label -1). Nested files inside a class folder belong to it; files
    without an image extension (``IMAGE_EXTENSIONS``) are ignored.

    Every mode PIL reads is converted to ``channels``: gray, palette, gray+alpha, RGB, RGBA
    (alpha dropped, not blended), CMYK, 16-bit (scaled by 255/65535) and float images. Images
    smaller than D are upsampled. Pixels are uint8, so never NaN.

    Args:
      on_bad_image: what to do with a file that is not a readable image (empty, not an image,
        truncated, corrupt): "skip" drops it, counts it and logs the first few names (see
        ``skipped_files``); "error" raises ``DataError`` naming it — at listing time for files
        that are no image at all, else when the pipeline decodes it.
    Raises:
      FileNotFoundError: ``path`` is not a folder.
      DataError: no usable image in ``path`` (naming it), or a bad file with "error".
    """
    files, labels, _ = _list_image_folder(path, on_bad_image)
    order = tf.data.Dataset.range(len(files))
    if shuffle_seed is not None:
        order = order.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=True)
    files_t = tf.constant(files)
    labels_t = tf.constant(labels, tf.int32)
    side = decode_size(image_size)
    decoder = _Decoder(path, side, channels, on_bad_image)

    def decode(i):
        image, ok = tf.numpy_function(decoder, [files_t[i]], [tf.uint8, tf.bool])
        return tf.ensure_shape(image, [side, side, channels]), labels_t[i], ok

    ds = order.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.filter(lambda image, label, ok: ok).map(lambda x, y, _ok: (x, y))


def image_folder_classes(path: str) -> list[str]:
    """Class names (sorted sub-folder names) of an image folder; [] for a flat folder."""
    return _list_image_folder(path)[2]


def skipped_files(path: str) -> dict[str, str]:
    """``{file: reason}`` of the files of image folder ``path`` skipped so far in this process
    (at listing, and by the pipelines built on it as far as they have decoded)."""
    with _BAD_FILES_LOCK:
        return dict(_BAD_FILES.get(os.path.abspath(path), {}))


def _record_bad(folder: str, bad: dict[str, str]) -> dict[str, str]:
    """Adds ``bad`` to the folder's record; returns the files not recorded before."""
    with _BAD_FILES_LOCK:
        known = _BAD_FILES.setdefault(os.path.abspath(folder), {})
        new = {f: r for f, r in bad.items() if f not in known}
        known.update(new)
    return new


def _describe(bad: dict[str, str]) -> str:
    shown = "; ".join(f"{f} ({r})" for f, r in list(bad.items())[:_NAMES_SHOWN])
    more = len(bad) - _NAMES_SHOWN
    return shown + (f"; and {more} more" if more > 0 else "")


def _list_image_folder(path: str, on_bad_image: str = "skip"
                       ) -> tuple[list[str], list[int], list[str]]:
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"data.on_bad_image must be one of {BAD_IMAGE_POLICIES}, "
                         f"got {on_bad_image!r}")
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"image folder {path!r} does not exist")
    entries = sorted(os.listdir(path))
    classes = [e for e in entries if os.path.isdir(os.path.join(path, e))]
    candidates, labels, others = [], [], 0
    walk = [(label, os.path.join(path, name)) for label, name in enumerate(classes)] or [(-1, path)]
    for label, folder in walk:
        for root, dirs, names in os.walk(folder):
            dirs.sort()
            if label == -1:
                dirs.clear()  # a flat folder: its files only
            for f in sorted(names):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    candidates.append(os.path.join(root, f))
                    labels.append(label)
                else:
                    others += 1
    if not candidates:
        raise DataError(f"image folder {path} contains no images (looked for "
                        f"{', '.join(IMAGE_EXTENSIONS)} in it and its sub-folders; found "
                        f"{others} other files)")
    reasons = _sniff_all(candidates)
    bad = {f: r for f, r in zip(candidates, reasons) if r is not None}
    files = [f for f, r in zip(candidates, reasons) if r is None]
    labels = [y for y, r in zip(labels, reasons) if r is None]
    if bad and on_bad_image == "error":
        raise DataError(f"image folder {path}: {len(bad)} of {len(candidates)} files are not "
                        f"readable images: {_describe(bad)}. Remove them, or set "
                        f"data.on_bad_image=skip to leave them out.")
    if not files:
        raise DataError(f"image folder {path} contains no readable images: all "
                        f"{len(candidates)} image files are bad: {_describe(bad)}")
    new = _record_bad(path, bad)
    if new:
        logging.warning("Skipping %d of %d files in image folder %s that are not readable "
                        "images: %s", len(bad), len(candidates), path, _describe(new))
    return files, labels, classes


def _sniff_all(files: list[str]) -> list[str | None]:
    """``_sniff`` of every file; threads overlap the reads on slow (network) disks."""
    if len(files) < 256:
        return [_sniff(f) for f in files]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return list(pool.map(_sniff, files, chunksize=64))


def _sniff(filename: str) -> str | None:
    """None if ``filename`` starts like an image PIL decodes, else why not (cached per process
    by name, size and modification time)."""
    try:
        stat = os.stat(filename)
        key = (filename, stat.st_size, stat.st_mtime_ns)
        if key in _SNIFF_CACHE:
            return _SNIFF_CACHE[key]
        with open(filename, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return f"unreadable: {e.strerror}"
    if not head:
        reason = "empty file"
    elif any(head.startswith(magic) for magic, _ in _MAGIC) or (
            head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        reason = None
    else:
        reason = f"not an image: starts with {head[:8]!r}"
    _SNIFF_CACHE[key] = reason
    return reason


class _Decoder:
    """``filename → (uint8 [side, side, channels], ok)`` with PIL, for ``tf.numpy_function``.

    A file that fails to decode gives ``ok=False`` (and zeros) with "skip": it is recorded and
    the first few are logged by name; with "error" it raises ``DataError`` naming it (tf.data
    turns it into an ``InvalidArgumentError`` carrying the message).
    """

    def __init__(self, folder, side, channels, on_bad_image):
        self.folder, self.side, self.channels = folder, int(side), int(channels)
        self.on_bad_image = on_bad_image

    def __call__(self, filename):
        filename = os.fsdecode(filename)
        try:
            return decode_image_file(filename, self.side, self.channels), np.bool_(True)
        except Exception as e:  # noqa: BLE001  PIL raises many types for a broken file
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if self.on_bad_image == "error":
                raise DataError(f"{filename}: cannot decode the image ({reason}). Remove it, or "
                                f"set data.on_bad_image=skip to leave it out.") from e
            if _record_bad(self.folder, {filename: reason}):
                count = len(skipped_files(self.folder))
                if count <= _NAMES_SHOWN or count & (count - 1) == 0:  # first few, then 2^k
                    logging.warning("Skipping %s: cannot decode the image (%s); %d files of %s "
                                    "skipped so far.", filename, reason, count, self.folder)
            return np.zeros((self.side, self.side, self.channels), np.uint8), np.bool_(False)


def decode_image_file(filename: str, side: int, channels: int) -> np.ndarray:
    """One image file → uint8 [side, side, channels]: the centre square, resized (antialiased).

    Raises whatever PIL raises for a file it cannot decode (truncated, corrupt, unknown format).
    """
    from PIL import Image  # only image folders need it

    with Image.open(filename) as image:
        # JPEG: let libjpeg decode at 1/2, 1/4 or 1/8 scale when the image is that much larger
        # than needed (a no-op for other formats); both sides stay >= side.
        image.draft("RGB" if channels == 3 else "L", (side, side))
        image.load()  # decodes: raises on truncated or corrupt data
        image = _to_gray_or_rgb(image, channels)
    w, h = image.size
    s = min(w, h)
    box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
    image = image.resize((side, side), Image.BILINEAR, box=box)  # PIL antialiases downscaling
    return np.asarray(image, np.uint8).reshape(side, side, channels)


def _to_gray_or_rgb(image, channels):
    """A PIL image of any mode → mode "L" (channels 1) or "RGB" (channels 3)."""
    from PIL import Image

    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # 16/32-bit and float pixels: PIL's own convert("L") clips them at 255; scale instead.
        pixels = np.nan_to_num(np.asarray(image, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if image.mode == "F" and pixels.max(initial=0) <= 1.0:
            pixels = pixels * 255.0  # float images in [0, 1]
        elif image.mode != "F" and (image.mode.startswith("I;16") or pixels.max(initial=0) > 255):
            pixels = pixels / 257.0  # 16-bit: 65535 -> 255
        image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "L")
    if channels == 1 and image.mode in ("1", "L", "LA", "P", "PA"):
        return image.convert("L")  # straight to gray: exact for gray sources (alpha dropped)
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # alpha dropped, CMYK inverted
    return rgb if channels == 3 else rgb.convert("L")


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
        raise DataError(f"image_folder split {split!r}: set data.eval_dir to a labelled folder "
                         f"(class sub-folders) for evaluation; data.data_dir is the train folder")
    return eval_dir
