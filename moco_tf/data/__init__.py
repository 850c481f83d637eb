"""Input pipelines: data sources, two-view augmentation, train/eval datasets.

The names and submodules load on first use (PEP 562), so that `python -m moco_tf.data.prepare`
starts TensorFlow itself, quietly (moco_tf.cli), instead of this package importing it first.
"""
from moco_tf import _lazy

_API = {  # name -> module, imported on first use
    "RECIPES": "moco_tf.data.augment",
    "ViewRecipe": "moco_tf.data.augment",
    "eval_transform": "moco_tf.data.augment",
    "two_view_augment": "moco_tf.data.augment",
    "images": "moco_tf.data.datasets",
    "num_examples": "moco_tf.data.datasets",
    "eval_dataset": "moco_tf.data.pipeline",
    "train_dataset": "moco_tf.data.pipeline",
    "two_view_dataset": "moco_tf.data.pipeline",
}
_SUBMODULES = ("augment", "crops", "datasets", "fashion_mnist", "image_folder", "imagenet_val",
               "pipeline", "prepare", "records", "synthetic", "tfds_source")
__all__ = sorted(_API)


__getattr__, __dir__ = _lazy.attributes("moco_tf.data", globals(), _API, _SUBMODULES)
