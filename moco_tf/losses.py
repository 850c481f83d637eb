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


def info_nce_batch(query, keys, temperature, offset=0):
    """InfoNCE with in-batch negatives (MoCo v3): query i's positive is key `offset + i`.

    Args:
      query: [N, C] L2-normalised queries of this replica.
      keys: [M, C] L2-normalised keys of the whole global batch (M = N * replicas).
      temperature: T.
      offset: index of this replica's first key in `keys`.

    Returns:
      (loss [N], logits [N, M], labels [N]).
    """
    logits = tf.matmul(query, keys, transpose_b=True) / temperature
    labels = tf.range(tf.shape(query)[0], dtype=tf.int32) + tf.cast(offset, tf.int32)
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    return loss, logits, labels
