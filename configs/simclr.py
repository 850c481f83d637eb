"""SimCLR (Chen et al. 2020) in the momentum-encoder family: no momentum encoder, NT-Xent with the
other 2N - 2 images of the batch as negatives, symmetric, gradients through both views.

  python train.py --config=configs/simclr.py --workdir=runs/simclr
  python train.py --config=configs/simclr.py:fashion_mnist --workdir=runs/simclr_fm   # the study

ImageNet: ResNet-50, batch 4096, LARS 0.3 * batch / 256, T = 0.1 (the paper: 69.3% linear top-1
after 1000 epochs). `:fashion_mnist` keeps the quickstart's data, model, optimizer and budget and
changes only the method switches, for the momentum study (experiments/momentum_study.py).
"""

from moco_tf.configs import fashion_mnist, moco_v2


def apply_method(c):
    c.moco.momentum_scope = "none"
    c.moco.negatives = "both_views"
    c.moco.symmetric = True
    return c


def get_config(variant=""):
    if variant == "fashion_mnist":
        return apply_method(fashion_mnist.get_config())
    c = apply_method(moco_v2.get_config(variant))
    c.model.norm = "sync_bn"  # SimCLR's global BN
    c.moco.temperature = 0.1
    c.train.optimizer = "lars"
    c.train.base_learning_rate = 0.3
    c.train.weight_decay = 1e-6
    c.train.warmup_epochs = 10
    if variant == "runlocal":
        c.train.warmup_epochs = 0  # one short epoch
    else:
        c.train.batch_size = 4096
    return c
