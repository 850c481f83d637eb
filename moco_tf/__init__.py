"""moco_tf: Momentum Contrast (MoCo) for TensorFlow 2 / Keras 3.

The public API, named after the paper's terms:
  MoCo                 the keras.Model: query encoder, momentum key encoder, queue, InfoNCE
  MomentumSchedule     callback setting the EMA momentum m (constant or cosine)
  build_backbone, build_projector   encoders (torchvision-compatible ResNets) and heads
  build_model          a compiled MoCo from a config (configs/*.py)
  train_and_evaluate   what train.py runs: fit, kNN, export, results.json
  export_backbone, load_backbone    SavedModel + .keras export of the query backbone
  SGD, LARS            the recipes' optimizers, with PyTorch's update rules
Submodules (`moco_tf.config`, `moco_tf.data`, `moco_tf.callbacks`, ...) load on first use too;
`moco_tf.configs` holds the bundled configs (configs/*.py of a checkout).
"""

import importlib
import importlib.util
import os
import sys

from moco_tf import _lazy

# name -> module. Imported on first use (PEP 562), so that `import moco_tf.config` (every config
# file does) does not load TensorFlow: train.py reports a config mistake before it loads.
_API = {
    "MoCo": "moco_tf.models.contrastive",
    "MomentumSchedule": "moco_tf.momentum",
    "build_backbone": "moco_tf.models.backbones",
    "build_model": "moco_tf.train_lib",
    "build_projector": "moco_tf.models.heads",
    "export_backbone": "moco_tf.export",
    "load_backbone": "moco_tf.export",
    "train_and_evaluate": "moco_tf.train_lib",
    "SGD": "moco_tf.optimizers",
    "LARS": "moco_tf.optimizers",
}
_SUBMODULES = ("callbacks", "checkpoint", "config", "configs", "convert", "data", "distribute",
               "eval", "export", "losses", "models", "momentum", "optimizers", "train_lib")
__all__ = sorted(_API)


def _checkout_configs():
    """The bundled configs are `moco_tf.configs`: in a wheel the folder moco_tf/configs
    (pyproject.toml's package-dir), in a checkout its top-level configs/ (where `python train.py
    --config=configs/moco_v2.py` reads them), registered here. Only an empty __init__ runs."""
    here = os.path.dirname(os.path.abspath(__file__))
    folder = os.path.join(os.path.dirname(here), "configs")
    if (f"{__name__}.configs" in sys.modules or os.path.isdir(os.path.join(here, "configs"))
            or not os.path.isfile(os.path.join(folder, "__init__.py"))):
        return
    spec = importlib.util.spec_from_file_location(
        f"{__name__}.configs", os.path.join(folder, "__init__.py"),
        submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    globals()["configs"] = module


_checkout_configs()


__getattr__, __dir__ = _lazy.attributes("moco_tf", globals(), _API, _SUBMODULES)
