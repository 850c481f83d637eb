"""Sorts ILSVRC2012's flat validation folder into one folder per class (``val/<wnid>/``).

image-net.org ships the 50,000 validation images in one folder (``ILSVRC2012_val_00000001.JPEG``
...); an image folder needs them under their class, like the training images. The labels are
the ones tensorflow-datasets ships (``validation_labels.txt``: the wnid of image i on line i).

  python -m moco_tf.data.imagenet_val /data/imagenet/val            # moves the files
  python -m moco_tf.data.imagenet_val /data/imagenet/val --dry_run  # only says what it would do
"""
from __future__ import annotations

import argparse
import os
import re
import sys

_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG$")


def validation_labels() -> list[str]:
    """The wnid of every validation image, in file-number order (from tensorflow-datasets)."""
    from moco_tf import cli

    cli.import_tensorflow()  # tfds imports it; without its C++ start-up lines
    import tensorflow_datasets as tfds

    path = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012",
                        "validation_labels.txt")
    with open(path) as f:
        return f.read().split()


def sort_validation_folder(folder: str, dry_run: bool = False) -> dict[str, int]:
    """Moves ``folder/ILSVRC2012_val_N.JPEG`` to ``folder/<wnid>/``; returns images per wnid.

    Files with other names are left alone. Raises ValueError if no file has a validation name.
    """
    labels = validation_labels()
    moves = []
    for name in sorted(os.listdir(folder)):
        match = _NAME.match(name)
        if match and os.path.isfile(os.path.join(folder, name)):
            index = int(match.group(1))
            if not 1 <= index <= len(labels):
                raise ValueError(f"{name}: no ILSVRC2012 validation image has number {index}")
            moves.append((name, labels[index - 1]))
    if not moves:
        raise ValueError(f"{folder} has no ILSVRC2012_val_*.JPEG files to sort")
    counts: dict[str, int] = {}
    for name, wnid in moves:
        counts[wnid] = counts.get(wnid, 0) + 1
        if not dry_run:
            os.makedirs(os.path.join(folder, wnid), exist_ok=True)
            os.replace(os.path.join(folder, name), os.path.join(folder, wnid, name))
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="the flat ILSVRC2012 validation folder")
    parser.add_argument("--dry_run", action="store_true", help="count, move nothing")
    args = parser.parse_args(argv)
    try:
        counts = sort_validation_folder(args.folder, args.dry_run)
    except (OSError, ValueError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    verb = "Would move" if args.dry_run else "Moved"
    print(f"{verb} {sum(counts.values())} images into {len(counts)} class folders of "
          f"{args.folder}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
