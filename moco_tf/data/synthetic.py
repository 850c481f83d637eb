"""Deterministic synthetic images whose class is learnable: for tests and smoke runs."""
from __future__ import annotations

import numpy as np
import tensorflow as tf


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
