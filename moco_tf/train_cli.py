"""Train MoCo from a config: `python train.py --config=configs/moco_v2.py --workdir=runs/v2`
(from a checkout) or `moco-tf-train --config=moco_v2 --workdir=runs/v2` (installed).

Override any config value on the command line, e.g. `--config.train.batch_size=128`; pick a config
variant after a colon, e.g. `--config=configs/fashion_mnist.py:smoke`. `--config=NAME` without a
file of that name takes the bundled `configs/NAME.py`. Train on all local GPUs with
`--config.train.strategy=mirrored` (multi_worker: several hosts via TF_CONFIG; tpu: a TPU VM).
Log detail: absl's `--verbosity` / `-v` (default: INFO from moco_tf, WARNING from TensorFlow;
`-v 1` also shows TensorFlow's C++ start-up lines, hidden otherwise).
"""

import contextlib
import os
import re
import signal
import sys
import tempfile
import traceback

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where logs, checkpoints, results and exports go.")
flags.mark_flags_as_required(["config", "workdir"])

# What TensorFlow's C++ start-up writes to fd 2 on every run, whatever TF_CPP_MIN_LOG_LEVEL says
# (abseil logs them before InitializeLog, hence the date 0000): oneDNN and CUDA-probe notes, and
# on a CPU machine "E0000 ... failed call to cuInit". Other E/F lines are real and are shown.
_STARTUP_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]0000 "
    r"|E0000 .*(failed call to cuInit|Unable to register cu(DNN|FFT|BLAS) factory)"
    # The second line of the I0000 CPU-feature note (with TF_CPP_MIN_LOG_LEVEL=0).
    r"|To enable the following instructions: .*, in other operations, rebuild TensorFlow")


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


def _interrupt_status():
    return 128 + (_received[-1] if _received else signal.SIGINT)


def _fail(kind, error, status):
    print(f"{kind}: {error}", file=sys.stderr)
    sys.exit(status)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _unknown_override(argv):
    """The `--config.a.b=` override naming a key the config does not have, in validate()'s words,
    or None if every override names a known key."""
    from moco_tf import config as config_lib

    known = config_lib.flat_keys()
    paths = [a[len("--config."):].split("=")[0] for a in argv if a.startswith("--config.")]
    unknown = next((p for p in paths if p not in known), None)
    return None if unknown is None else config_lib.unknown_key_message(unknown)


def _parse_flags(argv):
    """absl's flag parsing; a config file that cannot load and a mistyped or ill-typed
    `--config.*` override become one "Config error" line and exit status 2, like a mistake
    inside the config file."""
    try:
        parsed = flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001  loading a config file runs arbitrary code
        # The file's own problem first (it also explains errors ml_collections re-raises with a
        # traceback inside their message), then the override's.
        message = _config_file_problem(argv, load=True)
        if message is None and isinstance(e, AttributeError):  # an override of no known key
            message = _unknown_override(argv)
        if message is None:
            message = str(e)
            if "Traceback (most recent call last)" in message:  # keep the error, not the wall
                message = message.strip().splitlines()[-1]
        _fail("Config error", " ".join(message.split()), 2)
    # ml_collections reports a missing or unreadable file lazily, at the first access.
    problem = _config_file_problem(argv) or _config_type_problem(argv)
    if problem is None:
        return parsed
    _fail("Config error", " ".join(problem.split()), 2)


def _config_arg(argv):
    arg = next((a for a in argv if a.startswith("--config=")), None)
    if arg is None:
        return None, None
    path, _, variant = arg[len("--config="):].partition(":")
    return path, variant


def _config_type_problem(argv):
    """get_config() returned something else than a ConfigDict (e.g. a dict): one sentence."""
    import ml_collections

    value = flags.FLAGS["config"].value
    if value is None or isinstance(value, ml_collections.ConfigDict):
        return None
    path, _ = _config_arg(argv)
    if type(value).__name__ == "_ErrorConfig":  # ml_collections' deferred load failure
        try:
            value.lock
        except Exception as e:  # noqa: BLE001  the stored error
            return f"the config file {path} cannot be loaded: {_one_line(e)}"
    return (f"get_config() in {path} returned a {type(value).__name__}; it must return an "
            f"ml_collections.ConfigDict (start from moco_tf.config.defaults(), as "
            f"configs/synthetic.py does).")


def _config_file_problem(argv, load=False):
    """One sentence on why `--config=FILE` cannot load (missing file, syntax error; with `load`,
    also an error while running it or its get_config(), or no get_config), or None."""
    path, variant = _config_arg(argv)
    if path is None:
        return None
    if not os.path.isfile(path):
        return (f"the config file {path} does not exist (give a path such as "
                f"configs/fashion_mnist.py, or the name of a bundled config).")
    try:
        compile(open(path).read(), path, "exec")
    except SyntaxError as e:
        return f"the config file {path} has a syntax error at line {e.lineno}: {e.msg}."
    except (OSError, UnicodeDecodeError) as e:
        return f"the config file {path} cannot be read: {_one_line(e)}"
    if not load:
        return None
    import importlib.util

    def where(error):  # the line of the config file the error came from
        lines = [f.lineno for f in traceback.extract_tb(error.__traceback__)
                 if os.path.abspath(f.filename) == os.path.abspath(path)]
        return f" (line {lines[-1]})" if lines else ""

    spec = importlib.util.spec_from_file_location("_moco_tf_config_check", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001
        return f"the config file {path} failed to load: {_one_line(e)}{where(e)}."
    if not callable(getattr(module, "get_config", None)):
        return (f"the config file {path} has no get_config() function (a config file defines "
                f"get_config(variant=\"\") returning a ConfigDict; see configs/synthetic.py).")
    try:
        module.get_config(*([variant] if variant else []))
    except ValueError as e:  # the config's own message (e.g. an unknown variant)
        message = " ".join(str(e).split())
        return message if path in message else f"get_config() in {path}: {message}"
    except Exception as e:  # noqa: BLE001
        return f"get_config() in {path} failed: {_one_line(e)}{where(e)}."
    return None


@contextlib.contextmanager
def _startup_noise_hidden(hide=True):
    """Runs the block (TensorFlow's import and first device query) with fd 2 going to a
    temporary file, then writes back every line of it that is not `_STARTUP_NOISE`: the C++
    start-up lines cannot be turned off otherwise. Python errors and tracebacks, absl lines and
    any other C++ line are kept, in order."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no fd 2 (e.g. an embedded interpreter): nothing to hide
        yield
        return
    if not hide:
        os.close(saved)
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace")
            kept = [line for line in text.splitlines(keepends=True)
                    if not _STARTUP_NOISE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def main(argv):
    del argv
    from moco_tf import config as config_lib  # no TensorFlow yet: config mistakes show at once

    try:
        config_lib.validate(_CONFIG.value)
    except config_lib.ConfigError as e:
        _fail("Config error", e, 2)
    except Exception as e:  # noqa: BLE001  a check that itself failed on an odd value
        _fail("Config error", f"the config could not be checked ({_one_line(e)}); look for a "
                              f"value of the wrong kind in the config file or the overrides.", 2)
    # Before TensorFlow's import: it takes seconds, and a SIGTERM then must not kill us silently.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    workdir = _WORKDIR.value
    try:
        results = _train(config_lib, workdir)
    except KeyboardInterrupt:  # before training began (TensorFlow's start-up, building, restoring)
        _fail("Interrupted", f"Stopped before training began: nothing was trained or saved; "
                             f"checkpoints already in {os.path.join(workdir, 'checkpoints')} are "
                             f"kept. Rerun the same command to start (or resume).",
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
        # TensorFlow's INFO lines ("Sharding callback duration" at every checkpoint, SavedModel
        # fingerprints) are noise here: some come through TF's logger, some through absl's.
        logging.get_absl_logger().addFilter(_no_tensorflow_info)
    with _startup_noise_hidden(hide=not (verbosity.present and verbosity.value >= 1)):
        import tensorflow as tf

        tf.config.list_physical_devices()  # CUDA's probe logs here
        from moco_tf import checkpoint as checkpoint_lib
        from moco_tf import errors, train_lib

    tf.get_logger().setLevel("WARNING")
    try:
        _, results = train_lib.train_and_evaluate(_CONFIG.value, workdir)
    except config_lib.ConfigError as e:  # checks that need TensorFlow (devices, replicas)
        _fail("Config error", e, 2)
    except config_lib.DataError as e:  # the data given cannot be used: fix it, like a config
        _fail("Data error", e, 2)
    except checkpoint_lib.CheckpointMismatch as e:  # another run's workdir: an input mistake
        _fail("Checkpoint error", e, 2)
    except errors.CLEAR_ERRORS as e:  # NaN, full disk, workdir in use, out of memory
        _fail("Error", e, 1)
    except errors.Interrupted as e:  # Ctrl-C or SIGTERM: saved, and how to resume
        _fail("Interrupted", e, _interrupt_status())
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
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
