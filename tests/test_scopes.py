"""The momentum-encoder family: each momentum scope and negatives option computes what it claims."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from moco_tf import losses
from moco_tf.models.contrastive import MoCo
from moco_tf.models.key_encoder import split_at

B, DIM = 4, 3


class CountCalls(keras.layers.Layer):
    """Identity that counts how often it is traced into a graph (once per forward pass)."""

    calls = 0

    def call(self, x):
        CountCalls.calls += 1
        return x


def encoder():
    inputs = keras.Input((8, 8, 1))
    x = CountCalls()(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same")(x)
    x = keras.layers.BatchNormalization()(x)
    backbone = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    feats = keras.Input((4,))
    return backbone, keras.Model(feats, keras.layers.Dense(DIM)(feats))


def make(scope, negatives="queue", symmetric=False, m=0.5, **kwargs):
    backbone, projector = encoder()
    model = MoCo(backbone, projector, queue_size=8, momentum=m, temperature=0.5,
                 momentum_scope=scope, negatives=negatives, symmetric=symmetric, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    return model


def batch(seed=0):
    rng = np.random.default_rng(seed)
    return {f"view{i}": rng.uniform(size=(B, 8, 8, 1)).astype("float32") for i in (1, 2)}


def forwards_in_one_step(model):
    CountCalls.calls = 0
    model.train_on_batch(batch())
    return CountCalls.calls


def test_projector_scope_runs_the_backbone_once_per_view_and_shares_it():
    model = make("projector", symmetric=True)
    assert model.key_backbone is None and model.key_projector is not None
    assert forwards_in_one_step(model) == 2  # h1, h2: no second backbone for the keys
    full = make("full", symmetric=True)
    assert forwards_in_one_step(full) == 4  # online x1, x2 + momentum x1, x2


def test_projector_scope_key_projector_is_the_ema_of_the_query_projector():
    model = make("projector", m=0.75)
    model.train_on_batch(batch(0))
    k_old = [v.numpy() for v in model.key_projector.weights]
    model.train_on_batch(batch(1))
    for k0, q, k in zip(k_old, model.projector.weights, model.key_projector.weights):
        np.testing.assert_allclose(k.numpy(), 0.75 * k0 + 0.25 * q.numpy(), rtol=1e-5, atol=1e-6)
    assert len(model.key_encoder.targets) == len(model.projector.trainable_weights)


def view2_gradient(model):
    data = batch(2)
    x2 = tf.constant(data["view2"])
    with tf.GradientTape() as tape:
        tape.watch(x2)
        h1, h2 = model.backbone(data["view1"], training=True), model.backbone(x2, training=True)
        loss, _ = model.negatives.contrast(model.query(h1),
                                           model.key_encoder.keys(x2, h2, None, step=0))
    return tape.gradient(loss, x2)


def test_gradients_flow_through_both_views_only_without_momentum():
    grad = view2_gradient(make("none", negatives="batch"))
    assert grad is not None and float(tf.reduce_max(tf.abs(grad))) > 0
    for scope in ("full", "projector"):
        grad = view2_gradient(make(scope, negatives="batch"))
        assert grad is None or float(tf.reduce_max(tf.abs(grad))) == 0.0, scope


def test_symmetric_loss_with_a_queue_enqueues_each_key_once():
    model = make("full", symmetric=True, m=1.0)
    data = batch(3)
    model.train_on_batch(data)
    assert int(model.queue_ptr.numpy()) == B  # B keys, not 2B
    k2 = model.key_projector(model.key_backbone(data["view2"], training=True), training=True)
    np.testing.assert_allclose(model.queue.numpy()[:B], tf.math.l2_normalize(k2, 1), atol=1e-5)


def test_nt_xent_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    z1, z2 = (tf.math.l2_normalize(rng.normal(size=(3, 4)).astype("float32"), 1) for _ in range(2))
    t = 0.5
    loss, logits, labels = losses.info_nce_batch(z1, z2, t, same_view_keys=z1)
    z1, z2 = z1.numpy(), z2.numpy()
    for i in range(3):
        candidates = [z1[i] @ z2[j] / t for j in range(3)] + [z1[i] @ z1[j] / t for j in range(3) if j != i]
        hand = -z1[i] @ z2[i] / t + np.log(np.exp(candidates).sum())
        np.testing.assert_allclose(loss.numpy()[i], hand, rtol=1e-5)


def test_predictor_is_on_the_query_side_only_and_loss_scale_multiplies():
    feats = keras.Input((DIM,))
    predictor = keras.Model(feats, keras.layers.Dense(DIM)(feats))
    model = make("full", negatives="batch", symmetric=True, predictor=predictor, loss_scale=0.4)
    assert any(v is predictor.weights[0] for v in model.trainable_variables)
    assert not any(v is predictor.weights[0] for v in model.key_encoder.sources)  # no momentum predictor
    data = batch(4)
    model.optimizer.learning_rate.assign(0.0)
    logs = model.train_on_batch(data, return_dict=True)
    q1 = model.query(model.backbone(data["view1"], training=True))
    q2 = model.query(model.backbone(data["view2"], training=True))
    k = lambda x: tf.math.l2_normalize(model.key_projector(model.key_backbone(x, training=True)), 1)
    hand = losses.info_nce_batch(q1, k(data["view2"]), 0.5)[0] + losses.info_nce_batch(q2, k(data["view1"]), 0.5)[0]
    np.testing.assert_allclose(logs["loss"], 0.4 * float(tf.reduce_mean(hand)), rtol=1e-4)


@pytest.mark.slow
def test_every_method_config_trains_a_few_steps_with_finite_loss():
    import sys, os  # noqa: E401
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import moco_v1, moco_v2, moco_v3, projector_momentum, simclr, simclr_momentum
    from moco_tf import data, train_lib

    for module in (moco_v1, moco_v2, moco_v3, simclr, simclr_momentum, projector_momentum):
        c = module.get_config("runlocal")
        c.model.backbone, c.data.image_size = "small_cnn", 16  # the recipe's switches, tiny model
        c.model.projector_hidden_dim = 32
        c.model.predictor_hidden_dim = 32
        model = train_lib.build_model(c, total_steps=4, epoch_steps=2)
        history = model.fit(data.train_dataset(c.data, c.train.batch_size, 0), epochs=2,
                            steps_per_epoch=2, verbose=0,
                            callbacks=[train_lib.momentum_schedule(c, 4)])
        assert np.all(np.isfinite(history.history["loss"])), module.__name__
        if c.moco.momentum_schedule == "cosine":  # set before step 3 of 4
            assert float(model.momentum.numpy()) > c.moco.momentum, module.__name__


# --- partial EMA: the momentum copy starts at a block -------------------------------------------


def named_encoder():
    """stem (shared with the key encoder under from:block) -> block.conv, block.bn -> pool."""
    inputs = keras.Input((8, 8, 1))
    x = CountCalls(name="count")(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", name="stem")(x)
    x = keras.layers.Conv2D(4, 3, padding="same", name="block.conv")(x)
    x = keras.layers.BatchNormalization(name="block.bn")(x)
    backbone = keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="pool")(x))
    feats = keras.Input((4,))
    return backbone, keras.Model(feats, keras.layers.Dense(DIM)(feats))


def make_partial(m=0.5, symmetric=False, lr=0.1):
    backbone, projector = named_encoder()
    model = MoCo(backbone, projector, queue_size=8, momentum=m, temperature=0.5,
                 momentum_scope="from:block", symmetric=symmetric)
    model.compile(optimizer=keras.optimizers.SGD(lr))
    return model


def test_split_at_a_block_gives_a_trunk_and_head_that_compose_to_the_backbone():
    backbone, _ = named_encoder()
    trunk, head = split_at(backbone, "block")
    x = batch()["view1"]
    np.testing.assert_allclose(head(trunk(x)), backbone(x), atol=1e-6)
    assert [layer.name for layer in head.layers[1:]] == ["block.conv", "block.bn", "pool"]
    with pytest.raises(ValueError, match="no layer 'layer9'.*block, count, pool, stem"):
        split_at(backbone, "layer9")


def test_partial_scope_shares_the_trunk_and_keeps_an_ema_copy_of_the_rest():
    model = make_partial(m=0.75)
    # One pass of the shared part per view: the keys reuse the online trunk's activations.
    assert forwards_in_one_step(model) == 2
    encoder = model.key_encoder
    head_weights = [w for name in ("block.conv", "block.bn")
                    for w in model.backbone.get_layer(name).trainable_weights]
    assert [v.shape for v in encoder.sources] == [v.shape for v in head_weights +
                                                  model.projector.trainable_weights]
    assert all(any(s is w for w in head_weights + model.projector.trainable_weights)
               for s in encoder.sources)  # the stem has no copy
    k_old = [v.numpy() for v in encoder.targets]
    model.train_on_batch(batch(1))
    for k0, q, k in zip(k_old, encoder.sources, encoder.targets):
        np.testing.assert_allclose(k.numpy(), 0.75 * k0 + 0.25 * q.numpy(), rtol=1e-5, atol=1e-6)


def test_partial_scope_keys_come_from_the_ema_head_on_the_online_trunk_without_gradient():
    model = make_partial(m=1.0, lr=0.0)  # nothing moves: the keys can be recomputed by hand
    data = batch(5)
    model.train_on_batch(data)
    trunk = model.key_encoder.trunk
    expected = tf.math.l2_normalize(model.key_projector(
        model.key_backbone(trunk(data["view2"], training=True), training=True)), 1)
    np.testing.assert_allclose(model.queue.numpy()[:B], expected, atol=1e-5)
    # No gradient reaches the trunk, the EMA head or the projector copy through the keys.
    x2 = tf.constant(data["view2"])
    with tf.GradientTape(persistent=True) as tape:
        h2, cut2 = model.key_encoder.online_features(model.backbone, x2)
        keys = model.key_encoder.keys(x2, h2, cut2, step=0)
    assert all(g is None for g in tape.gradient(keys, model.backbone.trainable_weights +
                                                model.key_encoder.targets))
