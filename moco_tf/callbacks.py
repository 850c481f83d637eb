"""Keras callbacks used during pre-training."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import keras
import tensorflow as tf

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
