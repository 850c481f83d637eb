"""Evaluation of learned representations: weighted kNN and its monitor (`knn`), linear evaluation
(`linear`; `python -m moco_tf.eval.linear`), TensorBoard's embedding projector (`projector`).

The submodules load on first use (PEP 562): `moco_tf.eval.projector.write_embedding_projector`
works after `import moco_tf`, and `python -m moco_tf.eval.linear` does not find its module
already imported by the package.
"""
import importlib

_API = {  # name -> module, imported on first use
    "KNNMonitor": "moco_tf.eval.knn",
    "evaluate_knn": "moco_tf.eval.knn",
    "extract_features": "moco_tf.eval.knn",
    "knn_accuracy": "moco_tf.eval.knn",
    "knn_classify": "moco_tf.eval.knn",
}
_SUBMODULES = ("knn", "linear", "projector")
__all__ = sorted(_API)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"moco_tf.eval.{name}")
    if name not in _API:
        raise AttributeError(f"module 'moco_tf.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_API) | set(_SUBMODULES))
