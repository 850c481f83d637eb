"""Fashion-MNIST (and any MNIST-layout IDX files): ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``
(``.gz`` or raw), parsed with numpy. Debian ships them: ``apt-get install dataset-fashion-mnist``.
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


def fashion_mnist(data_dir: str, split: str) -> tf.data.Dataset:
    """Fashion-MNIST ``split`` ("train": 60000, "test": 10000) from IDX files, [28,28,1] uint8."""
    images, labels = read_fashion_mnist(data_dir, split)
    return tf.data.Dataset.from_tensor_slices((images[..., None], labels))


def num_examples(data_dir: str, split: str) -> int:
    """Images in ``split``, from the IDX header alone."""
    images_file, _ = fashion_mnist_files(data_dir, split)
    with _open_idx(images_file) as f:
        header = f.read(8)
    if len(header) < 8:
        raise ValueError(f"{images_file}: truncated IDX file (no header). {_FASHION_MNIST_INSTALL}")
    return struct.unpack(">II", header)[1]


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
