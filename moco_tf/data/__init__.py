"""Input pipelines: data sources, two-view augmentation, train/eval datasets."""
from moco_tf.data.augment import RECIPES, ViewRecipe, eval_transform, two_view_augment
from moco_tf.data.datasets import images, num_examples
from moco_tf.data.pipeline import eval_dataset, train_dataset, two_view_dataset

__all__ = [
    "RECIPES", "ViewRecipe", "eval_dataset", "eval_transform", "images", "num_examples",
    "train_dataset", "two_view_augment", "two_view_dataset",
]
