"""Train MoCo from a config: `python train.py --config=configs/moco_v2.py --workdir=runs/v2`.

Override any config value on the command line, e.g. `--config.train.batch_size=128`; pick a config
variant after a colon, e.g. `--config=configs/fashion_mnist.py:smoke`.
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where logs, checkpoints, results and exports go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from moco_tf import config as config_lib, train_lib

    logging.set_verbosity(logging.INFO)
    try:
        config_lib.validate(_CONFIG.value)
        _, results = train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except config_lib.ConfigError as e:
        print(f"Config error: {e}", file=sys.stderr)
        sys.exit(2)
    summary = ", ".join(
        f"{k}={results[k]}" for k in ("knn_top1", "knn_top1_k20", "images_per_sec") if k in results
    )
    print(f"Done. {summary}. Results: {os.path.join(_WORKDIR.value, 'results.json')}")
    if "export_dir" in results:
        print(f"Exported query backbone: {results['export_dir']}")


if __name__ == "__main__":
    app.run(main)
