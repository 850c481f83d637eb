"""Evaluation of learned representations: kNN monitor; linear evaluation in `moco_tf.eval.linear`
(not imported here, so that `python -m moco_tf.eval.linear` runs it once)."""
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
