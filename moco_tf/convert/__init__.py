"""Weights between PyTorch and moco_tf, one name table for both directions (`names`).

In: official MoCo v1/v2/v3 checkpoints (ResNets and ViTs), torchvision ResNet and timm ViT
`state_dict`s (`torch_moco`; CLI `python -m moco_tf.convert.torch_moco`). Out: a trained
backbone for torchvision, detectron2 or timm (`to_torch`; CLI `python -m moco_tf.convert.to_torch`).
"""

__all__ = ["ConversionError", "convert"]


def __getattr__(name):
    # Lazy, so `python -m moco_tf.convert.torch_moco` does not import the module twice.
    if name in __all__:
        from moco_tf.convert import torch_moco

        return getattr(torch_moco, name)
    raise AttributeError(f"module 'moco_tf.convert' has no attribute {name!r}")
