"""Callbacks of the training loop: the step log, the NaN/inf guard, checkpoint cadence, the
progress bar and TensorBoard summaries. (kNN monitor: `eval.knn`; projector: `eval.projector`.)"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List

import keras
import numpy as np
import tensorflow as tf
from absl import logging



def _step(model) -> int:
    """Batches trained so far (`optimizer.iterations`, already incremented after a step)."""
    return int(model.optimizer.iterations.numpy())


class StepLog(keras.callbacks.Callback):
    """Appends one JSON line per step to `path`: `{"step", "loss", "top1", "lr", "momentum"}`.

    `loss` and `top1` are the step's own (the model's `batch_loss` and `batch_top1` logs), not
    the epoch's running means; `lr` is the learning rate the step used. The file is appended
    across resumes, so after a crash the steps between the last checkpoint and the crash appear
    twice; `read_step_log` keeps the last record of each step.
    Each line is flushed, so a killed process loses at most the line being written.
    With `steps_per_execution > 1` Keras calls batch callbacks once per execution: one line per
    execution.
    """

    KEYS = {"batch_loss": "loss", "batch_top1": "top1", "lr": "lr", "momentum": "momentum"}

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self._file = None

    def on_train_begin(self, logs=None):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        torn = False
        if os.path.exists(self.path) and os.path.getsize(self.path):
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"  # a line cut by a crash: start ours on a new one
        self._file = open(self.path, "a")
        if torn:
            self._file.write("\n")

    def on_train_batch_end(self, batch, logs=None):
        record = {"step": _step(self.model)}
        for key, name in self.KEYS.items():
            if logs and key in logs:
                value = float(logs[key])
                record[name] = value if math.isfinite(value) else None  # NaN is not JSON
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def on_train_end(self, logs=None):
        if self._file is not None:
            self._file.close()
            self._file = None


def read_jsonl(path: str, key: str) -> Dict[int, dict]:
    """`{record[key]: record}` from an append-only JSON-lines log that a resumed run may repeat
    lines of: the last record wins; torn lines (a kill during a write) are skipped."""
    records = {}
    if not tf.io.gfile.exists(path):
        return records
    with tf.io.gfile.GFile(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and key in record:
                records[int(record[key])] = record
    return records


def read_step_log(path: str) -> Dict[int, dict]:
    """`{step: record}` from a `StepLog` file (see `read_jsonl`)."""
    return read_jsonl(path, "step")


class NonFiniteError(RuntimeError):
    """Training produced a NaN/inf loss or weights; the message names the step."""


def nonfinite_variables(model) -> List[str]:
    """Paths of the model's and its optimizer's float variables holding a NaN or inf."""
    variables = list(model.variables)
    if getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    return [v.path for v in variables
            if v.dtype.startswith(("float", "bfloat")) and not np.isfinite(
                np.asarray(keras.ops.convert_to_numpy(v.value), np.float32)).all()]


class NonFiniteGuard(keras.callbacks.Callback):
    """Watches each step for NaN and inf: the `finite` log of `MoCo.train_step` (loss and
    gradients), else the loss (`batch_loss`, else `loss`) of any other model.

    Place it before `PeriodicCheckpoint`: it acts before a checkpoint of the step could be written.

    Args:
      on_nan: "stop" raises `NonFiniteError` at the first non-finite loss, naming the step and the
        last good checkpoint (the weights are already updated with the NaN gradients, so the run
        cannot go on). "skip_step": the model skips such steps itself (`MoCo(skip_nonfinite=True)`);
        this warns for the first few and raises after `max_consecutive_skips` skipped steps in
        a row, when the run is clearly not recovering.
      checkpointer: to name the last good checkpoint (anything with `latest_checkpoint`).
    With `steps_per_execution > 1` Keras reports the last step of each execution only.
    Attributes: `skipped_steps`, the steps skipped so far (1-based).
    """

    ADVICE = "Lower train.base_learning_rate (or add train.warmup_epochs), or check the input data."
    SKIP_HINT = "Or set train.on_nan=skip_step to skip such steps."

    def __init__(self, on_nan: str = "stop", checkpointer=None, max_consecutive_skips: int = 100):
        super().__init__()
        if on_nan not in ("stop", "skip_step"):
            raise ValueError(f"on_nan must be 'stop' or 'skip_step', got {on_nan!r}")
        self.on_nan, self.checkpointer = on_nan, checkpointer
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.skipped_steps: List[int] = []
        self._in_a_row = 0

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        loss = logs.get("batch_loss", logs.get("loss"))
        loss = float("nan") if loss is None else float(loss)
        finite = bool(logs["finite"]) if "finite" in logs else math.isfinite(loss)
        if finite:
            self._in_a_row = 0
            return
        step = _step(self.model)
        latest = getattr(self.checkpointer, "latest_checkpoint", None) or "none"
        what = f"Loss is {loss}" if not math.isfinite(loss) else "Gradients are not finite"
        if self.on_nan == "stop":
            raise NonFiniteError(
                f"{what} at step {step}; training stopped (train.on_nan=stop) and nothing of "
                f"this step was saved. Last good checkpoint: {latest}. "
                f"{self.ADVICE} {self.SKIP_HINT}"
            )
        self.skipped_steps.append(step)
        self._in_a_row += 1
        n = len(self.skipped_steps)
        if n <= 5 or n & (n - 1) == 0:
            logging.warning("Step %d: %s; the step was skipped (train.on_nan=skip_step), %d "
                            "skipped so far.", step, what.lower(), n)
        if self._in_a_row >= self.max_consecutive_skips:
            raise NonFiniteError(
                f"{self._in_a_row} steps in a row up to step {step} were not finite and were "
                f"skipped; training stopped. Last good checkpoint: {latest}. {self.ADVICE}"
            )


class PeriodicCheckpoint(keras.callbacks.Callback):
    """Saves the training state every `every_n_steps` steps and at the end of every epoch.

    Args:
      checkpointer: a `moco_tf.checkpoint.Checkpointer` (anything with `save(step, epoch)`).
      every_n_steps: 0 = only at epoch ends. With `steps_per_execution > 1` a save happens at the
        first step at or after each multiple.
      steps_per_epoch: to record the epoch of a step.
    Place it after callbacks that log the step (e.g. `StepLog`), so a checkpoint's steps are
    already logged.
    """

    def __init__(self, checkpointer, every_n_steps: int, steps_per_epoch: int):
        super().__init__()
        self.checkpointer = checkpointer
        self.every_n_steps = int(every_n_steps)
        self.steps_per_epoch = int(steps_per_epoch)
        self._last_saved = None

    def _save(self, step):
        # Never a checkpoint of NaN/inf weights: it would replace a good one as "latest".
        bad = nonfinite_variables(self.model)
        if bad:
            latest = getattr(self.checkpointer, "latest_checkpoint", None)
            raise NonFiniteError(
                f"Step {step}: {len(bad)} variables are not finite (first: {bad[0]}); training "
                f"stopped without saving them. Last good checkpoint: {latest or 'none'}. "
                f"{NonFiniteGuard.ADVICE} {NonFiniteGuard.SKIP_HINT}"
            )
        self.checkpointer.save(step, epoch=step // self.steps_per_epoch)
        self._last_saved = step

    def on_train_begin(self, logs=None):
        self._last_saved = _step(self.model)

    def on_train_batch_end(self, batch, logs=None):
        step = _step(self.model)
        n = self.every_n_steps
        if n and step // n > self._last_saved // n:
            self._save(step)

    def on_epoch_end(self, epoch, logs=None):
        step = _step(self.model)
        if step != self._last_saved:
            self._save(step)


class ProgressBar(keras.callbacks.ProgbarLogger):
    """Keras' progress bar without the step's bookkeeping logs (`batch_loss`, `batch_top1`,
    `finite`): it shows the loss, the contrastive top-1 (the epoch's running means), lr and m
    (and kNN at epoch ends)."""

    HIDDEN = ("batch_loss", "batch_top1", "finite")

    def _visible(self, logs):
        return {k: v for k, v in (logs or {}).items() if k not in self.HIDDEN}

    def _update_progbar(self, batch, logs=None):
        super()._update_progbar(batch, self._visible(logs))

    def _finalize_progbar(self, logs):
        super()._finalize_progbar(self._visible(logs))


class TrainingSummaries(keras.callbacks.Callback):
    """TensorBoard summaries of a run, in `log_dir`:

    - every `every_n_steps` steps: `step/loss` and `step/top1` (the step's own, not the epoch's
      running means), `step/lr` (the one the step used), `step/momentum`, at the global step;
    - every epoch: `epoch/loss`, `epoch/top1` and the kNN accuracies (the kNN curve);
    - at the start: the config as hparams (`hparams` dict of str -> scalar) and, if
      `sample_views` is given, an image of augmented view pairs (`views/view1`, `views/view2`).
    """

    def __init__(self, log_dir, every_n_steps=50, hparams=None, sample_views=None):
        super().__init__()
        self.log_dir, self.every = log_dir, max(1, int(every_n_steps))
        self.hparams, self.sample_views = hparams, sample_views
        self.writer = None

    def on_train_begin(self, logs=None):
        self.writer = tf.summary.create_file_writer(self.log_dir)
        step = _step(self.model)
        with self.writer.as_default(step=step):
            if self.hparams:
                from tensorboard.plugins.hparams import api as hp

                hp.hparams(self.hparams)
            if self.sample_views is not None:
                views = (self.sample_views["view1"], self.sample_views["view2"])
                augmenter = getattr(self.model, "augmenter", None)
                if augmenter is not None:  # augment_on=device: the pipeline sent crops only
                    views = augmenter(views, tf.constant(step, tf.int64))
                for name, images in zip(("view1", "view2"), views):
                    images = tf.cast(images, tf.float32) / (
                        255.0 if images.dtype == tf.uint8 else 1.0)
                    tf.summary.image(f"views/{name}", images, max_outputs=8)
        self.writer.flush()

    def on_train_batch_end(self, batch, logs=None):
        step = _step(self.model)
        if step % self.every or not logs:
            return
        with self.writer.as_default(step=step):
            for name, key in (("loss", "batch_loss"), ("top1", "batch_top1"), ("lr", "lr"),
                              ("momentum", "momentum")):
                if key in logs:
                    tf.summary.scalar(f"step/{name}", float(logs[key]))

    def on_epoch_end(self, epoch, logs=None):
        with self.writer.as_default(step=epoch + 1):
            for key, value in (logs or {}).items():
                if key in ("loss", "top1") or key.startswith("knn_"):
                    tf.summary.scalar(f"epoch/{key}", float(value))
        self.writer.flush()

    def on_train_end(self, logs=None):
        if self.writer is not None:
            self.writer.flush()
