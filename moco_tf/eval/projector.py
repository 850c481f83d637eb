"""TensorBoard's embedding projector: features of labelled images, with thumbnails and labels."""
from __future__ import annotations

import math
import os

import numpy as np
import tensorflow as tf


def _thumbnails(images, size: int) -> np.ndarray:
    """Images [B, H, W, C] in [0, 1] -> uint8 [B, size, size, C]."""
    if tuple(images.shape[1:3]) != (size, size):
        images = tf.image.resize(images, (size, size))
    return (np.clip(np.asarray(images), 0, 1) * 255).round().astype(np.uint8)


def _sprite(thumbs: np.ndarray) -> np.ndarray:
    """Thumbnails [N, S, S, C] tiled row-major into one square image [G*S, G*S, C]."""
    size = thumbs.shape[1]
    grid = int(math.ceil(math.sqrt(len(thumbs))))
    pad = np.zeros((grid * grid - len(thumbs), *thumbs.shape[1:]), thumbs.dtype)
    tiles = np.concatenate([thumbs, pad]).reshape(grid, grid, size, size, -1)
    return tiles.transpose(0, 2, 1, 3, 4).reshape(grid * size, grid * size, -1)


def write_embedding_projector(backbone, dataset, log_dir: str, max_examples: int = 2000,
                              thumbnail: int = 32, class_names=None) -> int:
    """Writes backbone features of (up to) `max_examples` labelled images for TensorBoard's
    embedding projector: `tensorboard --logdir <log_dir's parent>`, tab "Projector".

    Args:
      backbone: the query backbone, images [B, H, W, C] in [0, 1] -> features [B, D]; run in
        inference mode.
      dataset: yields `(images float32 [B, H, W, C] in [0, 1], labels int [B])`, e.g. the test set.
      log_dir: output folder: `embedding.ckpt-1.*` (features [N, D]), `metadata.tsv` (one label
        per line; with `class_names`, two columns: label and class name), `sprite.png`
        (thumbnails) and `projector_config.pbtxt`.
      class_names: the name of each label, shown in the projector's legend and search.
    Returns:
      the number of examples written.
    """
    from tensorboard.plugins import projector  # only needed here

    features_fn = tf.function(lambda x: tf.cast(backbone(x, training=False), tf.float32),
                              reduce_retracing=True)
    feats, labels, thumbs, count = [], [], [], 0
    size = None
    for x, y in dataset:
        take = min(max_examples - count, int(x.shape[0]))
        if take <= 0:
            break
        x = x[:take]
        feats.append(features_fn(x).numpy())
        labels.append(np.asarray(y)[:take].reshape(-1))
        size = size or min(int(x.shape[1]), thumbnail)
        thumbs.append(_thumbnails(x, size))  # small copies only: 2000 ImageNet images are 1 GB
        count += take
    if not count:
        raise ValueError("write_embedding_projector: the dataset is empty.")
    os.makedirs(log_dir, exist_ok=True)
    with open(os.path.join(log_dir, "metadata.tsv"), "w") as f:
        if class_names:  # several columns: the projector wants a header line
            f.write("label\tclass\n")
            f.writelines(f"{int(y)}\t{class_names[int(y)] if 0 <= y < len(class_names) else y}\n"
                         for y in np.concatenate(labels))
        else:
            f.writelines(f"{int(y)}\n" for y in np.concatenate(labels))
    tf.io.write_file(os.path.join(log_dir, "sprite.png"),
                     tf.io.encode_png(_sprite(np.concatenate(thumbs))))
    embedding = tf.Variable(np.concatenate(feats), trainable=False)
    # save() also writes the `checkpoint` state file, by which the projector finds the tensor.
    tf.train.Checkpoint(embedding=embedding).save(os.path.join(log_dir, "embedding.ckpt"))

    config = projector.ProjectorConfig()
    entry = config.embeddings.add()
    entry.tensor_name = "embedding/.ATTRIBUTES/VARIABLE_VALUE"
    entry.metadata_path = "metadata.tsv"
    entry.sprite.image_path = "sprite.png"
    entry.sprite.single_image_dim.extend([size, size])
    projector.visualize_embeddings(log_dir, config)
    return count
