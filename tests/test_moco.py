"""The MoCo step: EMA, gradients, queue, logits, loss (tiny stand-in encoders, 8x8 images)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from moco_tf import distribute, losses, momentum
from moco_tf.models.backbones import SplitBatchNorm
from moco_tf.models.contrastive import MoCo

B, K, DIM = 4, 8, 3


def tiny_encoder(norm=keras.layers.BatchNormalization):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = norm()(x)
    x = keras.layers.ReLU()(x)
    backbone = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name="backbone")
    feats = keras.Input((4,))
    projector = keras.Model(feats, keras.layers.Dense(DIM)(feats), name="projector")
    return backbone, projector


def make_model(lr=0.1, m=0.5, norm=keras.layers.BatchNormalization, **kwargs):
    backbone, projector = tiny_encoder(norm)
    model = MoCo(backbone, projector, queue_size=K, momentum=m, temperature=0.2, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(lr))
    return model


def batch(seed):
    rng = np.random.default_rng(seed)
    return {
        "view1": rng.uniform(size=(B, 8, 8, 1)).astype("float32"),
        "view2": rng.uniform(size=(B, 8, 8, 1)).astype("float32"),
    }


def key_of(model, images):
    k = model.key_projector(model.key_backbone(images, training=True), training=True)
    return tf.math.l2_normalize(k, 1).numpy()


def test_ema_update_formula():
    k = [tf.Variable([1.0, 2.0]), tf.Variable([[4.0]])]
    q = [tf.Variable([3.0, -2.0]), tf.Variable([[0.0]])]
    momentum.ema_update(k, q, 0.9)
    np.testing.assert_allclose(k[0].numpy(), [0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1 * 2], rtol=1e-6)
    np.testing.assert_allclose(k[1].numpy(), [[3.6]], rtol=1e-6)
    np.testing.assert_allclose(q[0].numpy(), [3.0, -2.0])  # the source is untouched


def test_key_encoder_starts_equal_and_follows_ema_after_a_step():
    model = make_model(m=0.75)
    for q, k in zip(model.key_encoder.sources, model.key_encoder.targets):
        np.testing.assert_array_equal(q.numpy(), k.numpy())
    model.train_on_batch(batch(0))  # warm up so the query differs from the key encoder
    before_k = [v.numpy() for v in model.key_encoder.targets]
    model.train_on_batch(batch(1))
    after_q = [v.numpy() for v in model.key_encoder.sources]
    for k_old, q_new, k_new in zip(before_k, after_q, model.key_encoder.targets):
        np.testing.assert_allclose(k_new.numpy(), 0.75 * k_old + 0.25 * q_new, rtol=1e-5, atol=1e-6)
    # Only the weights that have an EMA pair are the query's trainable ones (no BN statistics).
    assert len(model.key_encoder.targets) == len(model.backbone.trainable_weights) + 2


def test_no_gradient_reaches_the_key_encoder():
    model = make_model(m=1.0)  # m = 1: the key encoder may only change through gradients
    key_vars = {id(v) for v in model.key_backbone.weights + model.key_projector.weights}
    assert not key_vars & {id(v) for v in model.trainable_variables}
    before = [v.numpy() for v in model.key_encoder.targets]
    query_before = [v.numpy() for v in model.key_encoder.sources]
    for i in range(3):
        model.train_on_batch(batch(i))
    for old, v in zip(before, model.key_encoder.targets):
        np.testing.assert_array_equal(old, v.numpy())
    assert any(not np.allclose(o, v.numpy()) for o, v in zip(query_before, model.key_encoder.sources))

    # And the tape itself finds no path from the loss to a key weight.
    data = batch(9)
    with tf.GradientTape() as tape:
        q = model.query(model.backbone(data["view1"], training=True))
        k = model.key_encoder.keys(data["view2"], None, None, step=0)
        loss = tf.reduce_mean(losses.info_nce_queue(q, k, model.queue, 0.2)[0])
    grads = tape.gradient(loss, model.key_encoder.targets)
    assert all(g is None for g in grads)


def test_key_encoder_batchnorm_uses_batch_statistics_and_updates_its_moving_mean():
    model = make_model(m=1.0)
    bn = [l for l in model.key_backbone.layers if isinstance(l, keras.layers.BatchNormalization)][0]
    before = bn.moving_mean.numpy().copy()
    model.train_on_batch(batch(0))
    assert not np.allclose(before, bn.moving_mean.numpy())


def test_queue_holds_the_last_k_keys_in_order_after_wrap_around():
    model = make_model(m=1.0)  # fixed key encoder: keys can be recomputed afterwards
    batches = [batch(i) for i in range(5)]  # 5 * B = 20 keys through a queue of K = 8
    for data in batches:
        model.train_on_batch(data)
    keys = [key_of(model, data["view2"]) for data in batches]
    # ptr after 20 keys is 20 % 8 = 4: rows 0-3 hold batch 4 (written last), rows 4-7 batch 3.
    assert int(model.queue_ptr.numpy()) == 4
    np.testing.assert_allclose(model.queue.numpy()[0:4], keys[4], atol=1e-5)
    np.testing.assert_allclose(model.queue.numpy()[4:8], keys[3], atol=1e-5)


def test_logits_use_the_queue_before_the_current_keys_are_enqueued():
    model = make_model(lr=0.0, m=1.0)  # lr 0: the step's query equals a forward pass by hand
    data = batch(3)
    queue_before = model.queue.numpy().copy()
    q = tf.math.l2_normalize(model.projector(model.backbone(data["view1"], training=True)), 1)
    k = key_of(model, data["view2"])
    expected = tf.reduce_mean(losses.info_nce_queue(q, k, queue_before, 0.2)[0]).numpy()
    leaked_queue = np.concatenate([k, queue_before[B:]])  # what the queue holds after the step
    leaked = tf.reduce_mean(losses.info_nce_queue(q, k, leaked_queue, 0.2)[0]).numpy()
    logs = model.train_on_batch(data, return_dict=True)
    assert abs(expected - leaked) > 1e-3  # the two orders are distinguishable
    np.testing.assert_allclose(logs["loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(model.queue.numpy()[:B], k, atol=1e-5)


def test_batch_shuffle_is_undone_by_the_inverse_and_depends_on_the_seed():
    x = tf.range(10)
    shuffled, inverse = distribute.batch_shuffle(x, tf.constant([1, 2], tf.int64))
    assert sorted(shuffled.numpy()) == list(range(10)) and list(shuffled.numpy()) != list(range(10))
    np.testing.assert_array_equal(tf.gather(shuffled, inverse).numpy(), x.numpy())
    again, _ = distribute.batch_shuffle(x, tf.constant([1, 2], tf.int64))
    other, _ = distribute.batch_shuffle(x, tf.constant([1, 3], tf.int64))
    np.testing.assert_array_equal(again.numpy(), shuffled.numpy())
    assert list(other.numpy()) != list(shuffled.numpy())


def test_shuffle_bn_the_key_encoder_normalises_a_shuffled_batch():
    # With BN over 2 sub-batches, a key depends on which images share its sub-batch: the keys the
    # step enqueues must be those of the shuffled batch (un-shuffled back to the query order).
    model = make_model(m=1.0, norm=lambda: SplitBatchNorm(num_splits=2), seed=3)
    data = batch(4)
    model.train_on_batch(data)  # step 0: seed (2 * 3 + 0, 0)
    shuffled, inverse = distribute.batch_shuffle(data["view2"], tf.constant([6, 0], tf.int64))
    expected = tf.gather(key_of(model, shuffled), inverse).numpy()
    unshuffled = key_of(model, data["view2"])
    assert np.abs(expected - unshuffled).max() > 1e-3  # the sub-batches really differ
    np.testing.assert_allclose(model.queue.numpy()[:B], expected, atol=1e-5)


def test_info_nce_equals_a_hand_computation():
    q = np.array([[1.0, 0.0], [0.6, 0.8]], "float32")
    k = np.array([[0.8, 0.6], [0.0, 1.0]], "float32")
    queue = np.array([[0.0, 1.0], [-1.0, 0.0], [0.6, -0.8]], "float32")
    t = 0.5
    loss, logits = losses.info_nce_queue(q, k, queue, t)
    for i in range(2):
        row = np.concatenate([[q[i] @ k[i]], queue @ q[i]]) / t
        np.testing.assert_allclose(logits.numpy()[i], row, rtol=1e-6)
        hand = -row[0] + np.log(np.exp(row).sum())
        np.testing.assert_allclose(loss.numpy()[i], hand, rtol=1e-5)


def test_in_batch_info_nce_positive_is_the_matching_key():
    q = np.eye(3, dtype="float32")
    loss, logits, labels = losses.info_nce_batch(q, q, 1.0)
    np.testing.assert_array_equal(labels.numpy(), [0, 1, 2])
    hand = -1.0 + np.log(np.e + 2.0)
    np.testing.assert_allclose(loss.numpy(), [hand] * 3, rtol=1e-6)


def test_cosine_momentum_schedule_values():
    sched = momentum.MomentumSchedule(0.99, "cosine", total_steps=100)
    assert sched.value(0) == pytest.approx(0.99)
    assert sched.value(50) == pytest.approx(0.995)
    assert sched.value(100) == pytest.approx(1.0)
    assert momentum.MomentumSchedule(0.999).value(12345) == 0.999


def test_momentum_schedule_callback_sets_the_variable_the_step_reads():
    model = make_model(m=0.5)
    ds = tf.data.Dataset.from_tensors(batch(0)).repeat(4)
    model.fit(ds, epochs=1, verbose=0,
              callbacks=[momentum.MomentumSchedule(0.9, "cosine", total_steps=4)])
    # Set before the last step (step 3 of 4): 1 - 0.1 * (cos(3pi/4) + 1) / 2.
    assert float(model.momentum.numpy()) == pytest.approx(1 - 0.1 * (np.cos(0.75 * np.pi) + 1) / 2)


def test_metrics_report_loss_top1_momentum_and_lr():
    model = make_model(lr=0.05, m=0.9)
    logs = model.train_on_batch(batch(0), return_dict=True)
    assert set(logs) >= {"loss", "top1", "momentum", "lr"}
    assert 0.0 <= logs["top1"] <= 1.0
    assert logs["momentum"] == pytest.approx(0.9)
    assert logs["lr"] == pytest.approx(0.05)


def test_invalid_combinations_of_switches_are_refused():
    for kwargs, message in [
            (dict(negatives="both_views"), "needs symmetric=True"),
            (dict(momentum_scope="none"), "needs a momentum encoder"),
            (dict(momentum_scope="halfway"), "momentum_scope must be one of"),
            (dict(negatives="batch", momentum_scope="from:nowhere"), "has no layer 'nowhere'")]:
        with pytest.raises(ValueError, match=message):
            make_model(**kwargs)


def test_call_returns_query_backbone_features():
    model = make_model()
    x = batch(0)["view1"]
    np.testing.assert_allclose(model(x).numpy(), model.backbone(x).numpy())
