"""Train MoCo from a config: `python train.py --config=configs/moco_v2.py --workdir=runs/v2`.

The command line lives in `moco_tf/train_cli.py` (also installed as `moco-tf-train`); run it
with `--help` for the flags.
"""

from moco_tf.train_cli import run

if __name__ == "__main__":
    run()
