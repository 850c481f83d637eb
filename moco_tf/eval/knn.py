"""Weighted kNN: the standard self-supervised evaluation without training, and its monitor.

As in the MoCo CIFAR demo and InstDisc (Wu et al. 2018): features of a labelled "memory bank"
(the training set) and of the test set are L2-normalised, each test image takes its top-k
bank neighbours by cosine similarity, and each neighbour votes for its class with weight
exp(sim / T). Defaults k=200, T=0.1 follow those references; k=20 comes from the same pass.
"""
from __future__ import annotations

import json
from typing import Callable, Dict, List, Sequence, Tuple, Union

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from moco_tf import callbacks as callbacks_lib

FeatureSource = Union[keras.Model, Callable[[tf.Tensor], tf.Tensor]]


def _feature_function(feature_fn_or_model: FeatureSource, normalize: bool = True):
    """Wraps a model (or callable) in a `tf.function`: images -> float32 features [B, D],
    L2-normalised unless `normalize=False` (linear evaluation normalises its own way).

    Built once and reused (e.g. by `KNNMonitor` every epoch) so the graph is traced once,
    not once per evaluation.
    """
    if getattr(feature_fn_or_model, "_moco_tf_feature_fn", False):
        return feature_fn_or_model
    is_layer = isinstance(feature_fn_or_model, keras.layers.Layer)

    # reduce_retracing: the last, smaller batch reuses a shape-polymorphic trace.
    @tf.function(reduce_retracing=True)
    def features(images):
        # uint8 images (e.g. straight from disk) are accepted too: the models expect [0, 1].
        if images.dtype == tf.uint8:
            images = tf.cast(images, tf.float32) / 255.0
        if is_layer:
            # Inference: BN uses moving statistics, dropout off.
            out = feature_fn_or_model(images, training=False)
        else:
            out = feature_fn_or_model(images)
        out = tf.cast(tf.reshape(out, [tf.shape(out)[0], -1]), tf.float32)
        return tf.math.l2_normalize(out, axis=1) if normalize else out

    features._moco_tf_feature_fn = True
    return features


def extract_features(
    feature_fn_or_model: FeatureSource, dataset: tf.data.Dataset, normalize: bool = True
) -> Tuple[np.ndarray, np.ndarray]:
    """Runs a model over a labelled dataset in inference mode.

    Args:
      feature_fn_or_model: a keras model/layer (called with `training=False`) or a callable
        mapping images `[B, H, W, C]` to features `[B, D]` (or `[B, ...]`, flattened).
      dataset: yields `(images float32 [B, H, W, C] in [0, 1], labels int [B])`.
      normalize: L2-normalise the rows (ignored for an already wrapped feature function).

    Returns:
      `(features [N, D] float32, rows L2-normalised; labels [N] int32)` as numpy arrays.
    """
    fn = _feature_function(feature_fn_or_model, normalize)
    feats, labels = [], []
    for images, y in dataset:
        feats.append(fn(images).numpy())
        labels.append(np.asarray(y, dtype=np.int32).reshape(-1))
    if not feats:
        raise ValueError("extract_features: the dataset is empty.")
    return np.concatenate(feats, axis=0), np.concatenate(labels, axis=0)


@tf.function(reduce_retracing=True)
def _knn_predict(bank, bank_labels, queries, ks, num_classes, temperature):
    """Predictions `[M, len(ks)]` for one chunk of queries.

    Top-k is taken once with the largest k: the top-20 neighbours are the first 20 of the
    (sorted) top-200, so every smaller k is a prefix. Votes are summed with a segment sum
    (memory O(M * (k + C))) instead of a one-hot tensor `[M, k, C]`, which would be large
    for 1000 classes.
    """
    sims = tf.matmul(queries, bank, transpose_b=True)  # [M, N] cosine similarities
    top_sims, top_idx = tf.math.top_k(sims, k=max(ks), sorted=True)  # [M, max_k]
    weights = tf.exp(top_sims / temperature)  # [M, max_k]
    m = tf.shape(queries)[0]
    # One segment per (query, class) pair.
    segment = tf.range(m)[:, None] * num_classes + tf.gather(bank_labels, top_idx)
    preds = []
    for k in ks:
        scores = tf.math.unsorted_segment_sum(
            weights[:, :k], segment[:, :k], num_segments=m * num_classes
        )
        scores = tf.reshape(scores, [m, num_classes])
        preds.append(tf.argmax(scores, axis=1, output_type=tf.int32))
    return tf.stack(preds, axis=1)


def knn_classify(
    bank_features,
    bank_labels,
    query_features,
    *,
    num_classes: int,
    k: Union[int, Sequence[int]] = 200,
    temperature: float = 0.1,
    batch_size: int = 512,
) -> Union[np.ndarray, Dict[int, np.ndarray]]:
    """Weighted kNN prediction (cosine similarity, votes weighted by exp(sim / temperature)).

    Args:
      bank_features: `[N, D]` float, rows L2-normalised (the labelled memory bank).
      bank_labels: `[N]` int in `[0, num_classes)`.
      query_features: `[M, D]` float, rows L2-normalised.
      num_classes: number of classes C.
      k: number of neighbours, or a sequence of them (e.g. `(200, 20)`) computed in one pass.
        A k larger than N is clamped to N.
      temperature: vote temperature T.
      batch_size: queries per chunk; memory is O(batch_size * N) instead of O(M * N)
        (60000 x 10000 float32 similarities would be 2.4 GB at once).

    Returns:
      predicted labels `[M]` int32 if `k` is an int, else a dict `{k: predictions [M]}`.
      Ties go to the lower class index.
    """
    ks = [int(k)] if np.isscalar(k) else [int(x) for x in k]
    if not ks or min(ks) < 1:
        raise ValueError(f"knn_classify: k must be >= 1, got {k!r}.")
    bank = tf.convert_to_tensor(np.asarray(bank_features, np.float32))
    queries = np.asarray(query_features, np.float32)
    bank_labels = np.asarray(bank_labels).reshape(-1)
    if bank.shape[0] != bank_labels.shape[0]:
        raise ValueError(
            f"knn_classify: {bank.shape[0]} bank features but {bank_labels.shape[0]} labels."
        )
    if bank_labels.size and (bank_labels.min() < 0 or bank_labels.max() >= num_classes):
        raise ValueError(f"knn_classify: bank labels must lie in [0, {num_classes}).")
    n = int(bank.shape[0])
    if n == 0:
        raise ValueError("knn_classify: the bank is empty.")
    effective = tuple(min(x, n) for x in ks)
    bank_labels = tf.constant(bank_labels, tf.int32)

    preds = []
    for start in range(0, queries.shape[0], batch_size):
        chunk = tf.constant(queries[start : start + batch_size])
        chunk_preds = _knn_predict(
            bank, bank_labels, chunk, effective, num_classes, float(temperature)
        )
        preds.append(chunk_preds.numpy())
    preds = np.concatenate(preds, axis=0) if preds else np.zeros((0, len(ks)), np.int32)
    if np.isscalar(k):
        return preds[:, 0]
    return {kk: preds[:, i] for i, kk in enumerate(ks)}


def knn_accuracy(
    bank_features,
    bank_labels,
    test_features,
    test_labels,
    *,
    num_classes: int,
    ks: Sequence[int] = (200, 20),
    temperature: float = 0.1,
    batch_size: int = 512,
) -> Dict[int, float]:
    """Top-1 accuracy of weighted kNN for each k: `{k: accuracy in [0, 1]}`."""
    preds = knn_classify(
        bank_features,
        bank_labels,
        test_features,
        num_classes=num_classes,
        k=tuple(ks),
        temperature=temperature,
        batch_size=batch_size,
    )
    test_labels = np.asarray(test_labels).reshape(-1)
    return {kk: float(np.mean(p == test_labels)) for kk, p in preds.items()}


def evaluate_knn(
    backbone: FeatureSource | None,
    bank_dataset: tf.data.Dataset,
    test_dataset: tf.data.Dataset,
    *,
    num_classes: int,
    ks: Sequence[int] = (200, 20),
    temperature: float = 0.1,
) -> Dict[int, float]:
    """Extracts bank and test features with `backbone` (the query backbone; None: the raw pixels,
    the baseline learned features have to beat) and returns `{k: top-1 accuracy}`."""
    fn = _feature_function(backbone if backbone is not None else (lambda images: images))
    bank_x, bank_y = extract_features(fn, bank_dataset)
    test_x, test_y = extract_features(fn, test_dataset)
    return knn_accuracy(
        bank_x, bank_y, test_x, test_y, num_classes=num_classes, ks=ks, temperature=temperature
    )


def _json_line(record: dict) -> str:
    """One JSON line; NaN/inf as null (`json` would write a bare NaN, which is not JSON)."""
    safe = {k: None if isinstance(v, float) and not np.isfinite(v) else v
            for k, v in record.items()}
    return json.dumps(safe, allow_nan=False) + "\n"


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
      stop_on_error: False: an evaluation that fails (out of memory, a bad image in the bank) is
        logged and recorded in `self.errors` as `(epoch, message)`, and training goes on.
      history_path: a JSON-lines file every evaluation is appended to, so that a resumed run
        keeps the curve of the epochs before it (see `restore_history`).
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
        stop_on_error: bool = True,
        history_path: str | None = None,
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
        self.errors: List[Tuple[int, str]] = []
        self.stop_on_error = bool(stop_on_error)
        self.history_path = history_path
        self._features = None

    def restore_history(self, last_epoch: int):
        """Takes `history` from `history_path` up to (1-based) `last_epoch`, the epochs the
        restored weights have finished, and drops later lines (a killed run's evaluations that the
        resumed one repeats). Records of other ks (`eval.knn_ks` changed since) stay in the file
        but not in `history`: an epoch without every k of `ks` counts as not evaluated."""
        if not self.history_path:
            return
        logged = callbacks_lib.read_jsonl(self.history_path, "epoch")  # torn lines skipped
        records = [r for e, r in sorted(logged.items()) if e <= last_epoch]
        names = [f"k{k}" for k in self.ks]
        self.history = [(r["epoch"], {k: r[n] for k, n in zip(self.ks, names)})
                        for r in records if all(r.get(n) is not None for n in names)]
        if len(self.history) < len(records):
            logging.info("%s: %d of %d earlier evaluations lack k=%s (other eval.knn_ks); they "
                         "stay in the file, out of this run's curve.", self.history_path,
                         len(records) - len(self.history), len(records),
                         ", ".join(map(str, self.ks)))
        with tf.io.gfile.GFile(self.history_path, "w") as f:
            f.write("".join(_json_line(r) for r in records))

    def on_train_begin(self, logs=None):
        # Evaluate the *query* backbone (the one being trained), not the momentum copy.
        backbone = getattr(self.model, "backbone", None)
        if backbone is None:
            raise AttributeError(
                "KNNMonitor: the model has no `backbone` attribute "
                "(the query backbone to evaluate)."
            )
        # Traced once per fit, reused every evaluation.
        self._features = _feature_function(backbone)

    def _should_evaluate(self, epoch: int) -> bool:
        last = self.params.get("epochs") if self.params else None
        return epoch % self.every_n_epochs == 0 or (last is not None and epoch == last)

    def evaluate(self) -> Dict[int, float]:
        """kNN top-1 for every k with the current weights."""
        if self._features is None:
            self._features = _feature_function(self.model.backbone)
        return evaluate_knn(self._features, self.bank_dataset, self.test_dataset,
                            num_classes=self.num_classes, ks=self.ks,
                            temperature=self.temperature)

    def on_epoch_end(self, epoch, logs=None):
        epoch = epoch + 1  # Keras passes 0-based epochs; report them as the progress bar does.
        if self._should_evaluate(epoch):
            self.record(epoch, logs)

    def record(self, epoch: int, logs=None):
        """Evaluates now, as after (1-based) `epoch`: appends to `history` (or, failing with
        `stop_on_error=False`, to `errors`) and writes the accuracies into `logs`."""
        try:
            accuracies = self.evaluate()
        except Exception as e:  # noqa: BLE001  whatever failed, the training may go on
            if self.stop_on_error:
                raise
            message = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
            self.errors.append((epoch, message))
            logging.error("kNN evaluation failed after epoch %d (%s); training goes on.", epoch,
                          message)
            return
        self.history.append((epoch, accuracies))
        if self.history_path:
            record = {"epoch": epoch, **{f"k{k}": float(a) for k, a in accuracies.items()}}
            with tf.io.gfile.GFile(self.history_path, "a") as f:
                f.write(_json_line(record))
        if logs is not None:
            for i, k in enumerate(self.ks):
                logs["knn_top1" if i == 0 else f"knn_top1_k{k}"] = accuracies[k]
        if self.verbose:
            parts = ", ".join(f"k={k}: {100 * accuracies[k]:.2f}%" for k in self.ks)
            # In `fit` with a progress bar (verbose=1), its line is not ended yet.
            bar = logs is not None and (self.params or {}).get("verbose") == 1
            start = "\n" if bar else ""
            print(f"{start}Epoch {epoch}: kNN top-1 {parts}")
