"""kNN monitor: weighted voting, neighbour selection, chunking, feature extraction, callback."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from moco_tf.eval.knn import KNNMonitor
from moco_tf.eval import knn


def _unit(angles_cos):
    """2-D unit vectors whose cosine with the query [1, 0] is the given value."""
    c = np.asarray(angles_cos, np.float64)
    return np.stack([c, np.sqrt(1.0 - c**2)], axis=1).astype(np.float32)


def _reference_knn(bank, bank_y, queries, num_classes, k, t):
    """Straightforward numpy weighted kNN, one query at a time."""
    preds = []
    for q in queries:
        sims = bank @ q
        top = np.argsort(-sims, kind="stable")[:k]
        scores = np.zeros(num_classes)
        for i in top:
            scores[bank_y[i]] += np.exp(sims[i] / t)
        preds.append(np.argmax(scores))
    return np.array(preds)


def _random_unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_weighted_vote_beats_majority_by_hand():
    # One very close class-0 neighbour vs two farther class-1 neighbours.
    bank = _unit([1.0, 0.5, 0.5])
    bank_y = np.array([0, 1, 1])
    query = np.array([[1.0, 0.0]], np.float32)
    # By hand, T=0.1: class 0 scores exp(10) = 22026, class 1 scores 2 exp(5) = 297 -> 0,
    # whereas a plain majority vote of the 3 neighbours says 1.
    assert np.exp(1.0 / 0.1) > 2 * np.exp(0.5 / 0.1)
    pred = knn.knn_classify(bank, bank_y, query, num_classes=2, k=3, temperature=0.1)
    np.testing.assert_array_equal(pred, [0])
    # With a huge temperature the weights are all ~1: majority wins (the temperature is used).
    pred = knn.knn_classify(bank, bank_y, query, num_classes=2, k=3, temperature=100.0)
    np.testing.assert_array_equal(pred, [1])


def test_k_selects_the_nearest_neighbours():
    # Cosines with the query: 0.9 (c0), 0.8 (c1), 0.7 (c1), five at -0.9 (c0).
    bank = _unit([0.9, 0.8, 0.7] + [-0.9] * 5)
    bank_y = np.array([0, 1, 1, 0, 0, 0, 0, 0])
    query = np.array([[1.0, 0.0]], np.float32)
    # T=1 by hand: k=1 -> c0; k=3 -> c0 e^.9=2.46 < c1 e^.8+e^.7=4.24 -> c1;
    # k=8 adds 5 e^-.9 = 2.03 to c0 -> 4.49 > 4.24 -> c0. So k=3 must exclude the far points.
    preds = knn.knn_classify(bank, bank_y, query, num_classes=2, k=(1, 3, 8), temperature=1.0)
    assert {k: int(p[0]) for k, p in preds.items()} == {1: 0, 3: 1, 8: 0}
    # A k beyond the bank size uses the whole bank.
    np.testing.assert_array_equal(
        knn.knn_classify(bank, bank_y, query, num_classes=2, k=500, temperature=1.0), [0]
    )


def test_matches_numpy_reference_on_random_data():
    rng = np.random.default_rng(0)
    bank, queries = _random_unit(rng, 300, 16), _random_unit(rng, 50, 16)
    bank_y = rng.integers(0, 5, size=300)
    for k in (1, 7, 40):
        ours = knn.knn_classify(bank, bank_y, queries, num_classes=5, k=k, temperature=0.1)
        assert ours.dtype == np.int32
        np.testing.assert_array_equal(ours, _reference_knn(bank, bank_y, queries, 5, k, 0.1))


def test_chunking_and_multiple_ks_equal_single_passes():
    rng = np.random.default_rng(1)
    bank, queries = _random_unit(rng, 400, 8), _random_unit(rng, 97, 8)
    bank_y = rng.integers(0, 10, size=400)
    kwargs = dict(num_classes=10, temperature=0.1)
    whole = knn.knn_classify(bank, bank_y, queries, k=(200, 20), batch_size=1000, **kwargs)
    chunked = knn.knn_classify(bank, bank_y, queries, k=(200, 20), batch_size=7, **kwargs)
    assert set(whole) == {200, 20}
    for k in (200, 20):
        np.testing.assert_array_equal(whole[k], chunked[k])
        single = knn.knn_classify(bank, bank_y, queries, k=k, **kwargs)
        np.testing.assert_array_equal(whole[k], single)
    # The two ks do give different answers here, so the dict entries are not one array twice.
    assert not np.array_equal(whole[200], whole[20])


def test_accuracy_separated_clusters_and_random_labels():
    rng = np.random.default_rng(2)
    centers = _random_unit(rng, 4, 32) * 10.0

    def clusters(n):
        y = rng.integers(0, 4, size=n)
        x = centers[y] + rng.normal(size=(n, 32)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True), y

    (bx, by), (tx, ty) = clusters(400), clusters(200)
    acc = knn.knn_accuracy(bx, by, tx, ty, num_classes=4, ks=(200, 20))
    assert acc == {200: 1.0, 20: 1.0}

    # Random features and labels: accuracy near chance (0.1 with 10 classes; std ~0.01).
    bx, tx = _random_unit(rng, 2000, 32), _random_unit(rng, 1000, 32)
    by, ty = rng.integers(0, 10, size=2000), rng.integers(0, 10, size=1000)
    acc = knn.knn_accuracy(bx, by, tx, ty, num_classes=10, ks=(200, 20))
    for value in acc.values():
        assert 0.05 < value < 0.16


def _pattern_images(n, num_classes=3, size=8, seed=0):
    """Each class is a distinct bright block plus noise: separable in pixel space."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, size=n).astype(np.int32)
    x = rng.uniform(0.0, 0.2, size=(n, size, size, 1)).astype(np.float32)
    for i, c in enumerate(y):
        x[i, :, c * 2 : c * 2 + 2, 0] += 0.8
    return x, y


def _dataset(x, y, batch=16):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def test_extract_features_normalised_inference_mode_and_pixel_baseline():
    x, y = _pattern_images(37)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(6),
            keras.layers.Dropout(0.5),
        ]
    )
    feats, labels = knn.extract_features(model, _dataset(x, y))
    assert feats.shape == (37, 6) and feats.dtype == np.float32
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, y)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    # training=False: dropout off, so features equal the normalised inference output.
    expected = model(x, training=False).numpy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(feats, expected, atol=1e-5)

    # No model: the raw pixels, flattened and normalised, through the same kNN code path.
    pix, pix_y = knn.extract_features(lambda images: images, _dataset(x, y))
    assert pix.shape == (37, 64)
    flat = x.reshape(37, -1)
    np.testing.assert_allclose(pix, flat / np.linalg.norm(flat, axis=1, keepdims=True), atol=1e-6)
    tx, ty = _pattern_images(20, seed=1)
    assert knn.evaluate_knn(None, _dataset(x, y), _dataset(tx, ty), num_classes=3,
                            ks=(5,)) == {5: 1.0}


class StandInMoCo(keras.Model):
    """Minimal model with a query `backbone`, trained by the default `fit` on random targets."""

    def __init__(self):
        super().__init__()
        self.backbone = keras.Sequential(
            [
                keras.Input((8, 8, 1)),
                keras.layers.Conv2D(4, 3),
                keras.layers.BatchNormalization(),
                keras.layers.GlobalAveragePooling2D(),
            ]
        )

    def call(self, images, training=False):
        return self.backbone(images, training=training)


class LogRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.logs = []

    def on_epoch_end(self, epoch, logs=None):
        self.logs.append(dict(logs))


def test_knn_monitor_logs_on_the_right_epochs():
    x, y = _pattern_images(48)
    bank, test = _dataset(x[:32], y[:32]), _dataset(x[32:], y[32:])
    model = StandInMoCo()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    monitor = KNNMonitor(bank, test, num_classes=3, every_n_epochs=2, ks=(20, 5), verbose=0)
    recorder = LogRecorder()
    history = model.fit(
        x, np.random.rand(48, 4).astype(np.float32), batch_size=16, epochs=3,
        callbacks=[monitor, recorder], verbose=0,
    )
    # 1-based epochs 2 (every 2nd) and 3 (the last one); not epoch 1.
    assert [e for e, _ in monitor.history] == [2, 3]
    assert "knn_top1" not in recorder.logs[0]
    for logs in recorder.logs[1:]:
        assert 0.0 <= logs["knn_top1"] <= 1.0 and "knn_top1_k5" in logs
    assert history.history["knn_top1"] == [acc[20] for _, acc in monitor.history]
    # The last value is the kNN accuracy of the final query backbone.
    final = knn.evaluate_knn(model.backbone, bank, test, num_classes=3, ks=(20, 5), temperature=0.1)
    assert monitor.history[-1][1] == final
    assert recorder.logs[-1]["knn_top1_k5"] == final[5]
