"""MoCo v3 (Chen et al. 2021) on ImageNet, 300 epochs: no queue, in-batch keys from the momentum
encoder, a predictor, symmetric loss scaled by 2T, m 0.99 -> 1 cosine.

  python train.py --config=configs/moco_v3.py --workdir=runs/moco_v3              # ResNet-50, LARS
  python train.py --config=configs/moco_v3.py:vit_small --workdir=runs/v3_vit_s   # ViT-S/16, AdamW
  python train.py --config=configs/moco_v3.py:vit_base --workdir=runs/v3_vit_b    # ViT-B/16, AdamW

The paper's runs (batch 4096, 300 epochs, facebookresearch/moco-v3 CONFIG.md): ResNet-50 72.8%,
ViT-S/16 73.2%, ViT-B/16 76.7% linear top-1, on 16-64 GPUs or a TPU pod.
`:fashion_mnist` is the same method on the quickstart's data, model and budget; `:runlocal` and
`:vit_runlocal` a few steps on synthetic images (ResNet / a tiny ViT).
"""

from configs import fashion_mnist, moco_v2

VARIANTS = ("", "runlocal", "fashion_mnist", "vit_small", "vit_base", "vit_runlocal")


def apply_method(c):
    c.moco.momentum_scope = "full"
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


def vit(c, arch):
    """The ViT recipe (CONFIG.md): AdamW lr 1.5e-4 * batch / 256, wd 0.1, 40 warm-up epochs,
    T = 0.2, the patch projection frozen at its random init, a 3-layer projector."""
    c.model.backbone = arch
    c.model.patch_size = 16
    c.model.projector_layers = 3
    c.moco.temperature = 0.2
    c.moco.loss_scale = 2 * c.moco.temperature
    c.train.optimizer = "adamw"
    c.train.base_learning_rate = 1.5e-4  # lr = 1.5e-4 * batch_size / 256
    c.train.weight_decay = 0.1
    c.train.warmup_epochs = 40
    return c


def get_config(variant=""):
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}: use one of {', '.join(VARIANTS)}.")
    if variant == "fashion_mnist":
        c = apply_method(fashion_mnist.get_config())
        c.model.predictor_hidden_dim = 512
        return c
    runlocal = variant in ("runlocal", "vit_runlocal")
    c = apply_method(moco_v2.get_config("runlocal" if runlocal else ""))
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
    if variant.startswith("vit"):
        vit(c, {"vit_small": "vit_small", "vit_base": "vit_base"}.get(variant, "vit_tiny"))
    if variant == "vit_runlocal":  # 64 px, 16 px patches: 16 tokens
        c.model.projector_hidden_dim = c.model.predictor_hidden_dim = 64
        c.moco.dim = 32
    if runlocal:
        c.train.warmup_epochs = 0  # one short epoch
    else:
        c.train.epochs = 300
        c.train.batch_size = 4096
    return c
