"""From a config to a trained, evaluated and exported model: what `train.py` runs.

`build_model(config)` is also the way to get a compiled MoCo model for your own `model.fit`.
"""

import contextlib
import json
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from moco_tf import callbacks as callbacks_lib
from moco_tf import checkpoint as checkpoint_lib
from moco_tf import config as config_lib
from moco_tf import data as data_lib
from moco_tf import distribute, errors
from moco_tf import export as export_lib
from moco_tf import momentum as momentum_lib
from moco_tf import workdir as workdir_lib
from moco_tf.data import datasets, image_folder
from moco_tf.eval import knn, projector
from moco_tf.models import backbones, heads
from moco_tf.models.contrastive import MoCo
from moco_tf.optimizers import LARS, SGD


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

    Sets the global Keras dtype policy to `config.precision` first ("auto": bfloat16 where the
    hardware computes it, else float32; `distribute.resolve_precision`).
    """
    keras.mixed_precision.set_global_policy(distribute.resolve_precision(config.precision))
    d, m, c = config.data, config.model, config.moco
    backbone = backbones.build_backbone(
        m.backbone, (d.image_size, d.image_size, d.channels), cifar_stem=m.cifar_stem,
        stem_stride=m.stem_stride, norm=m.norm, split_bn_groups=m.split_bn_groups, mean=d.mean,
        std=d.std, width=m.width, patch_size=m.patch_size,
    )
    feature_dim = backbone.output_shape[-1]
    head_norm = {"norm": m.norm, "split_bn_groups": m.split_bn_groups}
    projector = heads.build_projector(
        m.projector, feature_dim, c.dim, hidden_dim=m.projector_hidden_dim or feature_dim,
        **({"num_layers": m.projector_layers, "use_bn": m.projector_bn,
            "last_bn": m.projector_bn, **head_norm} if m.projector == "mlp" else {}),
    )
    predictor = None
    if m.predictor:
        predictor = heads.build_predictor(c.dim, c.dim, m.predictor_hidden_dim or feature_dim,
                                          **head_norm)
    model = MoCo(
        backbone, projector, queue_size=c.queue_size, momentum=c.momentum,
        temperature=c.temperature, momentum_scope=c.momentum_scope, negatives=c.negatives,
        symmetric=c.symmetric, predictor=predictor, loss_scale=c.loss_scale,
        seed=config.seed, skip_nonfinite=config.train.get("on_nan", "stop") == "skip_step",
        augmenter=(data_lib.augment.PhotometricAugmenter(d.augmentation, config.seed)
                   if d.augment_on == "device" else None),
    )
    t = config.train
    lr = learning_rate(config, total_steps, epoch_steps)
    if t.optimizer == "adamw":  # torch.optim.AdamW's defaults (Keras' epsilon is 1e-7)
        optimizer = keras.optimizers.AdamW(lr, weight_decay=t.weight_decay, beta_1=0.9,
                                           beta_2=0.999, epsilon=1e-8)
    else:  # both with PyTorch's update rules
        optimizer = {"sgd": SGD, "lars": LARS}[t.optimizer](
            lr, momentum=t.optimizer_momentum, weight_decay=t.weight_decay)
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

    def __init__(self, batch_size):
        super().__init__()
        self.batch_size, self.epoch_seconds, self.epoch_images = batch_size, [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_seconds.append(time.perf_counter() - self._start)
        # params["steps"]: the first epoch after a mid-epoch resume is shorter.
        self.epoch_images.append(self.params["steps"] * self.batch_size)

    def images_per_sec(self):
        # The first epoch includes tracing the step; leave it out when there are others.
        if not self.epoch_seconds:
            return 0.0
        skip = 1 if len(self.epoch_seconds) > 1 else 0
        return sum(self.epoch_images[skip:]) / sum(self.epoch_seconds[skip:])


STEP_LOG = "steps.jsonl"
CHECKPOINT_DIR = "checkpoints"
PROJECTOR_EXAMPLES = 2000  # test images shown in TensorBoard's embedding projector


def train_input(config, strategy, start_batch=0):
    """The training batches `fit` reads, from batch `start_batch` on.

    One pipeline of global batches, which Keras splits over the replicas, except for records
    (image folders, tfds ImageNet) under several replicas: there every input pipeline (one per
    host) reads its own share of the files and yields per-replica batches
    (`distribute_datasets_from_function`), so no host decodes the images of another.
    """
    d, batch = config.data, config.train.batch_size
    if strategy.num_replicas_in_sync > 1 and datasets.uses_records(d) and not d.service_address:
        return strategy.distribute_datasets_from_function(
            lambda context: data_lib.train_dataset(d, batch, config.seed, start_batch=start_batch,
                                                   input_context=context))
    return data_lib.train_dataset(d, batch, config.seed, start_batch=start_batch)


def _fit_from(model, config, start_step, epoch_steps, callbacks):
    """Trains from global step `start_step` to the end; step i always trains on batch i.

    Keras numbers the steps of each epoch from 0 and `steps_per_epoch` is fixed per `fit`, so a
    resume in the middle of epoch e runs one `fit` for the rest of epoch e (fewer steps) and one
    for the epochs after it. Each `fit` gets the pipeline started at its first batch
    (`start_batch`): the batches, the lr and momentum schedules (read from
    `optimizer.iterations`) and the shuffle-BN permutations are those of an uninterrupted run.
    Returns the Keras History objects.
    """
    epochs = config.train.epochs
    epoch, done = divmod(start_step, epoch_steps)

    def fit(first_epoch, end_epoch, steps, first_batch):
        train_ds = train_input(config, model.distribute_strategy, first_batch)
        return model.fit(
            train_ds, initial_epoch=first_epoch, epochs=end_epoch, steps_per_epoch=steps,
            callbacks=callbacks, verbose=config.train.verbose, shuffle=False,  # tf.data shuffles
        )

    histories = []
    if done and epoch < epochs:
        histories.append(fit(epoch, epoch + 1, epoch_steps - done, start_step))
        epoch += 1
    if epoch < epochs:
        histories.append(fit(epoch, epochs, epoch_steps, epoch * epoch_steps))
    return histories


def _loss_per_epoch(step_log_path, epoch_steps, epochs):
    """Mean per-step loss of each epoch from the step log (complete across resumes)."""
    losses = [[] for _ in range(epochs)]
    for step, record in callbacks_lib.read_step_log(step_log_path).items():
        if "loss" in record and 1 <= step <= epochs * epoch_steps:
            losses[(step - 1) // epoch_steps].append(record["loss"])
    return [float(np.mean(x)) if x else None for x in losses]


def train_and_evaluate(config, workdir, callbacks=()):
    """Trains MoCo, evaluates kNN on the query backbone, exports it.

    `callbacks`: extra Keras callbacks for `fit` (they run after the kNN monitor).

    Resumes by itself: if `<workdir>/checkpoints` holds a checkpoint, training continues from its
    step exactly as if it had not stopped (see `moco_tf.checkpoint`). Writes `<workdir>/steps.jsonl`
    (one line per step), `knn.jsonl` (one per kNN evaluation), `tensorboard/` (with the embedding
    projector of test-set features when `eval.export`), `export/` and `results.json`.

    Before building anything it validates the config and checks its data paths (`ConfigError`),
    and checks that the workdir is writable and locks it against a second run (`WorkdirError`).
    A NaN/inf step stops training or is skipped (`train.on_nan`); no checkpoint of non-finite
    weights is ever written. Failures a user can act on are raised as one of `CLEAR_ERRORS`
    with a message saying what to do (an out-of-memory names the config values to turn down).

    Returns:
      (model, results): the trained MoCo model and the dict written to `<workdir>/results.json`.
    """
    config_lib.validate(config)
    datasets.check(config)
    with contextlib.ExitStack() as cleanup, errors.explained_failures(config):
        return _train_and_evaluate(config, workdir, callbacks, cleanup)


def make_ops_deterministic():
    """Bit-identical reruns (`config.deterministic`): op determinism and one inter-op thread.

    `enable_op_determinism` alone is not enough on CPU: with a symmetric loss and an EMA key
    encoder (the quickstart), reruns differed from step ~10-20 on (1e-5 in the loss at first),
    while MoCo v2 and SimCLR did not in 30. Ops running side by side change how a kernel splits
    its work; one inter-op thread removes that (identical over 100 steps, measured) but costs
    the quickstart ~25% of its step rate on 2 cores (455 vs 600 img/s). The thread count can only
    be set before TensorFlow starts: later (e.g. after a `model.fit`) this warns and keeps the
    old pools.
    """
    tf.config.experimental.enable_op_determinism()
    if tf.config.threading.get_inter_op_parallelism_threads() == 1:
        return
    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        logging.warning("config.deterministic: TensorFlow has already started, so its inter-op "
                        "thread pool stays as it is, and runs may differ in the last bits. "
                        "Call moco_tf.train_lib.make_ops_deterministic() before using TensorFlow.")


def _train_and_evaluate(config, workdir, extra_callbacks, cleanup):
    """The body of `train_and_evaluate`; `cleanup` (an ExitStack) releases the workdir lock."""
    if config.deterministic:  # before the strategy: the thread pools are set before TF starts
        make_ops_deterministic()
    # The strategy first: a multi-worker one must exist before TensorFlow runs anything.
    strategy = distribute.create_strategy(config.train.strategy)
    distribute.check_config(config, strategy)
    workdir = distribute.worker_workdir(workdir, strategy)
    # Writable (else a clear error now, not at the first checkpoint) and ours alone.
    cleanup.enter_context(workdir_lib.claim(workdir))
    keras.utils.set_random_seed(config.seed)

    epoch_steps = steps_per_epoch(config)
    total_steps = epoch_steps * config.train.epochs
    batch = config.train.batch_size
    logging.info("Training %d epochs x %d steps of %d images.", config.train.epochs, epoch_steps, batch)

    # Model, optimizer (its slots are built by the restore) and queue are variables of the strategy;
    # `fit` then splits each global batch over the replicas.
    with strategy.scope():
        model = build_model(config, total_steps, epoch_steps)
        # Resume: the whole training state from the newest intact checkpoint in the workdir, if any.
        checkpointer = checkpoint_lib.Checkpointer(
            os.path.join(workdir, CHECKPOINT_DIR), model,
            max_to_keep=config.train.keep_checkpoints, seed=config.seed, batch_size=batch,
        )
        start_step = checkpointer.restore_latest() or 0
    step_log = os.path.join(workdir, STEP_LOG)
    if start_step >= total_steps:
        logging.info("Training already complete (step %d of %d, in %s); evaluating and "
                     "exporting.", start_step, total_steps, checkpointer.directory)
    elif start_step:
        logging.info("Resuming from step %d of %d (epoch %d of %d, step %d of it), from %s.",
                     start_step, total_steps, start_step // epoch_steps + 1, config.train.epochs,
                     start_step % epoch_steps, checkpointer.directory)
    elif os.path.exists(step_log):
        os.remove(step_log)  # a fresh run: the log of an earlier one would be mixed in

    throughput = _Throughput(batch)
    nan_guard = callbacks_lib.NonFiniteGuard(config.train.get("on_nan", "stop"), checkpointer)
    # Order matters: the step log, then the NaN/inf guard, then the checkpoint — every
    # checkpointed step is logged and finite — and only then evaluation: a failure in it can
    # never cost the epoch's checkpoint.
    callbacks = [throughput, momentum_schedule(config, total_steps),
                 callbacks_lib.StepLog(step_log), nan_guard,
                 callbacks_lib.PeriodicCheckpoint(checkpointer,
                                                  config.train.checkpoint_every_steps, epoch_steps)]
    monitor = None
    if config.eval.knn_every_epochs:
        bank = data_lib.eval_dataset(config.data, config.data.train_split, config.eval.batch_size)
        test = data_lib.eval_dataset(config.data, config.data.eval_split, config.eval.batch_size)
        monitor = knn.KNNMonitor(
            bank, test, config.data.num_classes, every_n_epochs=config.eval.knn_every_epochs,
            ks=tuple(config.eval.knn_ks), temperature=config.eval.knn_temperature,
            stop_on_error=False, history_path=os.path.join(workdir, "knn.jsonl"),
        )
        monitor.restore_history(start_step // epoch_steps)  # a resumed run keeps its curve
        callbacks.append(monitor)
    callbacks += list(extra_callbacks)
    sample = next(iter(data_lib.train_dataset(config.data, min(batch, 8), config.seed)))
    callbacks.append(callbacks_lib.TrainingSummaries(
        os.path.join(workdir, "tensorboard"), config.train.summary_every_steps,
        hparams=config_lib.hparams(config), sample_views=sample))
    if config.train.verbose:  # last: it shows what the others put in the logs (kNN)
        callbacks.append(callbacks_lib.ProgressBar())

    try:
        _fit_from(model, config, start_step, epoch_steps, callbacks)
    except KeyboardInterrupt:
        raise errors.Interrupted(_save_on_interrupt(model, checkpointer, epoch_steps, total_steps)) from None

    loss_per_epoch = _loss_per_epoch(step_log, epoch_steps, config.train.epochs)
    results = {
        "epochs": config.train.epochs,
        "steps": total_steps,
        "resumed_from_step": start_step,
        # Of the training this call did (None if there was none left to do).
        "images_per_sec": (round(throughput.images_per_sec(), 2) if throughput.epoch_seconds
                           else None),
        "train_seconds": round(sum(throughput.epoch_seconds), 1),
        "final_loss": loss_per_epoch[-1],
        "loss_per_epoch": loss_per_epoch,
        "skipped_steps": len(nan_guard.skipped_steps),  # train.on_nan=skip_step
    }
    if config.data.source == "image_folder":
        results["skipped_images"] = len(image_folder.skipped_files(config.data.data_dir))
    if monitor is not None:
        ks = tuple(config.eval.knn_ks)
        evaluated = monitor.history and monitor.history[-1][0] == config.train.epochs
        if not evaluated and not monitor.errors:  # nothing left to train: evaluate the
            monitor.set_model(model)              # restored weights
            monitor.record(config.train.epochs)
        if monitor.history and monitor.history[-1][0] == config.train.epochs:
            last = monitor.history[-1][1]
            results["knn_top1"] = float(last[ks[0]])
            results.update({f"knn_top1_k{k}": float(last[k]) for k in ks[1:]})
        if monitor.errors:
            results["knn_errors"] = [{"epoch": e, "error": m} for e, m in monitor.errors]
        results["knn_per_epoch"] = [
            {"epoch": e, **{f"k{k}": float(a) for k, a in accs.items()}} for e, accs in monitor.history
        ]
        if config.eval.raw_pixel_baseline:  # the same kNN on the pixels themselves
            accs = knn.evaluate_knn(None, bank, test, num_classes=config.data.num_classes,
                                    ks=ks, temperature=config.eval.knn_temperature)
            results["knn_top1_raw_pixels"] = {f"k{k}": float(a) for k, a in accs.items()}
    if config.eval.export:
        shape = (config.data.image_size, config.data.image_size, config.data.channels)
        results["export_dir"] = export_lib.export_backbone(
            model.backbone, os.path.join(workdir, "export"), image_shape=shape
        )
        # Test-set features with labels for TensorBoard's embedding projector.
        results["projector_examples"] = projector.write_embedding_projector(
            model.backbone,
            data_lib.eval_dataset(config.data, config.data.eval_split, config.eval.batch_size),
            os.path.join(workdir, "tensorboard", "projector"), max_examples=PROJECTOR_EXAMPLES,
            class_names=datasets.class_names(config.data),
        )
    results = _json_safe(results)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, allow_nan=False)
    logging.info("Results: %s", json.dumps({k: v for k, v in results.items() if "per_epoch" not in k}))
    if monitor is not None and "knn_top1" not in results:
        raise errors.EvaluationError(
            f"Trained, checkpointed{' and exported' if config.eval.export else ''}, but the final "
            f"kNN evaluation failed ({monitor.errors[-1][1]}); results.json has the rest. Rerun "
            f"the same command to evaluate again, or set eval.knn_every_epochs=0.")
    return model, results


def _json_safe(value):
    """results with NaN/inf as null: `json` would write bare NaN, which is not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _save_on_interrupt(model, checkpointer, epoch_steps, total_steps) -> str:
    """Ctrl-C: a checkpoint of the last finished step (steps are atomic: the interrupt lands
    between them), and the message saying how to resume."""
    step = int(model.optimizer.iterations.numpy())
    bad = callbacks_lib.nonfinite_variables(model)
    if bad:
        return (f"Interrupted at step {step} of {total_steps}; not saved: {len(bad)} variables "
                f"are not finite. Rerun the same command to resume from the last checkpoint.")
    try:
        path = checkpointer.save(step, step // epoch_steps)
    except checkpoint_lib.CheckpointError as e:
        return f"Interrupted at step {step} of {total_steps}; the checkpoint failed: {e}"
    return (f"Interrupted at step {step} of {total_steps}; saved {path}. Rerun the same "
            f"command to resume from there.")
