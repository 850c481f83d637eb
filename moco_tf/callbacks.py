"""Keras callbacks used during pre-training, and the embedding projector written after it."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from moco_tf.eval import knn


class KNNMonitor(keras.callbacks.Callback):
    """Weighted kNN top-1 of the query backbone, every N epochs and at the last epoch.

    Place it before other callbacks that read the logs (TensorBoard, CSVLogger, checkpoints on
    `knn_top1`): it writes into the shared epoch `logs` dict, and Keras' own History and progress
    bar run after all user callbacks, so they see the values too.

    Logs: `knn_top1` for `ks[0]` and `knn_top1_k{k}` for the other ks (accuracies in [0, 1]).
    `self.history` is a list of `(epoch, {k: accuracy})` with 1-based epochs, as the progress bar
    counts them.

    Args:
      bank_dataset: labelled memory bank (usually the un-augmented training set), yielding
        `(images float32 [B, H, W, C] in [0, 1], labels int [B])`.
      test_dataset: the evaluation set, same format.
      num_classes: number of classes.
      every_n_epochs: evaluate when `epoch % every_n_epochs == 0` (1-based) and at the last epoch.
      ks: neighbour counts, all computed in one pass; `ks[0]` is the headline `knn_top1`.
      temperature: vote temperature (0.1 as in InstDisc / the MoCo CIFAR demo).
      verbose: print one line per evaluation.
    """

    def __init__(
        self,
        bank_dataset: tf.data.Dataset,
        test_dataset: tf.data.Dataset,
        num_classes: int,
        every_n_epochs: int = 1,
        ks: Sequence[int] = (200, 20),
        temperature: float = 0.1,
        verbose: int = 1,
    ):
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"KNNMonitor: every_n_epochs must be >= 1, got {every_n_epochs}.")
        if not ks:
            raise ValueError("KNNMonitor: ks must name at least one k.")
        self.bank_dataset = bank_dataset
        self.test_dataset = test_dataset
        self.num_classes = int(num_classes)
        self.every_n_epochs = int(every_n_epochs)
        self.ks = tuple(int(k) for k in ks)
        self.temperature = float(temperature)
        self.verbose = verbose
        self.history: List[Tuple[int, Dict[int, float]]] = []
        self._features = None

    def on_train_begin(self, logs=None):
        # Evaluate the *query* backbone (the one being trained), not the momentum copy.
        backbone = getattr(self.model, "backbone", None)
        if backbone is None:
            raise AttributeError(
                "KNNMonitor: the model has no `backbone` attribute "
                "(the query backbone to evaluate)."
            )
        # Traced once per fit, reused every evaluation.
        self._features = knn._feature_function(backbone)

    def _should_evaluate(self, epoch: int) -> bool:
        last = self.params.get("epochs") if self.params else None
        return epoch % self.every_n_epochs == 0 or (last is not None and epoch == last)

    def evaluate(self) -> Dict[int, float]:
        """kNN top-1 for every k with the current weights."""
        if self._features is None:
            self._features = knn._feature_function(self.model.backbone)
        bank_x, bank_y = knn.extract_features(self._features, self.bank_dataset)
        test_x, test_y = knn.extract_features(self._features, self.test_dataset)
        return knn.knn_accuracy(
            bank_x,
            bank_y,
            test_x,
            test_y,
            num_classes=self.num_classes,
            ks=self.ks,
            temperature=self.temperature,
        )

    def on_epoch_end(self, epoch, logs=None):
        epoch = epoch + 1  # Keras passes 0-based epochs; report them as the progress bar does.
        if not self._should_evaluate(epoch):
            return
        accuracies = self.evaluate()
        self.history.append((epoch, accuracies))
        if logs is not None:
            for i, k in enumerate(self.ks):
                logs["knn_top1" if i == 0 else f"knn_top1_k{k}"] = accuracies[k]
        if self.verbose:
            parts = ", ".join(f"k={k}: {100 * accuracies[k]:.2f}%" for k in self.ks)
            print(f"Epoch {epoch}: kNN top-1 {parts}")


def _step(model) -> int:
    """Batches trained so far (`optimizer.iterations`, already incremented after a step)."""
    return int(model.optimizer.iterations.numpy())


class StepLog(keras.callbacks.Callback):
    """Appends one JSON line per step to `path`: `{"step", "loss", "top1", "lr", "momentum"}`.

    `loss` is the step's own batch loss (the model's `batch_loss` log), not the epoch's running
    mean. The file is appended across resumes, so after a crash the steps between the last
    checkpoint and the crash appear twice; `read_step_log` keeps the last record of each step.
    Each line is flushed, so a killed process loses at most the line being written.
    With `steps_per_execution > 1` Keras calls batch callbacks once per execution: one line per
    execution.
    """

    KEYS = {"batch_loss": "loss", "top1": "top1", "lr": "lr", "momentum": "momentum"}

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
                record[name] = float(logs[key])
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def on_train_end(self, logs=None):
        if self._file is not None:
            self._file.close()
            self._file = None


def read_step_log(path: str) -> Dict[int, dict]:
    """`{step: record}` from a `StepLog` file; the last record wins, torn lines are skipped."""
    records = {}
    if not os.path.exists(path):
        return records
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "step" in record:
                records[int(record["step"])] = record
    return records


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


def _thumbnails(images, size: int) -> np.ndarray:
    """Images [B, H, W, C] in [0, 1] -> uint8 [B, size, size, C]."""
    if tuple(images.shape[1:3]) != (size, size):
        images = tf.image.resize(images, (size, size))
    return (np.clip(np.asarray(images), 0, 1) * 255).round().astype(np.uint8)


def _sprite(thumbs: np.ndarray) -> np.ndarray:
    """Thumbnails [N, S, S, C] tiled row-major into one square image [G*S, G*S, C]."""
    size = thumbs.shape[1]
    grid = int(math.ceil(math.sqrt(len(thumbs))))
    pad = np.zeros((grid * grid - len(thumbs), *thumbs.shape[1:]), thumbs.dtype)
    tiles = np.concatenate([thumbs, pad]).reshape(grid, grid, size, size, -1)
    return tiles.transpose(0, 2, 1, 3, 4).reshape(grid * size, grid * size, -1)


def write_embedding_projector(backbone, dataset, log_dir: str, max_examples: int = 2000,
                              thumbnail: int = 32) -> int:
    """Writes backbone features of (up to) `max_examples` labelled images for TensorBoard's
    embedding projector: `tensorboard --logdir <log_dir's parent>`, tab "Projector".

    Args:
      backbone: the query backbone, images [B, H, W, C] in [0, 1] -> features [B, D]; run in
        inference mode.
      dataset: yields `(images float32 [B, H, W, C] in [0, 1], labels int [B])`, e.g. the test set.
      log_dir: output folder: `embedding.ckpt-1.*` (features [N, D]), `metadata.tsv` (one label per
        line), `sprite.png` (thumbnails) and `projector_config.pbtxt`.
    Returns:
      the number of examples written.
    """
    from tensorboard.plugins import projector  # only needed here

    features_fn = tf.function(lambda x: tf.cast(backbone(x, training=False), tf.float32),
                              reduce_retracing=True)
    feats, labels, thumbs, count = [], [], [], 0
    size = None
    for x, y in dataset:
        take = min(max_examples - count, int(x.shape[0]))
        if take <= 0:
            break
        x = x[:take]
        feats.append(features_fn(x).numpy())
        labels.append(np.asarray(y)[:take].reshape(-1))
        size = size or min(int(x.shape[1]), thumbnail)
        thumbs.append(_thumbnails(x, size))  # small copies only: 2000 ImageNet images are 1 GB
        count += take
    if not count:
        raise ValueError("write_embedding_projector: the dataset is empty.")
    os.makedirs(log_dir, exist_ok=True)
    with open(os.path.join(log_dir, "metadata.tsv"), "w") as f:
        f.writelines(f"{int(y)}\n" for y in np.concatenate(labels))
    tf.io.write_file(os.path.join(log_dir, "sprite.png"),
                     tf.io.encode_png(_sprite(np.concatenate(thumbs))))
    embedding = tf.Variable(np.concatenate(feats), trainable=False)
    # save() also writes the `checkpoint` state file, by which the projector finds the tensor.
    tf.train.Checkpoint(embedding=embedding).save(os.path.join(log_dir, "embedding.ckpt"))

    config = projector.ProjectorConfig()
    entry = config.embeddings.add()
    entry.tensor_name = "embedding/.ATTRIBUTES/VARIABLE_VALUE"
    entry.metadata_path = "metadata.tsv"
    entry.sprite.image_path = "sprite.png"
    entry.sprite.single_image_dim.extend([size, size])
    projector.visualize_embeddings(log_dir, config)
    return count
