"""SGD and LARS against hand computations of PyTorch's updates (torch.optim.SGD, moco-v3's LARS)."""

import keras
import numpy as np
import pytest

from moco_tf.optimizers import LARS, SGD


def test_sgd_follows_pytorch_with_a_changing_learning_rate():
    # torch.optim.SGD(momentum=0.9, weight_decay=0.1): g += wd * w; v = mu * v + g; w -= lr * v.
    # Keras' SGD keeps m = mu * m - lr * g instead: equal at a constant lr, not here.
    lrs = [1.0, 0.1, 0.5]
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([0, 1], lrs)  # by step 0, 1, 2
    w0 = np.array([2.0, -1.0], "float32")
    grads = [np.array([0.5, 0.25], "float32"), np.array([-1.0, 2.0], "float32"),
             np.array([0.3, 0.3], "float32")]
    w = keras.Variable(w0)
    opt = SGD(learning_rate=schedule, momentum=0.9, weight_decay=0.1)
    torch_w, v = w0.astype(np.float64), np.zeros(2)
    for lr, g in zip(lrs, grads):
        opt.apply_gradients([(g, w)])
        v = 0.9 * v + (g + 0.1 * torch_w)
        torch_w = torch_w - lr * v
        np.testing.assert_allclose(w.numpy(), torch_w, rtol=1e-6)
    keras_w = keras.Variable(w0)  # the convention it replaces gives another result
    keras_sgd = keras.optimizers.SGD(learning_rate=schedule, momentum=0.9)
    for g in grads:
        keras_sgd.apply_gradients([(g + 0.1 * keras_w.numpy(), keras_w)])
    assert np.abs(keras_w.numpy() - torch_w).max() > 0.1


def test_sgd_without_momentum_and_config_round_trip():
    w = keras.Variable(np.array([1.0, 2.0], "float32"))
    SGD(learning_rate=0.5, momentum=0.0, weight_decay=0.2).apply_gradients(
        [(np.array([1.0, 1.0], "float32"), w)])
    np.testing.assert_allclose(w.numpy(), [1.0 - 0.5 * 1.2, 2.0 - 0.5 * 1.4], rtol=1e-6)
    again = SGD.from_config(SGD(0.03, momentum=0.8, weight_decay=1e-4).get_config())
    assert (again.momentum, again.l2) == (0.8, pytest.approx(1e-4))


def test_lars_matches_a_hand_computation_and_excludes_vectors():
    w0 = np.array([[3.0, 4.0]], "float32")  # ||w|| = 5
    b0 = np.array([1.0, -1.0], "float32")  # ndim 1: no trust ratio, no weight decay
    w, b = keras.Variable(w0), keras.Variable(b0)
    g_w, g_b = np.array([[0.6, 0.8]], "float32"), np.array([0.5, 0.25], "float32")
    opt = LARS(learning_rate=0.1, momentum=0.9, weight_decay=0.1, trust_coefficient=0.001)
    mu_w, mu_b = np.zeros_like(w0), np.zeros_like(b0)
    for _ in range(2):
        w_now, b_now = w.numpy(), b.numpy()
        opt.apply_gradients([(g_w, w), (g_b, b)])
        d = g_w + 0.1 * w_now
        d = d * (0.001 * np.linalg.norm(w_now) / np.linalg.norm(d))
        mu_w, mu_b = 0.9 * mu_w + d, 0.9 * mu_b + g_b
        np.testing.assert_allclose(w.numpy(), w_now - 0.1 * mu_w, rtol=1e-5)
        np.testing.assert_allclose(b.numpy(), b_now - 0.1 * mu_b, rtol=1e-5)


def test_lars_zero_weights_use_a_trust_ratio_of_one():
    w = keras.Variable(np.zeros((2, 2), "float32"))
    LARS(learning_rate=1.0, momentum=0.0).apply_gradients([(np.ones((2, 2), "float32"), w)])
    np.testing.assert_allclose(w.numpy(), -np.ones((2, 2)))


def test_lars_config_round_trip():
    opt = LARS(learning_rate=0.5, momentum=0.8, weight_decay=1e-6, trust_coefficient=0.002)
    again = LARS.from_config(opt.get_config())
    assert again.l2 == pytest.approx(1e-6)
    assert (again.momentum, again.trust_coefficient) == (0.8, 0.002)
