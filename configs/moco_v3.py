"""MoCo v3 (Chen et al. 2021), ResNet-50 on ImageNet, 300 epochs: no queue, in-batch keys from the
momentum encoder, a predictor, symmetric loss scaled by 2T, m 0.99 -> 1 cosine, LARS.

  python train.py --config=configs/moco_v3.py --workdir=runs/moco_v3

The paper's run: batch 4096 over 64 TPU cores / GPUs, 74.6% linear top-1 (300 ep).
`:fashion_mnist` is the same method on the quickstart's data, model and budget;
`:runlocal` a few steps on synthetic images.
"""

from configs import fashion_mnist, moco_v2


def apply_method(c):
    c.model.projector = "mlp"
    c.model.projector_layers = 2  # moco-v3 builder.py: 2 layers for ResNets (3 for ViTs)
    c.model.projector_bn = True
    c.model.predictor = True
    c.moco.negatives = "batch"
    c.moco.symmetric = True
    c.moco.momentum_schedule = "cosine"
    c.moco.momentum = 0.99
    c.moco.temperature = 1.0
    c.moco.loss_scale = 2 * c.moco.temperature
    c.data.augmentation = "moco_v3"
    return c


def get_config(variant=""):
    if variant == "fashion_mnist":
        c = apply_method(fashion_mnist.get_config())
        c.model.predictor_hidden_dim = 512
        return c
    c = apply_method(moco_v2.get_config(variant))
    c.model.norm = "sync_bn"  # BN statistics over all replicas, as the paper
    c.model.projector_hidden_dim = 4096
    c.model.predictor_hidden_dim = 4096
    c.moco.dim = 256
    c.data.crop_scale = (0.08, 1.0)
    c.train.optimizer = "lars"
    c.train.base_learning_rate = 0.3  # lr = 0.3 * batch_size / 256
    c.train.weight_decay = 1.5e-6
    c.train.warmup_epochs = 10
    c.train.lr_schedule = "cosine"
    if variant != "runlocal":
        c.train.epochs = 300
        c.train.batch_size = 4096
    return c
