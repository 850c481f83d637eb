"""A tiny run on synthetic images (16 px, a small CNN): checks an install in seconds.

  python train.py --config=configs/synthetic.py --workdir=/tmp/moco_check

The tests build their runs on this config.
"""

from moco_tf.config import defaults


def get_config(variant=""):
    if variant:
        raise ValueError(f"Unknown variant {variant!r}: configs/synthetic.py has none.")
    c = defaults()
    c.data.source = "synthetic"
    c.data.image_size = 16
    c.data.channels = 1
    c.data.synthetic_examples = 256
    c.data.num_classes = 4
    c.data.mean, c.data.std = (0.5,), (0.25,)
    c.model.backbone = "small_cnn"
    c.model.split_bn_groups = 4
    c.moco.queue_size = 64
    c.train.batch_size = 32
    c.train.epochs = 2
    c.train.steps_per_epoch = 8
    c.train.base_learning_rate = 0.5
    c.eval.knn_ks = (20, 5)
    c.eval.batch_size = 64
    return c
