"""Train MoCo from a config: `python train.py --config=configs/moco_v2.py --workdir=runs/v2`.

Override any config value on the command line, e.g. `--config.train.batch_size=128`; pick a config
variant after a colon, e.g. `--config=configs/fashion_mnist.py:smoke`. Train on all local GPUs with
`--config.train.strategy=mirrored` (multi_worker: several hosts via TF_CONFIG; tpu: a TPU VM).
"""

import os
import re
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where logs, checkpoints, results and exports go.")
flags.mark_flags_as_required(["config", "workdir"])


def _fail(kind, error, status):
    print(f"{kind}: {error}", file=sys.stderr)
    sys.exit(status)


def _unknown_override(error, argv):
    """ml_collections' error for `--config.a.b_typo=1` in validate()'s words."""
    names = re.findall(r"[\"']([\w.]+)\\?[\"']", error)  # the bad key, then the suggestion
    key = names[0] if names else "?"
    path = next((a[len("--config."):].split("=")[0] for a in argv
                 if a.startswith("--config.") and key in a.split("=")[0].split(".")), key)
    parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
    hint = f" Did you mean '{parent}{names[1]}'?" if len(names) > 1 else ""
    return f"Unknown config key '{path}'.{hint}"


def _parse_flags(argv):
    """absl's flag parsing; a mistyped or ill-typed `--config.*` override becomes one
    "Config error" line and exit status 2, like a mistake inside the config file."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = str(e)
    except AttributeError as e:  # ml_collections: an override of a key the config does not have
        message = _unknown_override(str(e), argv)
    _fail("Config error", " ".join(message.split()), 2)


def main(argv):
    del argv
    from moco_tf import config as config_lib  # no TensorFlow yet: config mistakes show at once

    try:
        config_lib.validate(_CONFIG.value)
    except config_lib.ConfigError as e:
        _fail("Config error", e, 2)
    from moco_tf import train_lib

    logging.set_verbosity(logging.INFO)
    try:
        _, results = train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except config_lib.ConfigError as e:  # checks that need TensorFlow (devices, replicas)
        _fail("Config error", e, 2)
    except config_lib.DataError as e:  # the data given cannot be used: fix it, like a config
        _fail("Data error", e, 2)
    except train_lib.CLEAR_ERRORS as e:  # NaN, full disk, workdir in use, out of memory
        _fail("Error", e, 1)
    summary = ", ".join(
        f"{k}={results[k]}" for k in ("knn_top1", "knn_top1_k20", "images_per_sec") if k in results
    )
    print(f"Done. {summary}. Results: {os.path.join(_WORKDIR.value, 'results.json')}")
    if "export_dir" in results:
        print(f"Exported query backbone: {results['export_dir']}")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
