"""Cross-replica helpers used inside `train_step` (they are no-ops on a single device)."""

import tensorflow as tf


def _replica_context():
    ctx = tf.distribute.get_replica_context()
    return ctx if ctx is not None and ctx.num_replicas_in_sync > 1 else None


def all_gather(x):
    """x [N, ...] of every replica, concatenated in replica order: [N * replicas, ...]."""
    ctx = _replica_context()
    return x if ctx is None else ctx.all_gather(x, axis=0)


def gather_with_offset(x):
    """`all_gather(x)` and the index of this replica's first row in it."""
    ctx = _replica_context()
    if ctx is None:
        return x, 0
    offset = tf.shape(x)[0] * tf.cast(ctx.replica_id_in_sync_group, tf.int32)
    return ctx.all_gather(x, axis=0), offset


def batch_shuffle(x, seed):
    """Permutes x [N, ...] along the batch (shuffle-BN); returns (shuffled x, inverse permutation).

    The permutation is a pure function of `seed` (int [2]), so a resumed run shuffles identically.
    Undo with `tf.gather(y, inverse)`.
    """
    perm = tf.argsort(tf.random.stateless_uniform(tf.shape(x)[:1], seed))
    return tf.gather(x, perm), tf.argsort(perm)
