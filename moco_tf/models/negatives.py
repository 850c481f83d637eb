"""Where the negative keys come from, and InfoNCE over them.

| kind         | negatives of query i                                   | recipe            |
|--------------|--------------------------------------------------------|-------------------|
| `queue`      | the K keys of earlier batches (a ring buffer)           | MoCo v1, v2       |
| `batch`      | the other view's keys of the rest of the global batch  | MoCo v3           |
| `both_views` | those and the own view's keys, except its own (2N - 2) | SimCLR (NT-Xent)  |

The queue is a non-trainable variable [K, dim] (L2-normalised random start) and an int pointer.
Logits use the queue as it was *before* this batch; `enqueue` then writes the keys of the whole
global batch (gathered from every replica, so all replicas hold the identical queue).
"""

import keras
import tensorflow as tf

from moco_tf import distribute, losses

KINDS = ("queue", "batch", "both_views")


def _normalized_queue(shape, dtype=None):
    return tf.math.l2_normalize(tf.random.normal(shape, dtype=dtype or "float32"), axis=1)


class Negatives(keras.layers.Layer):
    """The negatives part of the step: logits, InfoNCE, and the queue when there is one.

    Args:
      kind: see the module docstring.
      dim: key dimension.
      queue_size: K (kind "queue" only).
      temperature: T.

    Attributes:
      queue: [K, dim] float32 and queue_ptr: int32 scalar (kind "queue"); None otherwise.
    """

    def __init__(self, kind="queue", dim=128, queue_size=65536, temperature=0.07, **kwargs):
        super().__init__(**kwargs)
        if kind not in KINDS:
            raise ValueError(f"negatives must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind, self.queue_size, self.temperature = kind, queue_size, temperature
        self.queue = self.queue_ptr = None
        if kind == "queue":
            self.queue = self.add_weight(
                shape=(queue_size, dim), initializer=_normalized_queue, trainable=False,
                name="queue", dtype="float32")
            self.queue_ptr = self.add_weight(
                shape=(), dtype="int32", initializer="zeros", trainable=False, name="queue_ptr")

    def contrast(self, queries, keys, same_view_keys=None):
        """Per-example InfoNCE loss [N] and contrastive top-1 hits [N] (1.0 where the positive
        key has the largest logit).

        Args:
          queries: [N, dim] L2-normalised queries of this replica.
          keys: [N, dim] their positive keys (the other view).
          same_view_keys: [N, dim] keys of the queries' own view: the extra negatives of
            "both_views" (required there, unused otherwise).
        """
        if self.kind == "queue":
            loss, logits = losses.info_nce_queue(queries, keys, self.queue, self.temperature)
            labels = tf.zeros(tf.shape(queries)[:1], tf.int64)
        else:
            all_keys, offset = distribute.gather_with_offset(keys)
            same = distribute.all_gather(same_view_keys) if self.kind == "both_views" else None
            loss, logits, labels = losses.info_nce_batch(
                queries, all_keys, self.temperature, offset, same_view_keys=same)
            labels = tf.cast(labels, tf.int64)
        hits = tf.cast(tf.equal(tf.argmax(logits, axis=1), labels), tf.float32)
        return loss, hits

    def enqueue(self, keys):
        """Writes this step's keys of the global batch at the pointer, oldest out (a ring
        buffer); a no-op without a queue."""
        if self.queue is None:
            return
        keys = distribute.all_gather(keys)
        n = tf.shape(keys)[0]
        rows = (self.queue_ptr + tf.range(n, dtype=tf.int32)) % self.queue_size
        self.queue.assign(
            tf.tensor_scatter_nd_update(self.queue, rows[:, None], tf.cast(keys, self.queue.dtype)))
        self.queue_ptr.assign((self.queue_ptr + n) % self.queue_size)
