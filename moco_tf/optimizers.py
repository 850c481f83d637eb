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
        # Weight decay is part of the gradient here, not Keras' decoupled decay (whose
        # `weight_decay` attribute the base class owns, hence the different name).
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum, self.l2 = momentum, weight_decay

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")

    def direction(self, g, variable):
        """The gradient the momentum buffer accumulates: here plus the L2 term."""
        return g + self.l2 * variable if self.l2 else g

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        g = self.direction(ops.cast(gradient, variable.dtype), variable)
        if self.momentum:
            v = self.momentums[self._get_variable_index(variable)]
            self.assign(v, v * self.momentum + g)
            g = v
        self.assign_sub(variable, lr * g)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "weight_decay": self.l2}


@keras.saving.register_keras_serializable(package="moco_tf")
class LARS(SGD):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017) as used by MoCo v3: `SGD` whose
    gradient of each weight matrix/kernel gets the L2 term and then the trust ratio.

    Args:
      learning_rate: float or schedule (MoCo v3: 0.3 * batch_size / 256 after warm-up).
      momentum: heavy-ball momentum (0.9).
      weight_decay: L2 added to the gradients of ndim > 1 variables only (1e-6 in moco-v3's
        100/300-epoch ResNet-50 runs, 1.5e-6 in its 1000-epoch one).
      trust_coefficient: eta of the trust ratio (0.001).
    """

    def __init__(self, learning_rate=0.3, momentum=0.9, weight_decay=0.0,
                 trust_coefficient=0.001, name="lars", **kwargs):
        super().__init__(learning_rate, momentum, weight_decay, name=name, **kwargs)
        self.trust_coefficient = trust_coefficient

    def direction(self, g, variable):
        if len(variable.shape) <= 1:  # biases and BN parameters: neither decay nor scaling
            return g
        g = g + self.l2 * variable
        w_norm, g_norm = ops.norm(ops.reshape(variable, [-1])), ops.norm(ops.reshape(g, [-1]))
        ratio = ops.where(
            w_norm > 0, ops.where(g_norm > 0, self.trust_coefficient * w_norm / g_norm, 1.0), 1.0
        )
        return g * ratio

    def get_config(self):
        return {**super().get_config(), "trust_coefficient": self.trust_coefficient}
