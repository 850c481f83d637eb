"""Encoders: backbones (ResNet-18/50 in torchvision layout, small CNN) and projection heads."""

from moco_tf.models.backbones import SplitBatchNorm, Standardize, build_backbone, feature_dim
from moco_tf.models.heads import build_predictor, build_projector

__all__ = [
    "SplitBatchNorm",
    "Standardize",
    "build_backbone",
    "build_predictor",
    "build_projector",
    "feature_dim",
]
