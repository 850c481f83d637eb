"""MoCo as a `keras.Model`: query encoder, momentum key encoder, queue of negatives, InfoNCE.

Read `train_step` top to bottom: it is the whole method, as in the official `moco/builder.py`.
"""

import keras
import tensorflow as tf

from moco_tf import distribute, losses, momentum as momentum_lib

SCOPES = ("full", "projector", "none")
NEGATIVES = ("queue", "batch", "batch_both_views")


def _clone(model, name):
    """Same architecture, same initial weights (clone_model alone does not copy weights)."""
    clone = keras.models.clone_model(model)
    clone.name = name
    clone.set_weights(model.get_weights())
    return clone


def _freeze_variables(model):
    """Excludes `model`'s variables from gradients, but leaves its layers `trainable`.

    Keras runs a BatchNormalization layer with `trainable=False` in inference mode even when called
    with `training=True`; the key encoder must normalise with its own batch statistics (and update
    its moving averages) like the official code, so only the variables are frozen.
    """
    for v in model.weights:
        v.trainable = False


def _normalized_queue(shape, dtype=None):
    return tf.math.l2_normalize(tf.random.normal(shape, dtype=dtype or "float32"), axis=1)


@keras.saving.register_keras_serializable(package="moco_tf")
class MoCo(keras.Model):
    """Momentum Contrast (He et al. 2019) and its momentum-encoder family (Pham et al. 2022).

    The query encoder is `backbone` followed by `projector`; the key encoder is a copy of both whose
    weights follow the query encoder's by EMA and never receive gradients.

    Inputs to `fit`: a dataset of dicts `{"view1": [B, H, W, C], "view2": [B, H, W, C]}`, float32
    images in [0, 1] (two augmentations of the same images). `call(images)` returns the query
    backbone's features `[B, D]` (what you evaluate and export).

    Args:
      backbone: keras.Model, images [B, H, W, C] -> features [B, D].
      projector: keras.Model, [B, D] -> [B, dim].
      queue_size: K, the number of negative keys kept (ignored with `negatives="batch"`).
      momentum: m of the key-encoder EMA; a `MomentumSchedule` callback may change it during fit.
      temperature: T of InfoNCE.
      momentum_scope: "full" (MoCo: EMA of backbone + projector), "projector" (Pham et al.: EMA of the
        projector only, keys from the shared backbone's features, one backbone pass per view), or
        "none" (keys from the online encoder, SimCLR-style).
      negatives: "queue" (MoCo v1/v2), "batch" (MoCo v3: the other view's keys of the global
        batch) or "batch_both_views" (SimCLR's NT-Xent: the keys of both views, 2N - 2 negatives).
      symmetric: also contrast view2's query with view1's key and add the two losses.
      predictor: optional keras.Model [B, dim] -> [B, dim] on the query side only (MoCo v3).
      loss_scale: multiplies the loss (MoCo v3 uses 2T).
      weight_decay: L2 coefficient added to the gradients, as PyTorch SGD's `weight_decay` does.
      seed: seeds the shuffle-BN permutation of the key batch (a function of seed and step).
      augmenter: optional layer ``((view1, view2), step) -> (view1, view2)`` run first in
        ``train_step`` — the photometric augmentation on the accelerator
        (``data.PhotometricAugmenter``, ``data.augment_on="device"``); the views may be uint8.
      skip_nonfinite: a step whose loss (or gradient) is NaN/inf changes nothing (weights, BN
        statistics, optimizer slots, key encoder, queue keep their values; the step still counts
        in `optimizer.iterations`). Costs a copy of those variables per step, so it is off by
        default (config `train.on_nan=skip_step`). Either way each step logs `finite` (1.0 or
        0.0), which `callbacks.NonFiniteGuard` watches.

    Variables: `queue` [K, dim] and `queue_ptr` (int) hold the negatives; `momentum` holds m.
    """

    def __init__(
        self,
        backbone,
        projector,
        *,
        queue_size=65536,
        momentum=0.999,
        temperature=0.07,
        momentum_scope="full",
        negatives="queue",
        symmetric=False,
        predictor=None,
        loss_scale=1.0,
        weight_decay=0.0,
        seed=0,
        augmenter=None,
        skip_nonfinite=False,
        name="moco",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        if momentum_scope not in SCOPES:
            raise ValueError(f"momentum_scope must be one of {SCOPES}, got {momentum_scope!r}")
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
        self.backbone, self.projector = backbone, projector
        self.queue_size, self.temperature = queue_size, temperature
        self.momentum_scope, self.negatives, self.symmetric = momentum_scope, negatives, symmetric
        self.predictor, self.loss_scale = predictor, loss_scale
        self.weight_decay, self.seed = weight_decay, int(seed)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.augmenter = augmenter
        dim = projector.output_shape[-1]

        # Key encoder: a copy of the query encoder (or of its projector only), updated by EMA.
        self.key_backbone = _clone(backbone, "key_backbone") if momentum_scope == "full" else None
        self.key_projector = _clone(projector, "key_projector") if momentum_scope != "none" else None
        key_parts = [m for m in (self.key_backbone, self.key_projector) if m is not None]
        query_parts = [backbone, projector][-len(key_parts):] if key_parts else []
        # Pairs captured before freezing: both lists are in the same (architecture) order.
        self._ema_targets = [v for m in key_parts for v in m.trainable_weights]
        self._ema_sources = [v for m in query_parts for v in m.trainable_weights]
        for m in key_parts:
            _freeze_variables(m)

        self.momentum = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(momentum), trainable=False,
            name="momentum",
        )
        if negatives == "queue":
            self.queue = self.add_weight(
                shape=(queue_size, dim), initializer=_normalized_queue, trainable=False,
                name="queue",
            )
            self.queue_ptr = self.add_weight(
                shape=(), dtype="int32", initializer="zeros", trainable=False, name="queue_ptr"
            )
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.top1_tracker = keras.metrics.Mean(name="top1")
        self.built = True

    @property
    def metrics(self):
        return [self.loss_tracker, self.top1_tracker]

    def call(self, images, training=False):
        """Query-backbone features [B, D] of images [B, H, W, C]."""
        return self.backbone(images, training=training)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras (TF backend, under a strategy) builds the model symbolically from a first batch
        # averaged over the replicas; that average fails for dict inputs under
        # MultiWorkerMirroredStrategy (keras-team/keras#20329). MoCo is built in __init__, so
        # only the optimizer's slots are left to create, in the strategy's scope.
        optimizer = getattr(self, "optimizer", None)
        if self._distribute_strategy is not None and optimizer is not None and not optimizer.built:
            with self.distribute_strategy.scope():
                optimizer.build(self.trainable_variables)

    # --- the method ---------------------------------------------------------------------------

    def _query(self, features):
        z = self.projector(features, training=True)
        if self.predictor is not None:
            z = self.predictor(z, training=True)
        return tf.math.l2_normalize(tf.cast(z, tf.float32), 1)

    def _key(self, images, features, view=0):
        """Keys k for `images`; `features` are the online backbone's features of the same images."""
        if self.momentum_scope == "full":
            # Shuffle-BN: the key encoder sees the batch in another order, so its BN (sub-)batches
            # hold other images than the query's and BN statistics cannot reveal the positive.
            # Under several replicas the permutation spans the global batch (the same on all).
            step = tf.cast(self.optimizer.iterations, tf.int64)
            seed = tf.stack([tf.constant(self.seed, tf.int64) * 2 + view, step])
            shuffled, unshuffle = distribute.shuffle_across_replicas(images, seed)
            out = self.key_projector(self.key_backbone(shuffled, training=True), training=True)
            out = unshuffle(tf.cast(out, tf.float32))
        elif self.momentum_scope == "projector":
            out = self.key_projector(tf.stop_gradient(features), training=True)
        else:  # "none": the online encoder, with gradients
            return tf.math.l2_normalize(
                tf.cast(self.projector(features, training=True), tf.float32), 1
            )
        return tf.stop_gradient(tf.math.l2_normalize(tf.cast(out, tf.float32), 1))

    def _contrast(self, q, k, k_same_view=None):
        """Per-example InfoNCE loss [N] and contrastive top-1 hits [N] for queries q, keys k.

        `k_same_view`: keys of the query's own view, extra negatives for "batch_both_views".
        """
        if self.negatives == "queue":
            loss, logits = losses.info_nce_queue(q, k, self.queue, self.temperature)
            labels = tf.zeros(tf.shape(q)[:1], tf.int64)
        else:
            all_keys, offset = distribute.gather_with_offset(k)
            same = None
            if self.negatives == "batch_both_views":
                same = distribute.all_gather(k_same_view)
            loss, logits, labels = losses.info_nce_batch(
                q, all_keys, self.temperature, offset, same_view_keys=same
            )
            labels = tf.cast(labels, tf.int64)
        hits = tf.cast(tf.equal(tf.argmax(logits, axis=1), labels), tf.float32)
        return loss, hits

    def train_step(self, data):
        views, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        x1, x2 = views["view1"], views["view2"]
        if self.augmenter is not None:  # photometric augmentation here, for batch `step`
            x1, x2 = self.augmenter((x1, x2), self.optimizer.iterations)
        # skip_nonfinite: the state before this step (the forward pass already updates BN
        # statistics), put back below if the step turns out not finite.
        state = self._step_state() if self.skip_nonfinite else []
        saved = [tf.identity(v.value) for v in state]
        with tf.GradientTape() as tape:
            # Query encoder on view 1 (and view 2 when the loss is symmetric or keys need h2).
            h1 = self.backbone(x1, training=True)
            needs_h2 = self.symmetric or self.momentum_scope != "full"
            h2 = self.backbone(x2, training=True) if needs_h2 else None
            q1 = self._query(h1)
            # Key encoder on view 2: momentum encoder (no gradient) or the online one (scope none).
            k2 = self._key(x2, h2)
            k1 = self._key(x1, h1, view=1) if self.symmetric else None
            # InfoNCE: positives k+, negatives from the queue as it was before this batch.
            loss, hits = self._contrast(q1, k2, k1)
            if self.symmetric:
                loss_2, hits_2 = self._contrast(self._query(h2), k1, k2)
                loss, hits = loss + loss_2, (hits + hits_2) / 2
            loss = loss * self.loss_scale
            # Average over the global batch: gradients are summed across replicas.
            scaled_loss = tf.nn.compute_average_loss(loss)
            scaled_loss = self.optimizer.scale_loss(scaled_loss)

        # Optimizer step on the query encoder only.
        variables = self.trainable_variables
        grads = tape.gradient(scaled_loss, variables)
        # NaN/inf check (the loss alone can hide NaN gradients: a ReLU maps NaN to 0 on oneDNN).
        finite = self._all_finite(loss, grads, all_replicas=self.skip_nonfinite)
        if self.skip_nonfinite:  # zeros instead of NaN gradients, so no NaN reaches the optimizer
            grads = [None if g is None else tf.where(finite, g, tf.zeros_like(g)) for g in grads]
        if self.weight_decay:
            # The optimizer sums gradients over replicas and divides them by the loss scale: add
            # 1/replicas of the decay on each, scaled like the loss.
            wd = self.optimizer.scale_loss(self.weight_decay / distribute.num_replicas())
            grads = [g + tf.cast(wd, g.dtype) * tf.cast(v, g.dtype)
                     for g, v in zip(grads, variables)]
        step = tf.identity(self.optimizer.iterations)
        self.optimizer.apply_gradients(zip(grads, variables))
        # The step counter is the data position (resume) and the schedules' clock, so every batch
        # counts: a LossScaleOptimizer does not count a step it skips (fp16 overflow).
        self.optimizer.iterations.assign(step + 1)

        # Momentum update of the key encoder: theta_k <- m * theta_k + (1 - m) * theta_q.
        momentum_lib.ema_update(self._ema_targets, self._ema_sources, self.momentum)

        # Enqueue the global batch's keys of one view only (after both losses, so no positive leaks).
        if self.negatives == "queue":
            self._enqueue(distribute.all_gather(k2))

        if self.skip_nonfinite:
            # Not finite: every variable the step wrote gets its old value back (one select per
            # variable: no tf.cond around apply_gradients, which a strategy cannot merge_call in).
            for v, old in zip(state, saved):
                v.assign(tf.where(finite, v.value, old))
            weight = tf.cast(finite, tf.float32)  # a skipped step leaves the running means alone
            self.loss_tracker.update_state(
                tf.where(finite, tf.reduce_mean(loss), 0.0), sample_weight=weight)
            self.top1_tracker.update_state(
                tf.where(finite, tf.reduce_mean(hits), 0.0), sample_weight=weight)
        else:
            self.loss_tracker.update_state(tf.reduce_mean(loss))
            self.top1_tracker.update_state(tf.reduce_mean(hits))
        logs = {
            "loss": self.loss_tracker.result(),
            "batch_loss": tf.reduce_mean(loss),  # this step's own loss (StepLog), not a mean
            "top1": self.top1_tracker.result(),
            "momentum": tf.identity(self.momentum),
            "lr": tf.cast(self.optimizer.learning_rate, tf.float32),
            "finite": tf.cast(finite, tf.float32),  # 0.0: NaN/inf loss or gradient (skipped?)
        }
        return distribute.step_logs(logs)

    def _step_state(self):
        """The variables a step writes, except the step counter: model variables (weights, BN
        statistics, key encoder, queue, m) and optimizer slots. A LossScaleOptimizer's own scale
        is left to it: it skips overflowing steps itself."""
        optimizer = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        counter = id(optimizer.iterations)
        return list(self.variables) + [v for v in optimizer.variables if id(v) != counter]

    def _all_finite(self, loss, grads, all_replicas=False):
        """True if the loss (and, without loss scaling, every gradient) is finite; with
        `all_replicas`, on every replica, so that all replicas take the same decision."""
        finite = tf.reduce_all(tf.math.is_finite(loss))
        if not isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            checks = [tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None]
            finite = tf.logical_and(finite, tf.reduce_all(tf.stack(checks)))
        ctx = tf.distribute.get_replica_context()
        if all_replicas and ctx is not None and ctx.num_replicas_in_sync > 1:
            not_finite = ctx.all_reduce(tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
            finite = tf.equal(not_finite, 0.0)
        return finite

    def _enqueue(self, keys):
        """Writes keys [M, dim] at the queue pointer, oldest keys first out (a ring buffer)."""
        n = tf.shape(keys)[0]
        rows = (self.queue_ptr + tf.range(n, dtype=tf.int32)) % self.queue_size
        self.queue.assign(
            tf.tensor_scatter_nd_update(self.queue, rows[:, None], tf.cast(keys, self.queue.dtype))
        )
        self.queue_ptr.assign((self.queue_ptr + n) % self.queue_size)

    def get_config(self):
        return {
            **super().get_config(),
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "projector": keras.saving.serialize_keras_object(self.projector),
            "queue_size": self.queue_size,
            "momentum": float(self.momentum.numpy()),
            "temperature": self.temperature,
            "momentum_scope": self.momentum_scope,
            "negatives": self.negatives,
            "symmetric": self.symmetric,
            "predictor": (
                None if self.predictor is None
                else keras.saving.serialize_keras_object(self.predictor)
            ),
            "loss_scale": self.loss_scale,
            "weight_decay": self.weight_decay,
            "seed": self.seed,
            "augmenter": (
                None if self.augmenter is None
                else keras.saving.serialize_keras_object(self.augmenter)
            ),
            "skip_nonfinite": self.skip_nonfinite,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("backbone", "projector", "predictor", "augmenter"):
            if config.get(key) is not None:
                config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)
