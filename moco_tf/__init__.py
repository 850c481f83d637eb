"""moco_tf: Momentum Contrast (MoCo) for TensorFlow 2 / Keras 3.

The public API, named after the paper's terms:
  MoCo                 the keras.Model: query encoder, momentum key encoder, queue, InfoNCE
  MomentumSchedule     callback setting the EMA momentum m (constant or cosine)
  build_backbone, build_projector   encoders (torchvision-compatible ResNets) and heads
  build_model          a compiled MoCo from a config (configs/*.py)
  train_and_evaluate   what train.py runs: fit, kNN, export, results.json
  export_backbone, load_backbone    SavedModel + .keras export of the query backbone
"""

from moco_tf.export import export_backbone, load_backbone
from moco_tf.models.backbones import build_backbone
from moco_tf.models.contrastive import MoCo
from moco_tf.models.heads import build_projector
from moco_tf.momentum import MomentumSchedule
from moco_tf.train_lib import build_model, train_and_evaluate

__all__ = [
    "MoCo", "MomentumSchedule", "build_backbone", "build_model", "build_projector",
    "export_backbone", "load_backbone", "train_and_evaluate",
]
