"""The optimizers of the official recipes, with PyTorch's update rules.

- `SGD`: `torch.optim.SGD` (MoCo v1/v2): L2 weight decay added to the gradient of every
  variable, the momentum buffer is the raw sum `v = mu * v + g`, and `w -= lr * v`. Keras' own SGD
  keeps the buffer already scaled by the learning rate (`m = mu * m - lr * g; w += m`): the two
  agree only while the lr is constant, and every recipe here decays it.
- `LARS` (MoCo v3, Keras has none): the official moco-v3 `optimizer.py`. For weight
  matrices/kernels (ndim > 1) the gradient gets weight decay and is rescaled by the trust ratio
  `eta * ||w|| / ||g + wd * w||`; biases and BN parameters (ndim <= 1) are excluded from both;
  then the same heavy-ball momentum `mu = m * mu + g`, `w -= lr * mu`.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="moco_tf")
class SGD(keras.optimizers.Optimizer):
    """`torch.optim.SGD(params, lr, momentum, weight_decay)` (no dampening, no Nesterov).

    Args:
      learning_rate: float or schedule.
      momentum: mu of the buffer `v = mu * v + (g + weight_decay * w)`; `w -= lr * v`.
      weight_decay: L2 coefficient added to every gradient (1e-4 in MoCo v1/v2).
    """

    def __init__(self, learning_rate=0.03, momentum=0.9, weight_decay=0.0, name="sgd", **kwargs):
        # Weight decay is part of the gradient here, not Keras' decoupled decay.
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum, self.sgd_weight_decay = momentum, weight_decay

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        g = ops.cast(gradient, variable.dtype)
        if self.sgd_weight_decay:
            g = g + self.sgd_weight_decay * variable
        if self.momentum:
            v = self.momentums[self._get_variable_index(variable)]
            self.assign(v, v * self.momentum + g)
            g = v
        self.assign_sub(variable, lr * g)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum,
                "weight_decay": self.sgd_weight_decay}


@keras.saving.register_keras_serializable(package="moco_tf")
class LARS(keras.optimizers.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017) as used by MoCo v3.

    Args:
      learning_rate: float or schedule (MoCo v3: 0.3 * batch_size / 256 after warm-up).
      momentum: heavy-ball momentum (0.9).
      weight_decay: L2 added to the gradients of ndim > 1 variables only (1.5e-6 in MoCo v3).
      trust_coefficient: eta of the trust ratio (0.001).
    """

    def __init__(self, learning_rate=0.3, momentum=0.9, weight_decay=0.0,
                 trust_coefficient=0.001, name="lars", **kwargs):
        # Weight decay is part of the LARS update, not Keras' decoupled decay.
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum, self.lars_weight_decay = momentum, weight_decay
        self.trust_coefficient = trust_coefficient

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        g = ops.cast(gradient, variable.dtype)
        if len(variable.shape) > 1:
            g = g + self.lars_weight_decay * variable
            w_norm, g_norm = ops.norm(ops.reshape(variable, [-1])), ops.norm(ops.reshape(g, [-1]))
            ratio = ops.where(
                w_norm > 0, ops.where(g_norm > 0, self.trust_coefficient * w_norm / g_norm, 1.0), 1.0
            )
            g = g * ratio
        mu = self.momentums[self._get_variable_index(variable)]
        self.assign(mu, mu * self.momentum + g)
        self.assign_sub(variable, lr * mu)

    def get_config(self):
        return {
            **super().get_config(),
            "momentum": self.momentum,
            "weight_decay": self.lars_weight_decay,
            "trust_coefficient": self.trust_coefficient,
        }
