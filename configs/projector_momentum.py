"""Projector-only momentum (Pham et al. 2022): SimCLR whose keys come from an EMA copy of the
projector applied to the shared online backbone's (stop-gradient) features: the EMA where the
encoder fluctuates most, without a second backbone forward pass.

  python train.py --config=configs/projector_momentum.py:fashion_mnist --workdir=runs/proj_ema_fm
"""

from moco_tf.configs import simclr


def get_config(variant=""):
    c = simclr.get_config(variant)
    c.moco.momentum_scope = "projector"
    return c
