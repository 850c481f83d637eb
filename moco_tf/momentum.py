"""The momentum (EMA) update of the key encoder and the callback that schedules its coefficient m.

The update itself runs inside `train_step` (so `steps_per_execution > 1` cannot skip it); the callback
only sets the non-trainable variable `m` that the step reads.
"""

import math

import keras
import tensorflow as tf


def ema_update(target_vars, source_vars, momentum):
    """theta_k <- m * theta_k + (1 - m) * theta_q, for each (key, query) variable pair."""
    m = tf.cast(momentum, tf.float32)
    for k, q in zip(target_vars, source_vars, strict=True):
        k.assign(m * k + (1.0 - m) * tf.cast(q, k.dtype))


def cosine_momentum(base, step, total_steps):
    """m rising from `base` to 1 along a half cosine (BYOL, MoCo v3)."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class MomentumSchedule(keras.callbacks.Callback):
    """Sets `model.momentum` before each step from the global step (`optimizer.iterations`).

    Args:
      base: m at step 0 (0.999 for MoCo v1/v2, 0.99 for MoCo v3).
      schedule: "constant" or "cosine" (base -> 1 over `total_steps`).
      total_steps: length of training in steps (cosine only).
    """

    def __init__(self, base, schedule="constant", total_steps=None):
        super().__init__()
        if schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
        if schedule == "cosine" and not total_steps:
            raise ValueError("the cosine momentum schedule needs total_steps")
        self.base, self.schedule, self.total_steps = base, schedule, total_steps

    def value(self, step):
        if self.schedule == "constant":
            return self.base
        return cosine_momentum(self.base, step, self.total_steps)

    def on_train_batch_begin(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        self.model.momentum.assign(self.value(step))
