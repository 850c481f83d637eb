"""SimCLR + a momentum (EMA) key encoder (Pham et al. 2022, arXiv 2208.05744): keys of both views
come from the EMA of the whole encoder (backbone + projector); NT-Xent otherwise as SimCLR.

  python train.py --config=configs/simclr_momentum.py:fashion_mnist --workdir=runs/simclr_ema_fm
"""

from moco_tf.configs import simclr


def get_config(variant=""):
    c = simclr.get_config(variant)
    c.moco.momentum_scope = "full"
    return c
