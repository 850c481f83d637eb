"""The quickstart: SimCLR + EMA from layer4 on Fashion-MNIST (real data, 28x28 grayscale), ~25
minutes on 2 CPU cores that compute bfloat16 (AMX or AVX512-BF16); ~2.5 hours in float32 on 2
AVX2-only cores (docs/results.md).

  sudo apt-get install dataset-fashion-mnist    # IDX files in /usr/share/datasets/fashion-mnist
  python train.py --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist

The method is the momentum family's best at this budget (docs/results.md, docs/momentum_study.md):
SimCLR's in-batch negatives from both views, a symmetric loss, and a key encoder that shares the
online backbone up to layer3 and keeps EMA copies of layer4 and the projector (partial EMA, the
seed paper's "EMA matters near the output"). It beat MoCo v2 by 0.6-0.9 points of kNN at 14 epochs.
Ends with the kNN top-1 (k=200 and k=20) of the query backbone on the test split, next to the same
kNN on raw pixels, and the exported backbone in runs/fashion_mnist/export.
Variants: `:moco_v2` is the quickstart of version 0.2 (MoCo v2: queue, full EMA, one-sided loss);
`:smoke` is a one-minute run of the same pipeline (used by the tests).
"""

from moco_tf.config import defaults

VARIANTS = ("", "moco_v2", "smoke")
# `:moco_v2`'s changes to the quickstart (also experiments/quickstart_sweep.py's MoCo v2 variants).
MOCO_V2 = {"moco.momentum_scope": "full", "moco.negatives": "queue", "moco.symmetric": False,
           "train.base_learning_rate": 0.03}


def get_config(variant=""):
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}: use one of {VARIANTS} ('' is the quickstart).")
    c = defaults()
    c.data.source = "fashion_mnist"
    c.data.image_size = 28
    c.data.channels = 1
    c.data.augmentation = "moco_v2"
    # 0.2 is too harsh at 28 px; 0.5 lost at 14 epochs (docs/results.md)
    c.data.crop_scale = (0.3, 1.0)
    c.data.mean = (0.2860,)  # Fashion-MNIST training-set statistics
    c.data.std = (0.3530,)

    # bfloat16 where the CPU computes it, float32 where TensorFlow would emulate it (emulated
    # bfloat16 is several times slower than float32; the speeds are in docs/results.md).
    c.precision = "auto"
    # Not bit-identical between reruns (they agree to a few tenths of a point of kNN):
    # --config.deterministic=True makes them so, at a cost in speed (docs/checkpoints.md).
    c.deterministic = False

    # Width 16 (channels 16-32-64-128): at equal wall time it beat width 32 (pilots in
    # docs/results.md).
    c.model.backbone = "resnet18"
    c.model.width = 16
    c.model.cifar_stem = True
    c.model.norm = "split_bn"
    c.model.split_bn_groups = 8
    c.model.projector = "mlp"

    c.moco.dim = 128
    # One backbone pass up to layer3; EMA copies of layer4 + the projector.
    c.moco.momentum_scope = "from:layer4"
    c.moco.negatives = "both_views"  # the other 2N - 2 images of the batch (no queue)
    c.moco.symmetric = True
    c.moco.queue_size = 4096  # used by :moco_v2 only
    c.moco.momentum = 0.99
    c.moco.temperature = 0.1  # as the official CIFAR demo; beat 0.2 in the pilots

    c.train.epochs = 14  # 234 steps each (60,000 images // 256)
    c.train.batch_size = 256
    # lr = 0.06 * batch_size / 256: beat 0.03; 0.12 tied at k=200, lost at k=20 (docs/results.md)
    c.train.base_learning_rate = 0.06
    c.train.lr_schedule = "cosine"
    c.train.weight_decay = 5e-4

    c.eval.knn_every_epochs = 4  # and after the last epoch
    c.eval.raw_pixel_baseline = True

    if variant == "moco_v2":  # its results: docs/results.md
        c.update_from_flattened_dict(MOCO_V2)
    if variant == "smoke":
        c.precision = "float32"
        c.model.backbone = "small_cnn"
        c.moco.momentum_scope = "from:conv3"  # small_cnn's last block, as layer4 is ResNet's
        c.train.epochs = 2
        c.train.batch_size = 64
        c.train.steps_per_epoch = 5
        c.eval.knn_every_epochs = 1
        c.eval.raw_pixel_baseline = False
    return c
