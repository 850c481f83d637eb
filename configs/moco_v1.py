"""MoCo v1 (He et al. 2019) on ImageNet, ResNet-50, 200 epochs: linear head, T = 0.07, step lr.

  python train.py --config=configs/moco_v1.py --workdir=runs/moco_v1

The paper's run: 8 V100 GPUs, ~53 hours, 60.6% linear top-1. Everything not listed here is as in
`configs/moco_v2.py` (data sources, K = 65536, m = 0.999, SGD 0.03 per 256 images, wd 1e-4);
`:runlocal` is a few steps on synthetic images.
"""

from moco_tf.configs import moco_v2


def get_config(variant=""):
    c = moco_v2.get_config(variant)
    c.data.augmentation = "moco_v1"  # crop, grayscale 0.2, colour jitter 0.4, flip: no blur
    c.model.projector = "linear"  # fc 2048 -> 128
    c.moco.temperature = 0.07
    c.train.lr_schedule = "step"
    c.train.lr_decay_epochs = (120, 160)  # x0.1 at each
    return c
