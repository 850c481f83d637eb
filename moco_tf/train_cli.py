"""Train MoCo from a config: `python train.py --config=configs/moco_v2.py --workdir=runs/v2`
(from a checkout) or `moco-tf-train --config=moco_v2 --workdir=runs/v2` (installed).

Override any config value on the command line, e.g. `--config.train.batch_size=128`; pick a config
variant after a colon, e.g. `--config=configs/fashion_mnist.py:smoke`. `--config=NAME` without a
file of that name takes the bundled `configs/NAME.py`. Train on all local GPUs with
`--config.train.strategy=mirrored` (multi_worker: several hosts via TF_CONFIG; tpu: a TPU VM).
Log detail: absl's `--verbosity` / `-v` (default: INFO from moco_tf, WARNING from TensorFlow;
`-v 1` or TF_CPP_MIN_LOG_LEVEL=0 also shows TensorFlow's C++ start-up lines, hidden otherwise).
"""

import os
import signal
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from moco_tf import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where logs, checkpoints, results and exports go.")
flags.mark_flags_as_required(["config", "workdir"])


def _stop_on_sigterm(signum, frame):
    """Preemption (spot and TPU VMs, SLURM, Kubernetes) and `kill` send SIGTERM: stop as on
    Ctrl-C, between steps, with a checkpoint and the line saying how to resume."""
    del frame
    _received.append(signum)
    raise KeyboardInterrupt


_received = []  # the signal that stopped the run (exit status 128 + it)


def _interrupt_status():
    return 128 + (_received[-1] if _received else signal.SIGINT)


def main(argv):
    del argv
    from moco_tf import config as config_lib  # no TensorFlow yet: config mistakes show at once

    try:
        config_lib.validate(_CONFIG.value)
    except config_lib.ConfigError as e:
        cli.fail("Config error", e, 2)
    except Exception as e:  # noqa: BLE001  a check that itself failed on an odd value
        cli.fail("Config error", f"the config could not be checked ({cli.one_line(e)}); look "
                                 f"for a value of the wrong kind in the config file or the "
                                 f"overrides.", 2)
    # Before TensorFlow's import: it takes seconds, and a SIGTERM then must not kill us silently.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    workdir = _WORKDIR.value
    try:
        results = _train(config_lib, workdir)
    except KeyboardInterrupt:  # before training began (TensorFlow's start-up, building, restoring)
        cli.fail("Interrupted", f"Stopped before training began: nothing was trained or saved; "
                                f"checkpoints already in {os.path.join(workdir, 'checkpoints')} "
                                f"are kept. Rerun the same command to start (or resume).",
                 _interrupt_status())
    summary = ", ".join(
        f"{k}={results[k] if results[k] is not None else 'n/a'}"
        for k in ("knn_top1", "knn_top1_k20", "images_per_sec") if k in results
    )
    print(f"Done. {summary}. Results: {os.path.join(workdir, 'results.json')}")
    if "export_dir" in results:
        print(f"Exported query backbone: {results['export_dir']}")


def _train(config_lib, workdir):
    """TensorFlow started quietly, then `train_and_evaluate`; each failure a user can act on
    becomes one line and its exit status."""
    verbosity = flags.FLAGS["verbosity"]
    if not verbosity.present:  # -v N, -v=N, --verbosity=N: absl has set it
        logging.set_verbosity(logging.INFO)  # moco_tf's progress lines by default
        cli.hide_log_noise()
    tf = cli.import_tensorflow(
        show=(verbosity.present and verbosity.value >= 1) or cli.tensorflow_logs_wanted())
    from moco_tf import checkpoint as checkpoint_lib
    from moco_tf import errors, train_lib

    tf.get_logger().setLevel("WARNING")
    try:
        _, results = train_lib.train_and_evaluate(_CONFIG.value, workdir)
    except config_lib.ConfigError as e:  # checks that need TensorFlow (devices, replicas)
        cli.fail("Config error", e, 2)
    except config_lib.DataError as e:  # the data given cannot be used: fix it, like a config
        cli.fail("Data error", e, 2)
    except checkpoint_lib.CheckpointMismatch as e:  # another run's workdir: an input mistake
        cli.fail("Checkpoint error", e, 2)
    except errors.CLEAR_ERRORS as e:  # NaN, full disk, workdir in use, out of memory
        cli.fail("Error", e, 1)
    except errors.Interrupted as e:  # Ctrl-C or SIGTERM: saved, and how to resume
        cli.fail("Interrupted", e, _interrupt_status())
    return results


def bundled_config(argv):
    """argv with `--config=NAME[:variant]` pointing at the bundled configs/NAME.py when NAME is
    not a file: an installed moco_tf has no checkout to give a path into."""
    out = []
    for arg in argv:
        if arg.startswith("--config="):
            path, colon, variant = arg[len("--config="):].partition(":")
            if not os.path.exists(path):
                from moco_tf import configs

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
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
