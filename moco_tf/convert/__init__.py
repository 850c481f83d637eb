"""Import of pre-trained weights from PyTorch: official MoCo v1/v2/v3 ResNet checkpoints and
torchvision ResNets (`torch_moco`; CLI: `python -m moco_tf.convert.torch_moco`)."""

__all__ = ["ConversionError", "convert"]


def __getattr__(name):
    # Lazy, so `python -m moco_tf.convert.torch_moco` does not import the module twice.
    if name in __all__:
        from moco_tf.convert import torch_moco

        return getattr(torch_moco, name)
    raise AttributeError(f"module 'moco_tf.convert' has no attribute {name!r}")
