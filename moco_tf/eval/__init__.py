"""Evaluation of learned representations: kNN monitor (and linear probe)."""
from moco_tf.eval.knn import (
    evaluate_knn,
    extract_features,
    knn_accuracy,
    knn_classify,
    pixel_features,
)

__all__ = [
    "evaluate_knn",
    "extract_features",
    "knn_accuracy",
    "knn_classify",
    "pixel_features",
]
