"""Projection heads and the MoCo v3 predictor: `[B, D]` features -> `[B, dim]` (not normalised).

| recipe      | call                                                                           |
|-------------|--------------------------------------------------------------------------------|
| MoCo v1     | `build_projector("linear", 2048, 128)`                                         |
| MoCo v2     | `build_projector("mlp", 2048, 128)`  (2048-2048(ReLU)-128, with biases)        |
| MoCo v3 R50 | `build_projector("mlp", 2048, 256, hidden_dim=4096, num_layers=2, use_bn=True, |
|             |  last_bn=True)` and `build_predictor(256, 256, 4096)`                          |
| MoCo v3 ViT | `build_projector("mlp", 384, 256, hidden_dim=4096, num_layers=3, use_bn=True,  |
|             |  last_bn=True)` and `build_predictor(256, 256, 4096, last_bn=True)`            |

(moco-v3 `builder.py`: `_build_mlp(2 | 3, ...)` for the projectors; the predictor is
`_build_mlp(2, dim, mlp_dim, dim)` with its final BN for ViTs, `last_bn=False` for ResNets.)

Layer `i` of a head is named `"<name>.<i>"` with `i` the index the official PyTorch code gives it
in its `nn.Sequential` (ReLU layers count too), so checkpoint keys map mechanically:
v2 `encoder_q.fc.0.weight` -> `projector.0` kernel (transposed), `fc.2` -> `projector.2`;
v3 `base_encoder.fc.1.running_mean` -> `projector.1` moving_mean; `predictor.3` -> `predictor.3`,
`predictor.4.running_var` (ViT) -> `predictor.4` moving_variance;
v1 `encoder_q.fc.weight` -> `projector.0`.
Dense layers use torch's `nn.Linear` default init (uniform +-1/sqrt(fan_in), bias too); BN layers
torch's eps 1e-5 / momentum 0.1 (Keras 0.9). The last Dense and BN compute in float32 so the
loss sees float32 outputs under a mixed-precision policy.
"""

import math

import keras

from moco_tf.models.backbones import BN_EPSILON, BN_MOMENTUM, NORMS, batch_norm

KINDS = ("linear", "mlp")


def build_projector(
    kind,
    input_dim,
    output_dim,
    *,
    hidden_dim=None,
    num_layers=2,
    use_bn=False,
    last_bn=False,
    use_bias=None,
    norm="bn",
    split_bn_groups=8,
    name="projector",
):
    """Builds the projection head `g`: `[B, input_dim]` -> `[B, output_dim]`.

    Args:
      kind: "linear" (one Dense, MoCo v1) or "mlp" (`num_layers` Dense layers, ReLU between).
      hidden_dim: width of the hidden layers; default `input_dim` (MoCo v2).
      num_layers: Dense layers of the MLP (>= 2).
      use_bn: BN after every hidden Dense, before its ReLU (MoCo v3).
      last_bn: a final BN without affine (center=scale=False) after the last Dense (MoCo v3).
      use_bias: Dense biases; default `not use_bn` - MoCo v2 has biases, v3 has none anywhere.
      norm, split_bn_groups: BN flavour, as in `build_backbone` ("bn", "split_bn", "sync_bn").
    """
    if kind not in KINDS:
        raise ValueError(f"projector kind must be one of {KINDS}, got {kind!r}.")
    if use_bias is None:
        use_bias = not use_bn
    if kind == "linear":
        if use_bn or last_bn:
            raise ValueError("A linear projector has no BN; use kind='mlp' for use_bn/last_bn.")
        return _mlp([output_dim], input_dim, False, False, use_bias, norm, split_bn_groups, name)
    if num_layers < 2:
        raise ValueError(f"An MLP projector needs num_layers >= 2, got {num_layers}.")
    hidden_dim = hidden_dim or input_dim
    widths = [hidden_dim] * (num_layers - 1) + [output_dim]
    return _mlp(widths, input_dim, use_bn, last_bn, use_bias, norm, split_bn_groups, name)


def build_predictor(input_dim, output_dim, hidden_dim, *, last_bn=False, norm="bn",
                    split_bn_groups=8, name="predictor"):
    """MoCo v3 predictor `q`: `[B, input_dim]` -> `[B, output_dim]`, no biases.

    Dense -> BN -> ReLU -> Dense, and with `last_bn` a final BN without affine (moco-v3's ViT
    predictor; its ResNet predictor has none, the default here).
    """
    return _mlp([hidden_dim, output_dim], input_dim, True, last_bn, False, norm, split_bn_groups,
                name)


def _mlp(widths, input_dim, use_bn, last_bn, use_bias, norm, split_bn_groups, name):
    """Dense layers of `widths`; [BN] + ReLU after each hidden one; optional affine-free last BN."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
    inputs = keras.Input(shape=(input_dim,), name="features")
    x, index, fan_in = inputs, 0, input_dim

    def add(layer_fn, **kwargs):
        nonlocal x, index
        x = layer_fn(name=f"{name}.{index}", **kwargs)(x)
        index += 1

    for i, width in enumerate(widths):
        last = i == len(widths) - 1
        out_dtype = {"dtype": "float32"} if last else {}
        add(_torch_linear, units=width, fan_in=fan_in, use_bias=use_bias, **out_dtype)
        fan_in = width
        if not last:
            if use_bn:
                add(_bn, norm=norm, groups=split_bn_groups)
            add(keras.layers.ReLU)
        elif last_bn:
            # SimCLR/MoCo v3: BN on the output without gamma/beta.
            add(_bn, norm=norm, groups=split_bn_groups, center=False, scale=False, dtype="float32")
    return keras.Model(inputs, x, name=name)


def _torch_linear(units, fan_in, use_bias, **kwargs):
    """Dense with torch `nn.Linear`'s default init: kernel and bias ~ U(+-1/sqrt(fan_in))."""
    limit = 1.0 / math.sqrt(fan_in)
    return keras.layers.Dense(
        units,
        use_bias=use_bias,
        # VarianceScaling uniform limit = sqrt(3 * scale / fan_in); scale 1/3 gives 1/sqrt(fan_in).
        kernel_initializer=keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform"),
        bias_initializer=keras.initializers.RandomUniform(-limit, limit),
        **kwargs,
    )


def _bn(norm, groups, **kwargs):
    return batch_norm(norm, groups, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, **kwargs)
