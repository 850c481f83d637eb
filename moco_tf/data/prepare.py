"""Prepares a tfds dataset for training: ``download_and_prepare`` with progress bars.

    python -m moco_tf.data.prepare imagenet2012 --manual_dir=DIR [--data_dir=DIR]
    python -m moco_tf.data.prepare cifar10 [--data_dir=DIR]      # downloads it

What ``tfds build`` does, without its command line: in the pinned environment that imports
apache_beam at start-up and stops with ModuleNotFoundError. ``--manual_dir`` is the folder with
the files tfds cannot download itself (ImageNet: ``ILSVRC2012_img_train.tar`` and
``ILSVRC2012_img_val.tar`` from image-net.org). Training then reads the dataset from
``--data_dir`` (``data.data_dir``; default ``~/tensorflow_datasets``). Exit status 2 with one
line saying what to do when it cannot be prepared.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moco_tf.data.prepare",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("name", help="tfds dataset name, e.g. imagenet2012, imagenette, cifar10")
    parser.add_argument("--manual_dir", default="",
                        help="folder with the files tfds cannot download (ImageNet's tars)")
    parser.add_argument("--data_dir", default="",
                        help="where to prepare it (default: tfds' ~/tensorflow_datasets)")
    args = parser.parse_args(argv)

    import ml_collections

    from moco_tf import cli

    cli.import_tensorflow()  # without its C++ start-up lines
    cli.hide_log_noise()
    import tensorflow_datasets as tfds

    from moco_tf.config import DataError
    from moco_tf.data import tfds_source

    tfds.display_progress_bar(True)
    data_cfg = ml_collections.ConfigDict(dict(
        name=args.name, data_dir=args.data_dir, tfds_manual_dir=args.manual_dir,
        tfds_download=True))
    try:
        where = tfds_source.prepare(data_cfg, by_hand=True)
    except DataError as e:
        print(f"Data error: {e}", file=sys.stderr)
        return 2
    b = tfds_source.builder(data_cfg)
    splits = ", ".join(f"{name} ({split.num_examples} examples)"
                       for name, split in sorted(b.info.splits.items()))
    print(f"{args.name} is prepared in {where}: {splits}. Train on it with "
          f"--config.data.source=tfds --config.data.name={args.name}"
          + (f" --config.data.data_dir={args.data_dir}" if args.data_dir else "") + ".")
    return 0


if __name__ == "__main__":
    sys.exit(main())
