"""Evaluation of learned representations: weighted kNN and its monitor (`knn`), the embedding
projector (`projector`); linear evaluation in `moco_tf.eval.linear` (not imported here, so that
`python -m moco_tf.eval.linear` runs it once)."""
from moco_tf.eval.knn import KNNMonitor, evaluate_knn, extract_features, knn_accuracy, knn_classify

__all__ = ["KNNMonitor", "evaluate_knn", "extract_features", "knn_accuracy", "knn_classify"]
