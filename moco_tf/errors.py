"""The failures a user can act on, and the rewriting of TensorFlow's errors into them.

`train.py` prints any of `CLEAR_ERRORS` as one line without a traceback (exit status 1; config
and data mistakes, `config.ConfigError` / `config.DataError`, and a workdir of another run,
`checkpoint.CheckpointMismatch`, exit 2 before training starts).
"""
import contextlib

import tensorflow as tf

from moco_tf import callbacks as callbacks_lib
from moco_tf import checkpoint as checkpoint_lib
from moco_tf import config as config_lib
from moco_tf import workdir as workdir_lib
from moco_tf.data import datasets


class OutOfMemoryError(RuntimeError):
    """TensorFlow ran out of memory; the message names the config values to turn down."""


class EvaluationError(RuntimeError):
    """Training and saving worked, the evaluation did not; the message says what is kept."""


class Interrupted(RuntimeError):
    """Ctrl-C or SIGTERM during training: a checkpoint was saved; the message says how to resume."""


# Failures whose message says what to do: train.py prints them as one line, without a traceback.
CLEAR_ERRORS = (config_lib.DataError, workdir_lib.WorkdirError, checkpoint_lib.CheckpointError,
                callbacks_lib.NonFiniteError, OutOfMemoryError, EvaluationError)


def oom_hint(config) -> str:
    t, d = config.train, config.data
    return (
        f"Turn down train.batch_size (now {t.batch_size}; keep moco.queue_size a multiple of it), "
        f"data.image_size (now {d.image_size}), moco.queue_size (now {config.moco.queue_size}), "
        f"model.width (now {config.model.width}) or eval.batch_size (now "
        f"{config.eval.batch_size}, the kNN monitor), or set precision=mixed_bfloat16 "
        f"(mixed_float16 on GPUs; now {config.precision}) to halve the activations."
    )


@contextlib.contextmanager
def explained_failures(config):
    """Re-raises the failures a user can fix (out of memory, full disk, a bad image with
    data.on_bad_image=error) as one of `CLEAR_ERRORS`, with a message that says how."""
    try:
        yield
    except (tf.errors.ResourceExhaustedError, MemoryError, OSError) as e:
        first = workdir_lib.first_line(e)
        if workdir_lib.is_disk_full(e):  # TF reports a full disk as ResourceExhausted too
            raise workdir_lib.WorkdirError(
                f"A write to the disk failed ({first}). Free some space and rerun the same "
                f"command: training resumes from the last checkpoint.") from e
        if isinstance(e, OSError):
            raise
        raise OutOfMemoryError(f"Out of memory ({first}). {oom_hint(config)}") from e
    except tf.errors.InvalidArgumentError as e:
        message = datasets.data_error_in(e.message)
        if message is None:
            raise
        raise config_lib.DataError(message) from e
