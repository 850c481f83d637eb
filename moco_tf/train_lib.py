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
        zero_init_residual=m.zero_init_residual,
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
                                          last_bn=m.predictor_last_bn, **head_norm)
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
    """Training images per second in the steady state, before any evaluation callback runs.

    Timed per epoch from the second step of each `fit`: its first step traces the step function
    and starts the input pipeline, which would count against a short or resumed run. Place it
    first among the callbacks: its epoch end then comes before the kNN monitor's.
    `clock`: seconds, `time.perf_counter` unless a test gives another.
    """

    def __init__(self, batch_size, clock=time.perf_counter):
        super().__init__()
        self.batch_size, self.clock = batch_size, clock
        self.timed_seconds, self.timed_steps = 0.0, 0  # from each fit's second step on
        self.train_seconds, self.epochs = 0.0, 0  # everything, for the record

    def on_train_begin(self, logs=None):
        self._first_of_fit = True

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self.clock()
        self._start = None if self._first_of_fit else self._epoch_start
        self._start_batch, self._last_batch = 0, -1

    def on_train_batch_end(self, batch, logs=None):
        self._last_batch = batch  # with steps_per_execution > 1: the execution's last step
        if self._start is None:  # the first step of this fit: not timed
            self._start, self._start_batch = self.clock(), batch + 1
            self._first_of_fit = False

    def on_epoch_end(self, epoch, logs=None):
        now = self.clock()
        self.train_seconds += now - self._epoch_start
        self.epochs += 1
        if self._start is not None:
            self.timed_seconds += now - self._start
            self.timed_steps += self._last_batch + 1 - self._start_batch

    def images_per_sec(self):
        """None if no step was timed (nothing trained, or fits of one step)."""
        if not self.timed_steps or self.timed_seconds <= 0:
            return None
        return self.timed_steps * self.batch_size / self.timed_seconds


class _RunProgressBar(callbacks_lib.ProgressBar):
    """The progress bar numbered by the run, not by each `fit`: after a mid-epoch resume the
    first `fit` covers the rest of one epoch, which Keras alone shows as "Epoch 1/1" with its
    steps counted from 1. `first_step`: steps of the current epoch done before this fit."""

    def __init__(self, epochs, steps_per_epoch):
        super().__init__()
        self.run_epochs, self.run_steps, self.first_step = epochs, steps_per_epoch, 0

    def set_params(self, params):
        super().set_params(params)
        self.epochs, self.target = self.run_epochs, self.run_steps

    def _update_progbar(self, batch, logs=None):
        super()._update_progbar(batch + self.first_step, logs)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        self.first_step = 0  # the next epoch starts at its step 1


STEP_LOG = "steps.jsonl"
CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"  # the run's config, flattened: what a resume is checked against
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
        for callback in callbacks:
            if isinstance(callback, _RunProgressBar):
                callback.first_step = done
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
            loss = record["loss"]  # null: a NaN/inf step (JSON has no NaN)
            losses[(step - 1) // epoch_steps].append(math.nan if loss is None else loss)
    return [float(np.mean(x)) if x else None for x in losses]


def train_and_evaluate(config, workdir, callbacks=()):
    """Trains MoCo, evaluates kNN on the query backbone, exports it.

    `callbacks`: extra Keras callbacks for `fit` (they run after the kNN monitor).

    Resumes by itself: if `<workdir>/checkpoints` holds a checkpoint, training continues from its
    step exactly as if it had not stopped (see `moco_tf.checkpoint`); a config that changes what
    defines the run (`config.resume_changes`, against `<workdir>/config.json`) is refused with a
    `ConfigError`. Writes `<workdir>/config.json`, `steps.jsonl`
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
    step rate (docs/checkpoints.md: the measured cost). The thread count can only be set before
    TensorFlow starts: later (e.g. after a `model.fit`) this warns and keeps the old pools.
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
    checkpoint_dir = os.path.join(workdir, CHECKPOINT_DIR)
    # Another run's workdir is refused before anything is built.
    _check_config_of_run(config, workdir,
                         resuming=bool(checkpoint_lib.checkpoints_in(checkpoint_dir)))
    keras.utils.set_random_seed(config.seed)

    epoch_steps = steps_per_epoch(config)
    epochs = config.train.epochs
    total_steps = epoch_steps * epochs
    batch = config.train.batch_size
    logging.info("Training %d epochs x %d steps of %d images.", epochs, epoch_steps, batch)
    late = [e for e in config.train.lr_decay_epochs if e >= epochs]
    if config.train.lr_schedule == "step" and late:  # e.g. a recipe shortened to a test run
        logging.warning("train.lr_decay_epochs %s: the lr decays at epochs %s come at or after "
                        "the last epoch (%d) and never happen.",
                        tuple(config.train.lr_decay_epochs), ", ".join(map(str, late)), epochs)

    # Model, optimizer (its slots are built by the restore) and queue are variables of the strategy;
    # `fit` then splits each global batch over the replicas.
    with strategy.scope():
        model = build_model(config, total_steps, epoch_steps)
        # Resume: the whole training state from the newest intact checkpoint in the workdir, if any.
        checkpointer = checkpoint_lib.Checkpointer(
            checkpoint_dir, model, max_to_keep=config.train.keep_checkpoints, seed=config.seed,
            batch_size=batch, steps_per_epoch=epoch_steps, epochs=epochs,
        )
        start_step = checkpointer.restore_latest() or 0
    if start_step > total_steps:
        raise config_lib.ConfigError(
            f"The checkpoint {checkpointer.latest_checkpoint} is at step {start_step}, past the "
            f"{total_steps} steps this config trains (train.epochs={epochs} x {epoch_steps} "
            f"steps): there is nothing to train. Set train.epochs="
            f"{math.ceil(start_step / epoch_steps)} to evaluate and export it again, or use a "
            f"new --workdir.")
    _write_json(os.path.join(workdir, CONFIG_FILE), config_lib.json_values(config))
    step_log = os.path.join(workdir, STEP_LOG)
    results_path = os.path.join(workdir, "results.json")
    previous = _read_json(results_path) if start_step else None  # a rerun keeps its figures
    if start_step == total_steps:
        logging.info("Training already complete (step %d of %d, in %s); evaluating and "
                     "exporting.", start_step, total_steps, checkpointer.directory)
    elif start_step:
        logging.info("Resuming from step %d of %d (%s done), from %s.", start_step, total_steps,
                     checkpoint_lib.describe_step(start_step, epoch_steps, epochs),
                     checkpointer.directory)
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
        callbacks.append(_RunProgressBar(epochs, epoch_steps))

    try:
        _fit_from(model, config, start_step, epoch_steps, callbacks)
    except KeyboardInterrupt:
        raise errors.Interrupted(_save_on_interrupt(model, checkpointer, epoch_steps, total_steps)) from None

    try:
        results = _evaluate_and_export(config, workdir, model, monitor, previous,
                                       throughput=throughput, nan_guard=nan_guard,
                                       start_step=start_step, epoch_steps=epoch_steps)
    except KeyboardInterrupt:  # training is done and saved: only the evaluation is lost
        raise errors.Interrupted(
            f"Interrupted after training, during the evaluation and export; all {total_steps} "
            f"steps are saved ({checkpointer.latest_checkpoint}). Rerun the same command to "
            f"evaluate and export (nothing is left to train).") from None
    failed = []
    if monitor is not None and "knn_top1" not in results:
        failed.append(f"the final kNN evaluation failed ({monitor.errors[-1][1]})"
                      if monitor.errors else "the final kNN evaluation did not run")
    failed += [f"the {e['step']} failed ({e['error']})" for e in results.get("eval_errors", [])]
    if failed:
        kept = "checkpointed" + (" and exported" if "export_dir" in results else "")
        raise errors.EvaluationError(
            f"Trained, {kept}, but {'; '.join(failed)}; results.json has the rest. Rerun the "
            f"same command to evaluate again"
            + (", or set eval.knn_every_epochs=0." if monitor is not None else "."))
    return model, results


def _evaluate_and_export(config, workdir, model, monitor, previous, *, throughput, nan_guard,
                         start_step, epoch_steps):
    """After training: results.json with the losses, throughput and kNN accuracies, the export
    and the embedding projector. A failed evaluation step (e.g. an evaluation folder with no
    decodable image) is logged and listed in results["eval_errors"]; the others still run."""
    epochs = config.train.epochs
    loss_per_epoch = _loss_per_epoch(os.path.join(workdir, STEP_LOG), epoch_steps, epochs)
    speed = throughput.images_per_sec()
    trained = throughput.epochs > 0
    if speed is None and previous:  # a rerun with nothing (timed) left to train
        speed = previous.get("images_per_sec")
    results = {
        "epochs": epochs,
        "steps": int(model.optimizer.iterations.numpy()),
        "resumed_from_step": start_step,
        # Of the training this call did, from each fit's second step (else the previous call's).
        "images_per_sec": round(speed, 2) if speed is not None else None,
        "train_seconds": (round(throughput.train_seconds, 1) if trained or not previous
                          else previous.get("train_seconds")),
        "final_loss": loss_per_epoch[-1],
        "loss_per_epoch": loss_per_epoch,
        "skipped_steps": len(nan_guard.skipped_steps),  # train.on_nan=skip_step
    }
    if config.data.source == "image_folder":
        results["skipped_images"] = len(image_folder.skipped_files(config.data.data_dir))
    eval_errors = []

    def guarded(step, fn):
        """fn(), or None with the failure logged and recorded: one evaluation step failing
        must not cost the others, nor the results.json of the training."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001  whatever failed, the rest may still work
            message = f"{type(e).__name__}: {workdir_lib.first_line(e)}"
            logging.error("The %s failed (%s).", step, message)
            eval_errors.append({"step": step, "error": message})
            return None

    if monitor is not None:
        ks = tuple(config.eval.knn_ks)
        evaluated = monitor.history and monitor.history[-1][0] == epochs
        if not evaluated and not monitor.errors:  # nothing left to train: evaluate the
            monitor.set_model(model)              # restored weights
            monitor.record(epochs)
        if monitor.history and monitor.history[-1][0] == epochs:
            last = monitor.history[-1][1]
            results["knn_top1"] = float(last[ks[0]])
            results.update({f"knn_top1_k{k}": float(last[k]) for k in ks[1:]})
        if monitor.errors:
            results["knn_errors"] = [{"epoch": e, "error": m} for e, m in monitor.errors]
        results["knn_per_epoch"] = [
            {"epoch": e, **{f"k{k}": float(a) for k, a in accs.items()}} for e, accs in monitor.history
        ]
        if config.eval.raw_pixel_baseline:  # the same kNN on the pixels themselves
            accs = guarded("raw-pixel kNN baseline", lambda: knn.evaluate_knn(
                None, monitor.bank_dataset, monitor.test_dataset,
                num_classes=config.data.num_classes, ks=ks,
                temperature=config.eval.knn_temperature))
            if accs is not None:
                results["knn_top1_raw_pixels"] = {f"k{k}": float(a) for k, a in accs.items()}
    if config.eval.export:
        shape = (config.data.image_size, config.data.image_size, config.data.channels)
        results["export_dir"] = export_lib.export_backbone(
            model.backbone, os.path.join(workdir, "export"), image_shape=shape
        )
        # Test-set features with labels for TensorBoard's embedding projector.
        examples = guarded("embedding projector", lambda: projector.write_embedding_projector(
            model.backbone,
            data_lib.eval_dataset(config.data, config.data.eval_split, config.eval.batch_size),
            os.path.join(workdir, "tensorboard", "projector"), max_examples=PROJECTOR_EXAMPLES,
            class_names=datasets.class_names(config.data),
        ))
        if examples is not None:
            results["projector_examples"] = examples
    if eval_errors:
        results["eval_errors"] = eval_errors
    results = _json_safe(results)
    _write_json(os.path.join(workdir, "results.json"), results)
    logging.info("Results: %s", json.dumps({k: v for k, v in results.items() if "per_epoch" not in k}))
    return results


def _check_config_of_run(config, workdir, resuming):
    """A resume must continue the same run: the values that define its math are those in
    `<workdir>/config.json`, else `ConfigError` listing each change (key old -> new). Safe
    changes (`config.RESUMABLE`) are logged; a longer or shorter `train.epochs` stretches the
    schedules. A workdir written before config.json existed resumes unchecked."""
    path = os.path.join(workdir, CONFIG_FILE)
    saved = _read_json(path) if resuming else None
    if not isinstance(saved, dict):
        return
    refused, allowed = config_lib.resume_changes(saved, config)
    if refused:
        changes = ", ".join(f"{k} {config_lib.show_value(old)} -> {config_lib.show_value(new)}"
                            for k, old, new in refused)
        raise config_lib.ConfigError(
            f"{workdir} holds a run with other values of what defines it: {changes}; resuming "
            f"would continue another run. Put the values back ({path} has the run's config), or "
            f"use a new --workdir.")
    for key, old, new in allowed:
        if key == "train.epochs":
            logging.warning("train.epochs %s -> %s: the lr and momentum schedules stretch to the "
                            "new length, so the steps after the resume follow another schedule "
                            "than those before it.", old, new)
        else:
            logging.info("Resuming with %s %s -> %s.", key, config_lib.show_value(old),
                         config_lib.show_value(new))


def _read_json(path):
    """The JSON object in `path`, or None if there is none or it is damaged."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path, value):
    """Writes valid JSON (no bare NaN) to `path` atomically: a crash leaves the old file whole."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
