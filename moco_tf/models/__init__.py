"""Encoders: backbones (ResNets in torchvision's layout, ViTs in timm's, a small CNN), projection
heads, and MoCo's parts (key encoder, negatives)."""

from moco_tf.models.backbones import SplitBatchNorm, Standardize, build_backbone
from moco_tf.models.heads import build_predictor, build_projector
from moco_tf.models.vit import build_vit

__all__ = [
    "SplitBatchNorm",
    "Standardize",
    "build_backbone",
    "build_predictor",
    "build_projector",
    "build_vit",
]
