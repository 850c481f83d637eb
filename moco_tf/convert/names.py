"""The PyTorch name and layout of every weight of our models: one table for import and export.

Our layers carry the torch module names (torchvision's ResNet, timm's ViT, the official heads'
`nn.Sequential` indices), so a weight's torch key is `<layer name>.<torch parameter>`:

  Conv2D     kernel [kh, kw, in, out]   <->  weight [out, in, kh, kw]
  Dense      kernel [in, out]           <->  weight [out, in]
  BN         gamma, beta, moving_mean, moving_variance  <->  weight, bias, running_mean, running_var
  LayerNorm  gamma, beta                <->  weight, bias
  ViT        embed/cls_token, embed/pos_embed  <->  cls_token, pos_embed (no module prefix)
             blocks.i.attn/qkv_kernel [D, 3D], proj_kernel  <->  blocks.i.attn.qkv.weight, .proj.weight
             (an export's plain-Keras forms of both read as these: `export.replaced_variables`)
"""
from __future__ import annotations

import numpy as np

from moco_tf.export import replaced_variables

_PARAM = {"kernel": "weight", "bias": "bias", "gamma": "weight", "beta": "bias",
          "moving_mean": "running_mean", "moving_variance": "running_var",
          "qkv_kernel": "qkv.weight", "qkv_bias": "qkv.bias",
          "proj_kernel": "proj.weight", "proj_bias": "proj.bias"}
_UNPREFIXED = ("cls_token", "pos_embed")  # the ViT's embedding: top-level torch parameters


def torch_key(layer_name: str, variable_name: str) -> str | None:
    """The torch state_dict key of our variable `variable_name` of layer `layer_name` (None if
    it has no torch counterpart)."""
    if variable_name in _UNPREFIXED:
        return variable_name
    param = _PARAM.get(variable_name)
    return None if param is None else f"{layer_name}.{param}"


def to_keras(variable_name: str, value: np.ndarray) -> np.ndarray:
    """A torch tensor in the layout of our variable."""
    if value.ndim == 4 and variable_name == "kernel":  # [out, in, kh, kw] -> [kh, kw, in, out]
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2 and variable_name.endswith("kernel"):  # Linear [out, in] -> [in, out]
        return value.T
    return value


def to_torch(variable_name: str, value: np.ndarray) -> np.ndarray:
    """Our variable's value in torch's layout (the inverse of `to_keras`)."""
    if value.ndim == 4 and variable_name == "kernel":
        return value.transpose(3, 2, 0, 1)
    if value.ndim == 2 and variable_name.endswith("kernel"):
        return value.T
    return value


def state_dict(model, prefix: str = "") -> dict:
    """`{torch key: numpy array}` of every weight of `model` that has a torch counterpart, in
    torch's layout, keys prefixed with `prefix`."""
    out = {}
    for layer in model.layers:
        for short, value in _variables(layer):
            key = torch_key(layer.name, short)
            if key is not None:
                out[prefix + key] = np.ascontiguousarray(to_torch(short, value))
    return out


def _variables(layer) -> list:
    """`(variable name, value)` of a layer's weights, in our layout. The plain-Keras forms of
    the ViT layers in an export read as the layers they replace (`export.replaced_variables`)."""
    replaced = replaced_variables(layer)
    if replaced is not None:
        return replaced
    return [(v.name.split("/")[-1], np.asarray(v)) for v in layer.weights]
