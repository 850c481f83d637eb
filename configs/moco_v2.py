"""MoCo v2 (Chen et al. 2020, "aug+", MLP head, cosine lr) on ImageNet, ResNet-50, 200 epochs.

  # tfds imagenet2012 (prepared once from the two tars of image-net.org, in ~/tensorflow_datasets):
  python train.py --config=configs/moco_v2.py --workdir=runs/moco_v2 \
      --config.data.tfds_manual_dir=/data/imagenet_tars --config.train.strategy=mirrored
  # an ILSVRC-style folder: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG
  python train.py --config=configs/moco_v2.py --workdir=runs/moco_v2 \
      --config.data.source=image_folder --config.data.data_dir=/data/imagenet/train \
      --config.data.eval_dir=/data/imagenet/val --config.train.strategy=mirrored

The paper's run: 8 V100 GPUs, ~53 hours, 67.5% linear top-1; the input pipeline then has to
deliver ~1,350 images/s (docs/data.md: host cores per GPU, data.augment_on, the tf.data
service). Crops are torchvision's RandomResizedCrop(224, scale=(0.2, 1)) of the whole image.
`:runlocal` trains the same recipe for a few steps on synthetic images, to check a set-up.
"""

from moco_tf.config import defaults


def get_config(variant=""):
    if variant not in ("", "runlocal"):  # other configs build on this one
        raise ValueError(f"Unknown variant {variant!r}: use '' (the recipe) or 'runlocal'.")
    c = defaults()
    c.data.source = "tfds"
    c.data.name = "imagenet2012"
    c.data.eval_split = "validation"
    c.data.image_size = 224
    c.data.channels = 3
    c.data.augmentation = "moco_v2"
    c.data.crop_scale = (0.2, 1.0)
    c.data.cache = False
    c.data.shuffle_buffer = 10000  # tfds: encoded JPEGs (~1 GB); image folders shuffle all names
    c.data.num_classes = 1000
    c.data.mean = (0.485, 0.456, 0.406)
    c.data.std = (0.229, 0.224, 0.225)

    c.model.backbone = "resnet50"
    c.model.cifar_stem = False
    c.model.norm = "bn"  # shuffle-BN comes from the replicas on multi-GPU runs
    c.model.projector = "mlp"  # 2048-2048-128

    c.moco.dim = 128
    c.moco.queue_size = 65536
    c.moco.momentum = 0.999
    c.moco.temperature = 0.2

    c.train.epochs = 200
    c.train.batch_size = 256
    c.train.base_learning_rate = 0.03  # lr = 0.03 * batch_size / 256
    c.train.lr_schedule = "cosine"
    c.train.weight_decay = 1e-4

    c.eval.knn_every_epochs = 10
    c.eval.batch_size = 256

    if variant == "runlocal":
        c.data.source = "synthetic"
        c.data.image_size = 64
        c.data.synthetic_examples = 64
        c.data.num_classes = 4
        c.data.cache = True
        c.moco.queue_size = 64
        c.train.epochs = 1
        c.train.batch_size = 16
        c.train.steps_per_epoch = 2
        c.eval.knn_every_epochs = 1
        c.eval.batch_size = 32
    return c
