"""Checkpoints of the complete training state, for an exact resume after any crash (even kill -9).

A checkpoint holds everything the next step reads:
  model      query encoder, key encoder (weights and BN statistics), queue, queue pointer, the EMA
             momentum m, the metric accumulators;
  optimizer  its slots (SGD momentum buffers, ...) and `iterations` (the step, which drives the lr
             and momentum schedules and the shuffle-BN permutation);
  position   training batches consumed (the data position: the pipeline restarts at this batch)
             and the epoch;
  run        the seed and the global batch size, checked at restore: resuming a workdir with a
             different seed or batch size would silently continue another run.
RNG state: every random draw of a step is stateless, a pure function of (seed, step) —
augmentation of batch i uses fold_in(seed, i), shuffle-BN uses (seed, step) — so (seed, position)
is the RNG state. Keras `SeedGenerator`s, if a model has any, are variables of the model and are
saved with it.

Why `tf.train.Checkpoint` + `CheckpointManager` and not `keras.callbacks.BackupAndRestore`:
BackupAndRestore (Keras 3.15) restores the weights and restarts at the beginning of the epoch, so
a run killed mid-epoch repeats that epoch's first steps with the later weights and the data
position is lost; it keeps one backup, overwritten in place. TF's
checkpoints write `ckpt-N.data/.index` to temporary names and rename them when complete, then
update the `checkpoint` state file atomically: a crash while writing never leaves a checkpoint that
looks complete. Against later damage (a truncated copy, a bad disk) `restore_latest` reads every
tensor of a candidate (TF verifies each tensor's CRC32C) before touching any variable, and falls
back to the previous checkpoint with a warning.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import traceback

import tensorflow as tf
from absl import logging

from moco_tf import workdir as workdir_lib

# 2: optimizers with PyTorch's momentum buffer (v = mu v + g), MoCo's key_encoder/negatives parts.
FORMAT = 2
_PREFIX = "ckpt"


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that belongs to a different run."""


class CheckpointMismatch(CheckpointError):
    """An intact checkpoint of another model, run (seed, batch size) or moco_tf version: the
    workdir does not belong to this config (train.py: exit status 2, like a config mistake)."""


def describe_step(step: int, steps_per_epoch: int, epochs: int | None = None) -> str:
    """Where global step `step` (batches done) is in the run, as the logs say it everywhere:
    "epoch 2 of 3, step 5 of 7" (both 1-based: the epoch the step belongs to)."""
    if steps_per_epoch < 1 or step < 1:
        return "before the first step"
    epoch, within = divmod(step - 1, steps_per_epoch)
    of = f" of {epochs}" if epochs else ""
    return f"epoch {epoch + 1}{of}, step {within + 1} of {steps_per_epoch}"


class Checkpointer:
    """Saves and restores the training state of a compiled Keras model in `directory`.

    Args:
      directory: where `ckpt-<step>.{index,data-*}` and the `checkpoint` state file go.
      model: the keras.Model (e.g. `MoCo`); its optimizer is saved with it.
      max_to_keep: the number of most recent checkpoints kept on disk.
      seed, batch_size: identify the run; a checkpoint with other values is refused.
      steps_per_epoch, epochs: only for the log lines ("step 12 of 21: epoch 2 of 3, ...").
    """

    def __init__(self, directory: str, model, *, max_to_keep: int = 3, seed: int = 0,
                 batch_size: int = 0, steps_per_epoch: int = 0, epochs: int = 0):
        self.directory = directory
        self.model = model
        self._steps_per_epoch, self._epochs = int(steps_per_epoch), int(epochs)
        self.position = tf.Variable(0, dtype=tf.int64, trainable=False, name="data_position")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self._run = {"seed": int(seed), "batch_size": int(batch_size)}
        self._run_vars = {k: tf.Variable(v, dtype=tf.int64, trainable=False, name=k)
                          for k, v in self._run.items()}
        # 0 until a restore fills it: checkpoints older than format 2 do not have it.
        self.format = tf.Variable(0, dtype=tf.int64, trainable=False, name="format")
        objects = {"model": model, "data_position": self.position, "epoch": self.epoch,
                   "format": self.format, **self._run_vars}
        if getattr(model, "optimizer", None) is not None:
            objects["optimizer"] = model.optimizer
        self.checkpoint = tf.train.Checkpoint(**objects)
        # `candidates` also finds checkpoints by their .index files: a damaged `checkpoint`
        # state file must not block a resume. TF only warns about most damage, but refuses
        # some (an empty file): that one is moved aside.
        try:
            self.manager = tf.train.CheckpointManager(
                self.checkpoint, directory, max_to_keep=max_to_keep, checkpoint_name=_PREFIX)
        except ValueError as e:  # "Invalid checkpoint state loaded from ..."
            state = os.path.join(directory, "checkpoint")
            os.replace(state, state + ".damaged")
            logging.warning("The checkpoint state file %s is damaged (%s); moved it to %s.",
                            state, workdir_lib.first_line(e), state + ".damaged")
            self.manager = tf.train.CheckpointManager(
                self.checkpoint, directory, max_to_keep=max_to_keep, checkpoint_name=_PREFIX)

    # --- saving ---------------------------------------------------------------------------

    def save(self, step: int, epoch: int) -> str:
        """Writes checkpoint `ckpt-<step>` (step = batches consumed) and prunes old ones."""
        self.position.assign(step)
        self.epoch.assign(epoch)
        self.format.assign(FORMAT)
        for k, v in self._run.items():
            self._run_vars[k].assign(v)
        previous = self.manager.latest_checkpoint
        try:
            path = self.manager.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError) as e:
            # A full or read-only disk: TF writes to temporary names and renames only complete
            # files, so the previous checkpoint and the state file are untouched. Remove what
            # was written of this one, to give the space back.
            removed = _remove_partial(self.directory, step)
            free = workdir_lib.format_bytes(workdir_lib.free_bytes(self.directory))
            raise CheckpointError(
                f"Could not write checkpoint {_PREFIX}-{step} in {self.directory}: "
                f"{workdir_lib.first_line(e)} ({free} free after removing {removed} partial "
                f"files). "
                + (f"The previous checkpoint {previous} is intact; free some space and rerun the "
                   f"same command to resume from it." if previous else
                   "No earlier checkpoint exists; free some space or use another --workdir.")
            ) from e
        if self._steps_per_epoch:
            total = f" of {self._steps_per_epoch * self._epochs}" if self._epochs else ""
            logging.info("Saved checkpoint %s (step %d%s: %s).", path, step, total,
                         describe_step(step, self._steps_per_epoch, self._epochs))
        else:
            logging.info("Saved checkpoint %s (step %d).", path, step)
        return path

    @property
    def latest_checkpoint(self) -> str | None:
        """The newest checkpoint this manager wrote or found, or None."""
        return self.manager.latest_checkpoint

    # --- restoring ------------------------------------------------------------------------

    def candidates(self) -> list[str]:
        """Checkpoint prefixes in `directory`, newest first.

        The union of the state file's list and the `.index` files on disk: the state file is
        written last, so a checkpoint completed just before a crash may be missing from it.
        """
        prefixes = set(self.manager.checkpoints) | set(checkpoints_in(self.directory))
        return sorted((p for p in prefixes if _number(p) >= 0), key=_number, reverse=True)

    def restore_latest(self) -> int | None:
        """Restores the newest readable checkpoint; returns its step, or None if there is none.

        A damaged checkpoint (unreadable index, truncated data, checksum mismatch) is skipped with
        a warning and the previous one is used. Raises `CheckpointError` if checkpoints exist but
        none is readable, and `CheckpointMismatch` (a `CheckpointError`) if the newest readable
        one does not fit the model (another architecture), belongs to a run with another seed
        or batch size, or was written by an older moco_tf.
        """
        candidates = self.candidates()
        if not candidates:
            return None
        # Slot variables must exist before a restore can fill them (Keras builds them lazily).
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        for prefix in candidates:
            problem = verify(prefix)
            if problem is None:
                try:
                    status = self.checkpoint.restore(prefix)
                except (ValueError, tf.errors.InvalidArgumentError) as e:
                    # Readable, but its tensors have other shapes: another model, not damage.
                    _expect_partial(e)
                    raise CheckpointMismatch(
                        f"{prefix} does not match this model "
                        f"({workdir_lib.first_line(e)[:300]}); was it written with another "
                        f"config (backbone, width, queue size)? Use another --workdir.") from None
                except tf.errors.OpError as e:
                    problem = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
            if problem is not None:
                logging.warning("Checkpoint %s is damaged (%s); trying the previous one.",
                                prefix, problem)
                continue
            found = int(self.format.numpy())
            if found != FORMAT:
                status.expect_partial()
                raise CheckpointMismatch(
                    f"{prefix} was written by an older moco_tf (checkpoint format {found}, this "
                    f"version writes {FORMAT}: PyTorch's SGD momentum buffer, key encoder and "
                    f"negatives as parts of the model); its optimizer state would mean something "
                    f"else now. Use another --workdir, or finish that run with the older version.")
            try:
                # Every variable of the model and optimizer must get a value: a checkpoint of
                # another architecture is not damage but a wrong workdir.
                status.assert_existing_objects_matched()
            except AssertionError as e:
                status.expect_partial()  # refused: TF's list of unrestored values is noise
                raise CheckpointMismatch(
                    f"{prefix} does not match this model ({str(e).splitlines()[0][:300]}); was it "
                    f"written with another config? Use another --workdir."
                ) from e
            self._check_same_run(prefix)
            return int(self.position.numpy())
        raise CheckpointError(
            f"No readable checkpoint in {self.directory} ({len(candidates)} damaged). Move them "
            f"away to start from scratch, or use another --workdir."
        )

    def _check_same_run(self, prefix):
        for key, expected in self._run.items():
            found = int(self._run_vars[key].numpy())
            if found != expected:
                raise CheckpointMismatch(
                    f"{prefix} was written with {key}={found}, but this run has {key}={expected}; "
                    f"resuming would not continue the same run. Use another --workdir."
                )


def _expect_partial(error: BaseException) -> None:
    """A restore that failed half-way (a tensor of another shape) leaves its restore coordinator
    alive, held by the model's deferred restorations; deleted later, it logs every value it did
    not restore, after our one-line refusal. Mark it partial, as `status.expect_partial()`
    does (the coordinator is a local of TF's restore, in the error's traceback)."""
    for frame, _ in traceback.walk_tb(error.__traceback__):
        for value in frame.f_locals.values():
            if type(value).__name__ == "_CheckpointRestoreCoordinator":
                try:
                    value.expect_partial = True
                except AttributeError:  # another TF version: the warnings stay, nothing worse
                    pass


def verify(prefix: str) -> str | None:
    """Reads every tensor of the checkpoint `prefix` (TF checks their CRC32C checksums).

    Returns None if the checkpoint is complete and intact, else a one-line description.
    """
    try:
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_dtype_map():
            reader.get_tensor(name)
    except Exception as e:  # noqa: BLE001  the reader maps TF statuses to many Python errors
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    return None


def _remove_partial(directory: str, step: int) -> int:
    """Deletes the files of an unfinished `ckpt-<step>` (its temporary and final names)."""
    removed = 0
    for path in glob.glob(os.path.join(directory, f"{_PREFIX}-{step}[._]*")):
        try:
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed += 1
        except OSError:
            pass
    return removed


def _number(prefix: str) -> int:
    match = re.search(rf"{_PREFIX}-(\d+)$", prefix)
    return int(match.group(1)) if match else -1


def checkpoints_in(directory: str) -> list[str]:
    """Prefixes of the checkpoints whose `.index` file is in `directory`, newest first."""
    prefixes = [f[: -len(".index")]
                for f in glob.glob(os.path.join(directory, f"{_PREFIX}-*.index"))]
    return sorted((p for p in prefixes if _number(p) >= 0), key=_number, reverse=True)
