"""From a config to a trained, evaluated and exported model: what `train.py` runs.

`build_model(config)` is also the way to get a compiled MoCo model for your own `model.fit`.
"""

import json
import os
import time

import keras
import tensorflow as tf
from absl import logging

from moco_tf import callbacks as callbacks_lib
from moco_tf import config as config_lib
from moco_tf import data as data_lib
from moco_tf import export as export_lib
from moco_tf import momentum as momentum_lib
from moco_tf.data import datasets
from moco_tf.eval import knn
from moco_tf.models import backbones, heads
from moco_tf.models.contrastive import MoCo
from moco_tf.optimizers import LARS


def steps_per_epoch(config) -> int:
    """Full passes over the training split, or `train.steps_per_epoch` when set."""
    if config.train.steps_per_epoch:
        return int(config.train.steps_per_epoch)
    n = datasets.num_examples(config.data, config.data.train_split)
    if n < config.train.batch_size:
        raise config_lib.ConfigError(
            f"'train.batch_size' ({config.train.batch_size}) is larger than the training set ({n})."
        )
    return n // config.train.batch_size


def learning_rate(config, total_steps, epoch_steps):
    """The lr schedule; the base lr is given per 256 images (linear scaling rule)."""
    t = config.train
    lr = t.base_learning_rate * t.batch_size / 256
    warmup = int(t.warmup_epochs * epoch_steps)
    if t.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else lr, max(total_steps - warmup, 1),
            warmup_target=lr if warmup else None, warmup_steps=warmup,
        )
    if t.lr_schedule == "step":
        boundaries = [int(e * epoch_steps) for e in t.lr_decay_epochs]
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            boundaries, [lr * 0.1**i for i in range(len(boundaries) + 1)]
        )
    return lr


def build_model(config, total_steps=1, epoch_steps=1) -> MoCo:
    """A compiled MoCo model (query encoder, key encoder, queue) as the config describes.

    Sets the global Keras dtype policy to `config.precision` first.
    """
    keras.mixed_precision.set_global_policy(config.precision)
    d, m, c = config.data, config.model, config.moco
    backbone = backbones.build_backbone(
        m.backbone, (d.image_size, d.image_size, d.channels), cifar_stem=m.cifar_stem,
        norm=m.norm, split_bn_groups=m.split_bn_groups, mean=d.mean, std=d.std, width=m.width,
    )
    feature_dim = backbone.output_shape[-1]
    head_norm = {"norm": m.norm, "split_bn_groups": m.split_bn_groups}
    projector = heads.build_projector(
        m.projector, feature_dim, c.dim, hidden_dim=m.projector_hidden_dim or feature_dim,
        **({"num_layers": m.projector_layers, "use_bn": m.projector_bn,
            "last_bn": m.projector_bn, **head_norm} if m.projector == "mlp" else {}),
    )
    predictor = None
    if m.predictor_hidden_dim:
        predictor = heads.build_predictor(c.dim, c.dim, m.predictor_hidden_dim, **head_norm)
    model = MoCo(
        backbone, projector, queue_size=c.queue_size, momentum=c.momentum,
        temperature=c.temperature, momentum_scope=c.momentum_scope, negatives=c.negatives,
        symmetric=c.symmetric, predictor=predictor, loss_scale=c.loss_scale,
        weight_decay=config.train.weight_decay if config.train.optimizer == "sgd" else 0.0,
        seed=config.seed,
    )
    lr = learning_rate(config, total_steps, epoch_steps)
    if config.train.optimizer == "lars":
        optimizer = LARS(lr, momentum=config.train.sgd_momentum,
                         weight_decay=config.train.weight_decay)
    else:
        optimizer = keras.optimizers.SGD(lr, momentum=config.train.sgd_momentum)
    model.compile(
        optimizer=optimizer, steps_per_execution=config.train.steps_per_execution,
        jit_compile=config.train.jit_compile,
    )
    return model


def momentum_schedule(config, total_steps) -> momentum_lib.MomentumSchedule:
    """The callback that sets m: constant, or cosine from moco.momentum to 1."""
    return momentum_lib.MomentumSchedule(
        config.moco.momentum, config.moco.momentum_schedule, total_steps=total_steps
    )


class _Throughput(keras.callbacks.Callback):
    """Training images per second, timed per epoch before any evaluation callback runs."""

    def __init__(self, images_per_epoch):
        super().__init__()
        self.images_per_epoch, self.epoch_seconds = images_per_epoch, []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_seconds.append(time.perf_counter() - self._start)

    def images_per_sec(self):
        # The first epoch includes tracing the step; leave it out when there are others.
        seconds = self.epoch_seconds[1:] or self.epoch_seconds
        return self.images_per_epoch * len(seconds) / sum(seconds)


def train_and_evaluate(config, workdir):
    """Trains MoCo, evaluates kNN on the query backbone, exports it.

    Returns:
      (model, results): the trained MoCo model and the dict written to `<workdir>/results.json`.
    """
    config_lib.validate(config)
    os.makedirs(workdir, exist_ok=True)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()

    epoch_steps = steps_per_epoch(config)
    total_steps = epoch_steps * config.train.epochs
    batch = config.train.batch_size
    logging.info("Training %d epochs x %d steps of %d images.", config.train.epochs, epoch_steps, batch)

    train_ds = data_lib.train_dataset(config.data, batch, config.seed)
    model = build_model(config, total_steps, epoch_steps)

    throughput = _Throughput(epoch_steps * batch)
    callbacks = [throughput, momentum_schedule(config, total_steps)]
    monitor = None
    if config.eval.knn_every_epochs:
        bank = data_lib.eval_dataset(config.data, config.data.train_split, config.eval.batch_size)
        test = data_lib.eval_dataset(config.data, config.data.eval_split, config.eval.batch_size)
        monitor = callbacks_lib.KNNMonitor(
            bank, test, config.data.num_classes, every_n_epochs=config.eval.knn_every_epochs,
            ks=tuple(config.eval.knn_ks), temperature=config.eval.knn_temperature,
        )
        callbacks.append(monitor)
    callbacks.append(keras.callbacks.TensorBoard(os.path.join(workdir, "tensorboard")))

    history = model.fit(
        train_ds, epochs=config.train.epochs, steps_per_epoch=epoch_steps,
        callbacks=callbacks, verbose=config.train.verbose, shuffle=False,  # tf.data shuffles
    )

    results = {
        "epochs": config.train.epochs,
        "steps": total_steps,
        "images_per_sec": round(throughput.images_per_sec(), 2),
        "train_seconds": round(sum(throughput.epoch_seconds), 1),
        "final_loss": float(history.history["loss"][-1]),
        "loss_per_epoch": [float(x) for x in history.history["loss"]],
    }
    if monitor is not None:
        ks = tuple(config.eval.knn_ks)
        last = monitor.history[-1][1]
        results["knn_top1"] = float(last[ks[0]])
        results.update({f"knn_top1_k{k}": float(last[k]) for k in ks[1:]})
        results["knn_per_epoch"] = [
            {"epoch": e, **{f"k{k}": float(a) for k, a in accs.items()}} for e, accs in monitor.history
        ]
        if config.eval.raw_pixel_baseline:
            results["knn_top1_raw_pixels"] = raw_pixel_knn(config, bank, test)
    if config.eval.export:
        shape = (config.data.image_size, config.data.image_size, config.data.channels)
        results["export_dir"] = export_lib.export_backbone(
            model.backbone, os.path.join(workdir, "export"), image_shape=shape
        )
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    logging.info("Results: %s", json.dumps({k: v for k, v in results.items() if "per_epoch" not in k}))
    return model, results


def raw_pixel_knn(config, bank, test) -> dict:
    """The same kNN on raw pixels: the baseline learned features have to beat."""
    bank_x, bank_y = knn.pixel_features(bank)
    test_x, test_y = knn.pixel_features(test)
    accs = knn.knn_accuracy(
        bank_x, bank_y, test_x, test_y, num_classes=config.data.num_classes,
        ks=tuple(config.eval.knn_ks), temperature=config.eval.knn_temperature,
    )
    return {f"k{k}": float(a) for k, a in accs.items()}
