"""InfoNCE, the contrastive loss of MoCo (He et al. 2019, Eq. 1).

Both functions return per-example losses: the caller averages over the *global* batch
(`tf.nn.compute_average_loss`), which a per-replica mean would get wrong by the number of replicas.
"""

import tensorflow as tf


def info_nce_queue(query, key, queue, temperature):
    """InfoNCE with the positive key and K negatives from the queue (MoCo v1/v2).

    Args:
      query: [N, C] L2-normalised queries q.
      key: [N, C] L2-normalised positive keys k+ (no gradient expected).
      queue: [K, C] L2-normalised negative keys, as they were *before* this batch is enqueued.
      temperature: T.

    Returns:
      (loss [N], logits [N, 1 + K]); the positive is logit 0.
    """
    l_pos = tf.reduce_sum(query * key, axis=1, keepdims=True)  # [N, 1]
    l_neg = tf.matmul(query, queue, transpose_b=True)  # [N, K]
    logits = tf.concat([l_pos, l_neg], axis=1) / temperature
    labels = tf.zeros(tf.shape(logits)[:1], tf.int32)
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    return loss, logits


def info_nce_batch(query, keys, temperature, offset=0, same_view_keys=None):
    """InfoNCE with in-batch negatives (MoCo v3): query i's positive is key `offset + i`.

    Args:
      query: [N, C] L2-normalised queries of this replica.
      keys: [M, C] L2-normalised keys of the other view, whole global batch (M = N * replicas).
      temperature: T.
      offset: index of this replica's first key in `keys`.
      same_view_keys: optional [M, C] keys of the query's own view, added as negatives except the
        query's own image (SimCLR's NT-Xent: 2M - 2 negatives).

    Returns:
      (loss [N], logits [N, M] or [N, 2M], labels [N]).
    """
    logits = tf.matmul(query, keys, transpose_b=True) / temperature
    labels = tf.range(tf.shape(query)[0], dtype=tf.int32) + tf.cast(offset, tf.int32)
    if same_view_keys is not None:
        same = tf.matmul(query, same_view_keys, transpose_b=True) / temperature
        own = tf.one_hot(labels, tf.shape(same)[1], on_value=True, off_value=False)
        same = tf.where(own, tf.constant(-1e9, same.dtype), same)  # never its own image
        logits = tf.concat([logits, same], axis=1)
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    return loss, logits, labels
