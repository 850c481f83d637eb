"""Evaluation of learned representations: weighted kNN and its monitor (`knn`), linear evaluation
(`linear`; `python -m moco_tf.eval.linear`), TensorBoard's embedding projector (`projector`).

The submodules load on first use (PEP 562): `moco_tf.eval.projector.write_embedding_projector`
works after `import moco_tf`, and `python -m moco_tf.eval.linear` does not find its module
already imported by the package.
"""
from moco_tf import _lazy

_API = {  # name -> module, imported on first use
    "KNNMonitor": "moco_tf.eval.knn",
    "evaluate_knn": "moco_tf.eval.knn",
    "extract_features": "moco_tf.eval.knn",
    "knn_accuracy": "moco_tf.eval.knn",
    "knn_classify": "moco_tf.eval.knn",
}
_SUBMODULES = ("knn", "linear", "projector")
__all__ = sorted(_API)


__getattr__, __dir__ = _lazy.attributes("moco_tf.eval", globals(), _API, _SUBMODULES)
