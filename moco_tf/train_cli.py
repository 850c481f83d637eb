"""Train MoCo from a config: `python train.py --config=configs/moco_v2.py --workdir=runs/v2`
(from a checkout) or `moco-tf-train --config=moco_v2 --workdir=runs/v2` (installed).

Override any config value on the command line, e.g. `--config.train.batch_size=128`; pick a config
variant after a colon, e.g. `--config=configs/fashion_mnist.py:smoke`. `--config=NAME` without a
file of that name takes the bundled `configs/NAME.py`. Train on all local GPUs with
`--config.train.strategy=mirrored` (multi_worker: several hosts via TF_CONFIG; tpu: a TPU VM).
Log detail: absl's `--verbosity` (default: INFO from moco_tf, WARNING from TensorFlow).
"""

import os
import signal
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where logs, checkpoints, results and exports go.")
flags.mark_flags_as_required(["config", "workdir"])


def _no_tensorflow_info(record) -> bool:
    """Keeps a log record unless it is below WARNING and logged from inside TensorFlow."""
    return record.levelno >= logging.converter.STANDARD_WARNING or (
        f"{os.sep}tensorflow{os.sep}" not in record.pathname)


def _stop_on_sigterm(signum, frame):
    """Preemption (spot and TPU VMs, SLURM, Kubernetes) and `kill` send SIGTERM: stop as on
    Ctrl-C, between steps, with a checkpoint and the line saying how to resume."""
    del frame
    _received.append(signum)
    raise KeyboardInterrupt


_received = []  # the signal that stopped the run (exit status 128 + it)


def _fail(kind, error, status):
    print(f"{kind}: {error}", file=sys.stderr)
    sys.exit(status)


def _unknown_override(argv):
    """The `--config.a.b=` override naming a key the config does not have, in validate()'s words."""
    from moco_tf import config as config_lib

    known = config_lib.flat_keys()
    paths = [a[len("--config."):].split("=")[0] for a in argv if a.startswith("--config.")]
    return config_lib.unknown_key_message(next((p for p in paths if p not in known), "?"))


def _parse_flags(argv):
    """absl's flag parsing; a mistyped or ill-typed `--config.*` override becomes one
    "Config error" line and exit status 2, like a mistake inside the config file."""
    try:
        parsed = flags.FLAGS(argv)
        problem = _config_file_problem(argv)  # ml_collections reports a missing file lazily
        if problem is None:
            return parsed
        message = problem
    except AttributeError:  # ml_collections: an override of a key the config does not have
        message = _unknown_override(argv)
    except (flags.Error, OSError, SyntaxError) as e:  # incl. a config file that cannot load
        message = _config_file_problem(argv) or str(e)
        if "Traceback (most recent call last)" in message:  # keep the error, not the wall
            message = message.strip().splitlines()[-1]
    _fail("Config error", " ".join(message.split()), 2)


def _config_file_problem(argv):
    """One sentence on why `--config=FILE` cannot load (missing file, syntax error), or None."""
    arg = next((a for a in argv if a.startswith("--config=")), None)
    if arg is None:
        return None
    path = arg[len("--config="):].partition(":")[0]
    if not os.path.isfile(path):
        return (f"the config file {path} does not exist (give a path such as "
                f"configs/fashion_mnist.py, or the name of a bundled config).")
    try:
        compile(open(path).read(), path, "exec")
    except SyntaxError as e:
        return f"the config file {path} has a syntax error at line {e.lineno}: {e.msg}."
    return None


def main(argv):
    del argv
    from moco_tf import config as config_lib  # no TensorFlow yet: config mistakes show at once

    try:
        config_lib.validate(_CONFIG.value)
    except config_lib.ConfigError as e:
        _fail("Config error", e, 2)
    from moco_tf import errors, train_lib

    if not any(a.startswith(("--verbosity", "-v=", "--v=")) for a in sys.argv[1:]):
        logging.set_verbosity(logging.INFO)  # moco_tf's progress lines by default
        # TensorFlow's INFO lines ("Sharding callback duration" at every checkpoint, SavedModel
        # fingerprints) are noise here: some come through TF's logger, some through absl's.
        logging.get_absl_logger().addFilter(_no_tensorflow_info)
    import tensorflow as tf

    tf.get_logger().setLevel("WARNING")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        _, results = train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except config_lib.ConfigError as e:  # checks that need TensorFlow (devices, replicas)
        _fail("Config error", e, 2)
    except config_lib.DataError as e:  # the data given cannot be used: fix it, like a config
        _fail("Data error", e, 2)
    except errors.CLEAR_ERRORS as e:  # NaN, full disk, workdir in use, out of memory
        _fail("Error", e, 1)
    except errors.Interrupted as e:  # Ctrl-C or SIGTERM: saved, and how to resume
        _fail("Interrupted", e, 128 + (_received[-1] if _received else signal.SIGINT))
    summary = ", ".join(
        f"{k}={results[k] if results[k] is not None else 'n/a'}"
        for k in ("knn_top1", "knn_top1_k20", "images_per_sec") if k in results
    )
    print(f"Done. {summary}. Results: {os.path.join(_WORKDIR.value, 'results.json')}")
    if "export_dir" in results:
        print(f"Exported query backbone: {results['export_dir']}")


def bundled_config(argv):
    """argv with `--config=NAME[:variant]` pointing at the bundled configs/NAME.py when NAME is
    not a file: an installed moco_tf has no checkout to give a path into."""
    out = []
    for arg in argv:
        if arg.startswith("--config="):
            path, colon, variant = arg[len("--config="):].partition(":")
            if not os.path.exists(path):
                import configs

                name = os.path.basename(path)
                name = name if name.endswith(".py") else name + ".py"
                candidate = os.path.join(os.path.dirname(configs.__file__), name)
                if os.path.exists(candidate):
                    arg = f"--config={candidate}{colon}{variant}"
        out.append(arg)
    return out


def run():
    """The `moco-tf-train` entry point (and `python train.py`)."""
    sys.argv = bundled_config(sys.argv)
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
