"""What every command line of moco_tf shares: TensorFlow started without its C++ start-up lines,
a config file's problems and a failure as one line with an exit status.

`train.py`, `python -m moco_tf.eval.linear`, `moco_tf.convert.to_torch` / `torch_moco`,
`moco_tf.data.prepare` and `imagenet_val` use it; the library itself (`import moco_tf`) does not
touch fd 2. Imports no TensorFlow until `import_tensorflow`.
"""

import contextlib
import logging
import os
import re
import sys
import tempfile
import traceback

from absl import flags
from absl import logging as absl_logging

# What TensorFlow's C++ start-up writes to fd 2 on every run, whatever TF_CPP_MIN_LOG_LEVEL says
# (abseil logs them before InitializeLog, hence the date 0000): oneDNN and CUDA-probe notes, and
# on a CPU machine "E0000 ... failed call to cuInit". Other E/F lines are real and are shown.
STARTUP_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]0000 "
    r"|E0000 .*(failed call to cuInit|Unable to register cu(DNN|FFT|BLAS) factory)"
    # The second line of the I0000 CPU-feature note (with TF_CPP_MIN_LOG_LEVEL=0).
    r"|To enable the following instructions: .*, in other operations, rebuild TensorFlow")


def fail(kind, error, status):
    """Prints `kind: error` as the last line on stderr and exits with `status` (2: an input
    mistake the user can fix; 1: a run that failed; 128 + N: stopped by signal N)."""
    print(f"{kind}: {error}", file=sys.stderr)
    sys.exit(status)


def one_line(error: BaseException) -> str:
    """`Type: message` on one line (an exception's text may span several)."""
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


def parse_flags(argv):
    """absl's flag parsing for a command line with a `--config` file flag (`app.run(main,
    flags_parser=parse_flags)`); a config file that cannot load and a mistyped or ill-typed
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
        fail("Config error", " ".join(message.split()), 2)
    # ml_collections reports a missing or unreadable file lazily, at the first access.
    problem = _config_file_problem(argv) or _config_type_problem(argv)
    if problem is None:
        return parsed
    fail("Config error", " ".join(problem.split()), 2)


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
            return f"the config file {path} cannot be loaded: {one_line(e)}"
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
        return f"the config file {path} cannot be read: {one_line(e)}"
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
        return f"the config file {path} failed to load: {one_line(e)}{where(e)}."
    if not callable(getattr(module, "get_config", None)):
        return (f"the config file {path} has no get_config() function (a config file defines "
                f"get_config(variant=\"\") returning a ConfigDict; see configs/synthetic.py).")
    try:
        module.get_config(*([variant] if variant else []))
    except ValueError as e:  # the config's own message (e.g. an unknown variant)
        message = " ".join(str(e).split())
        return message if path in message else f"get_config() in {path}: {message}"
    except Exception as e:  # noqa: BLE001
        return f"get_config() in {path} failed: {one_line(e)}{where(e)}."
    return None


@contextlib.contextmanager
def startup_noise_hidden(hide=True):
    """Runs the block (TensorFlow's import and first device query) with fd 2 going to a
    temporary file, then writes back every line of it that is not `STARTUP_NOISE`: the C++
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
                    if not STARTUP_NOISE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def tensorflow_logs_wanted() -> bool:
    """The user asked for TensorFlow's own logs: `TF_CPP_MIN_LOG_LEVEL` set below our default 2."""
    return os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2").strip() in ("0", "1")


def import_tensorflow(show=None):
    """Imports TensorFlow and lists its devices (where CUDA's probe logs) with its C++ start-up
    lines hidden, unless `show` (default: `tensorflow_logs_wanted()`). Call it before anything
    imports TensorFlow or Keras; returns the module."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with startup_noise_hidden(hide=not (tensorflow_logs_wanted() if show is None else show)):
        import tensorflow as tf

        tf.config.list_physical_devices()
    return tf


def hide_log_noise():
    """Drops TensorFlow's INFO lines ("Sharding callback duration" at every checkpoint,
    SavedModel fingerprints; some come through TF's logger, some through absl's, as tfds' do)
    and tfds' misleading "Variant folder" warning from absl's logger."""
    absl_logger = absl_logging.get_absl_logger()
    if _not_noise not in absl_logger.filters:
        absl_logger.addFilter(_not_noise)


def _not_noise(record) -> bool:
    """Keeps a log record unless it is below WARNING and logged from inside TensorFlow, or tfds'
    "Variant folder D/NAME/VERSION has no dataset_info.json": tfds warns so while it looks for a
    prepared copy that does not exist; the one-line Data error that follows says where it looked
    and how to prepare it."""
    if f"{os.sep}tensorflow_datasets{os.sep}" in record.pathname:
        return not str(record.msg).startswith("Variant folder ")
    return record.levelno >= logging.WARNING or (
        f"{os.sep}tensorflow{os.sep}" not in record.pathname)
