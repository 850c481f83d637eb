"""MoCo v3 (Chen et al. 2021) on ImageNet, 300 epochs: no queue, in-batch keys from the momentum
encoder, a predictor, symmetric loss scaled by 2T, m 0.99 -> 1 cosine.

  python train.py --config=configs/moco_v3.py --workdir=runs/moco_v3              # ResNet-50, LARS
  python train.py --config=configs/moco_v3.py:vit_small --workdir=runs/v3_vit_s   # ViT-S/16, AdamW
  python train.py --config=configs/moco_v3.py:vit_base --workdir=runs/v3_vit_b    # ViT-B/16, AdamW

The paper's runs (batch 4096, 300 epochs, facebookresearch/moco-v3 CONFIG.md): ResNet-50 72.8%,
ViT-S/16 73.2%, ViT-B/16 76.7% linear top-1, on 16-64 GPUs or a TPU pod. The settings are
CONFIG.md's commands on top of main_moco.py's defaults:
  ResNet-50  LARS, lr = 0.3 * batch / 256, wd 1e-6, 10 warm-up epochs then cosine, crops of
             20-100% of the image (--crop-min=.2), T 1.0, SyncBN, 2-layer projector.
  ViT-S, -B  AdamW, lr = 1.5e-4 * batch / 256, wd 0.1, 40 warm-up epochs then cosine, crops of
             8-100%, T 0.2, patch projection frozen, 3-layer projector.
  both       batch 4096, 300 epochs, m 0.99 -> 1 (cosine), dim 256, MLP hidden 4096.
As in moco-v3, the ResNet starts each block's last BN at gamma 0 (torchvision's
zero_init_residual=True) and the ViT predictor ends with an affine-free BN (MoCo_ViT's
`_build_mlp(2, dim, mlp_dim, dim)`; the ResNet predictor has none).
Precision "auto": the official runs use AMP (float16 autocast with a loss scaler); "auto" is
bfloat16 where the hardware computes it and float32 elsewhere (mixed_float16 also trains:
--config.precision=mixed_float16).

Linear evaluation as moco-v3's main_lincls.py (SGD, momentum 0.9, no weight decay, the features
as they are, lr 3 per 256 images for ViTs and 0.1 for ResNet-50, 90 epochs), at the linear CLI's
batch 256:
  python -m moco_tf.eval.linear --export=runs/v3_vit_s/export \\
      --config=configs/moco_v3.py:vit_small --normalize=none --learning_rate=3 --epochs=90
and --learning_rate=0.1 for ResNet-50. The CLI's defaults (lr 30 on L2-normalised features) are
MoCo v1/v2's; its lr steps x0.1 at 60% and 80% of the epochs where main_lincls decays by a cosine.
`:fashion_mnist` is the same method on the quickstart's data, model and budget; `:runlocal` and
`:vit_runlocal` a few steps on synthetic images (ResNet / a tiny ViT).
"""

from moco_tf.configs import fashion_mnist, moco_v2

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
    T = 0.2, crops from 8% of the image, the patch projection frozen at its random init, a
    3-layer projector."""
    c.model.backbone = arch
    c.model.patch_size = 16
    c.model.projector_layers = 3
    c.model.predictor_last_bn = True  # MoCo_ViT: _build_mlp(2, dim, mlp_dim, dim), last BN on
    c.model.zero_init_residual = False  # a ResNet option
    c.data.crop_scale = (0.08, 1.0)  # main_moco.py's default --crop-min; only ResNets pass .2
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
    c.model.zero_init_residual = True  # moco-v3: torchvision resnet50(zero_init_residual=True)
    c.model.projector_hidden_dim = 4096
    c.model.predictor_hidden_dim = 4096
    c.moco.dim = 256
    c.data.crop_scale = (0.2, 1.0)  # CONFIG.md's ResNet-50 runs: --crop-min=.2
    c.train.optimizer = "lars"
    c.train.base_learning_rate = 0.3  # lr = 0.3 * batch_size / 256
    c.train.weight_decay = 1e-6  # main_moco.py's default; CONFIG.md's 1000-epoch run uses 1.5e-6
    c.train.warmup_epochs = 10
    c.train.lr_schedule = "cosine"
    if variant.startswith("vit"):
        vit(c, {"vit_small": "vit_small", "vit_base": "vit_base"}.get(variant, "vit_tiny"))
    if variant == "vit_runlocal":  # 64 px, 16 px patches: 16 tokens
        c.model.projector_hidden_dim = c.model.predictor_hidden_dim = 64
        c.moco.dim = 32
    if runlocal:
        c.train.warmup_epochs = 0  # one short epoch; float32, the same on every machine
    else:
        c.precision = "auto"  # the official runs' AMP: see the docstring
        c.train.epochs = 300
        c.train.batch_size = 4096
    return c
