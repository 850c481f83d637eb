"""MoCo as a `keras.Model`: query encoder, momentum key encoder, negatives, InfoNCE.

`_contrastive_step` is Algorithm 1 of the paper, as the official `moco/builder.py` reads: queries,
keys, contrast, optimizer step, momentum update, enqueue. What the method varies lives in two
parts (`key_encoder.KeyEncoder`: which part has an EMA copy; `negatives.Negatives`: queue or
batch); what every step needs around it (NaN skip, logs) wraps it in `train_step`.
"""

import keras
import tensorflow as tf

from moco_tf import distribute
from moco_tf.config import check_method
from moco_tf.models.key_encoder import KeyEncoder
from moco_tf.models.negatives import Negatives


@keras.saving.register_keras_serializable(package="moco_tf")
class MoCo(keras.Model):
    """Momentum Contrast (He et al. 2019) and its momentum-encoder family (Pham et al. 2022).

    The query encoder is `backbone` followed by `projector` (and, MoCo v3, `predictor`); the key
    encoder (`key_encoder`) holds the EMA copy of the part the scope names; `negatives` holds the
    queue (or takes in-batch keys).

    Inputs to `fit`: a dataset of dicts `{"view1": [B, H, W, C], "view2": [B, H, W, C]}`, float32
    images in [0, 1] — or uint8 crops with an `augmenter` (two augmentations of the same
    images). `call(images)` (and `predict`) returns the query backbone's features `[B, D]` of
    float images in [0, 1] or integer ones in 0..255. `backbone` itself takes floats in [0, 1]
    only: Keras casts integers to float 0..255 before its first layer, without an error.

    Args:
      backbone: keras.Model, images [B, H, W, C] -> features [B, D].
      projector: keras.Model, [B, D] -> [B, dim].
      queue_size: K, the number of negative keys kept (negatives "queue").
      momentum: m of the key-encoder EMA; a `MomentumSchedule` callback may change it during fit.
      temperature: T of InfoNCE.
      momentum_scope: "full" (MoCo), "from:<block>" (EMA of the blocks from `<block>` on and the
        projector), "projector" (Pham et al.) or "none" (SimCLR): see `key_encoder`.
      negatives: "queue" (MoCo v1/v2), "batch" (MoCo v3) or "both_views" (SimCLR's NT-Xent; needs
        `symmetric`): see `negatives`. A combination that would not compute what it says
        (both_views without symmetric, a queue without a momentum encoder) raises ValueError.
      symmetric: also contrast view 2's query with view 1's key and add the two losses.
      predictor: optional keras.Model [B, dim] -> [B, dim] on the query side only (MoCo v3).
      loss_scale: multiplies the loss (MoCo v3 uses 2T).
      seed: seeds the shuffle-BN permutation of the key batch (a function of seed and step).
      augmenter: optional layer `((view1, view2), step) -> (view1, view2)` run first in
        `train_step` — the photometric augmentation on the accelerator
        (`data.PhotometricAugmenter`, `data.augment_on="device"`).
      skip_nonfinite: a step whose loss (or gradient) is NaN/inf changes nothing (weights, BN
        statistics, optimizer slots, key encoder, queue keep their values; the step still counts
        in `optimizer.iterations`). Costs a copy of those variables per step, so it is off by
        default (config `train.on_nan=skip_step`). Either way each step logs `finite` (1.0 or
        0.0), which `callbacks.NonFiniteGuard` watches.

    Weight decay belongs to the optimizer (`optimizers.SGD`, `optimizers.LARS`: L2 added to the
    gradient, as in PyTorch).

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
        seed=0,
        augmenter=None,
        skip_nonfinite=False,
        name="moco",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        check_method(momentum_scope, negatives, symmetric)
        self.backbone, self.projector, self.predictor = backbone, projector, predictor
        self.symmetric, self.loss_scale, self.seed = symmetric, loss_scale, int(seed)
        self.augmenter, self.skip_nonfinite = augmenter, bool(skip_nonfinite)
        self.key_encoder = KeyEncoder(backbone, projector, momentum_scope, seed,
                                      name="key_encoder")
        self.negatives = Negatives(negatives, projector.output_shape[-1], queue_size,
                                   temperature, name="negatives")
        self.momentum = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(momentum), trainable=False,
            name="momentum")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.top1_tracker = keras.metrics.Mean(name="top1")
        self.built = True

    # The paper's names for the parts, as attributes.
    key_backbone = property(lambda self: self.key_encoder.backbone,
                            doc="The momentum backbone (the blocks it covers), or None.")
    key_projector = property(lambda self: self.key_encoder.projector,
                             doc="The momentum projector, or None (scope 'none').")
    queue = property(lambda self: self.negatives.queue, doc="[K, dim] negative keys, or None.")
    queue_ptr = property(lambda self: self.negatives.queue_ptr, doc="Next queue row to write.")
    temperature = property(lambda self: self.negatives.temperature, doc="T of InfoNCE.")
    momentum_scope = property(lambda self: self.key_encoder.scope, doc="See `key_encoder`.")

    @property
    def metrics(self):
        return [self.loss_tracker, self.top1_tracker]

    def call(self, images, training=False):
        """Query-backbone features [B, D] of images [B, H, W, C]: float in [0, 1], or integer
        pixel values 0..255 of any integer dtype (scaled by 1/255 here, as the input pipeline
        does; a value outside 0..255, e.g. a 16-bit image, raises InvalidArgumentError)."""
        images = tf.convert_to_tensor(images)
        if images.dtype.is_integer:
            if images.dtype != tf.uint8:  # a wider integer type: 8-bit values, or refused
                low, high = tf.reduce_min(images), tf.reduce_max(images)
                tf.debugging.Assert(tf.logical_and(low >= 0, high <= 255), [
                    f"MoCo takes integer images as pixel values 0..255; this {images.dtype.name} "
                    f"batch is not (a 16-bit image?): convert it to uint8 or to float32 in [0, 1] "
                    f"first. Its values range from", low, "to", high])
            images = tf.cast(images, tf.float32) / 255.0
        return self.backbone(images, training=training)

    def query(self, features):
        """L2-normalised queries q [B, dim] of backbone features: projector (and predictor)."""
        z = self.projector(features, training=True)
        if self.predictor is not None:
            z = self.predictor(z, training=True)
        return tf.math.l2_normalize(tf.cast(z, tf.float32), 1)

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

    def _contrastive_step(self, x1, x2):
        """One step of Algorithm 1 on views x1, x2; returns (loss [N], top-1 hits [N], finite)."""
        step = tf.identity(self.optimizer.iterations)
        encoder = self.key_encoder
        with tf.GradientTape() as tape:
            # Query encoder: both views when the loss is symmetric or keys reuse its features.
            h1, cut1 = encoder.online_features(self.backbone, x1)
            h2, cut2 = (encoder.online_features(self.backbone, x2)
                        if self.symmetric or encoder.shares_backbone else (None, None))
            # Keys: the momentum encoder (no gradient), from the other view.
            k2 = encoder.keys(x2, h2, cut2, step, view=0)
            k1 = encoder.keys(x1, h1, cut1, step, view=1) if self.symmetric else None
            # InfoNCE: the positive against the negatives (the queue as it was before this batch).
            loss, hits = self.negatives.contrast(self.query(h1), k2, same_view_keys=k1)
            if self.symmetric:
                loss_2, hits_2 = self.negatives.contrast(self.query(h2), k1, same_view_keys=k2)
                loss, hits = loss + loss_2, (hits + hits_2) / 2
            loss = loss * self.loss_scale
            # Average over the global batch: the optimizer sums the replicas' gradients.
            scaled_loss = self.optimizer.scale_loss(tf.nn.compute_average_loss(loss))
        finite = self._apply_gradients(tape, scaled_loss, loss, step)
        # Momentum update of the key encoder, then enqueue one view's keys (after both losses,
        # so a positive never sits in the queue it is contrasted against).
        encoder.update(self.momentum)
        self.negatives.enqueue(k2)
        return loss, hits, finite

    def _apply_gradients(self, tape, scaled_loss, loss, step):
        """Optimizer step on the query encoder; returns whether loss and gradients are finite.

        The step counter is the data position (resume) and the schedules' clock, so every batch
        counts, also one a LossScaleOptimizer skips (float16 overflow) or one that is skipped as
        not finite.
        """
        variables = self.trainable_variables
        grads = tape.gradient(scaled_loss, variables)
        # NaN/inf check (the loss alone can hide NaN gradients: a ReLU maps NaN to 0 on oneDNN).
        finite = self._all_finite(loss, grads)
        if self.skip_nonfinite:  # zeros instead of NaN: no NaN reaches the optimizer's slots
            grads = [None if g is None else tf.where(finite, g, tf.zeros_like(g)) for g in grads]
        self.optimizer.apply_gradients(zip(grads, variables))
        self.optimizer.iterations.assign(step + 1)
        return finite

    # --- around the step ----------------------------------------------------------------------

    def train_step(self, data):
        views, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        x1, x2 = views["view1"], views["view2"]
        if self.augmenter is not None:  # photometric augmentation here, for batch `step`
            x1, x2 = self.augmenter((x1, x2), self.optimizer.iterations)
        # skip_nonfinite: the state before the step, put back below if it was not finite (the
        # forward pass alone already updates BN statistics).
        state = self._step_state() if self.skip_nonfinite else []
        saved = [tf.identity(v.value) for v in state]
        # The lr this step uses: a schedule reads the step counter, which the step increments.
        lr = tf.cast(self.optimizer.learning_rate, tf.float32)
        loss, hits, finite = self._contrastive_step(x1, x2)
        # One select per variable, no tf.cond around apply_gradients (which a strategy cannot
        # merge_call in).
        for v, old in zip(state, saved):
            v.assign(tf.where(finite, v.value, old))
        batch_loss, batch_top1 = tf.reduce_mean(loss), tf.reduce_mean(hits)
        if self.skip_nonfinite:  # a skipped step leaves the running means alone
            weight = tf.cast(finite, tf.float32)
            self.loss_tracker.update_state(tf.where(finite, batch_loss, 0.0), weight)
            self.top1_tracker.update_state(tf.where(finite, batch_top1, 0.0), weight)
        else:
            self.loss_tracker.update_state(batch_loss)
            self.top1_tracker.update_state(batch_top1)
        return distribute.step_logs({
            "loss": self.loss_tracker.result(),
            "top1": self.top1_tracker.result(),
            # This step's own loss and top-1 (StepLog, TensorBoard's step scalars), not means.
            "batch_loss": batch_loss,
            "batch_top1": batch_top1,
            "momentum": tf.identity(self.momentum),
            "lr": lr,
            "finite": tf.cast(finite, tf.float32),  # 0.0: NaN/inf loss or gradient (skipped?)
        })

    def _step_state(self):
        """The variables a step writes, except the step counter: model variables (weights, BN
        statistics, key encoder, queue, m) and optimizer slots. A LossScaleOptimizer's own scale
        is left to it: it skips overflowing steps itself."""
        optimizer = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        counter = id(optimizer.iterations)
        return list(self.variables) + [v for v in optimizer.variables if id(v) != counter]

    def _all_finite(self, loss, grads):
        """True if the loss (and, without loss scaling, every gradient) is finite; with
        `skip_nonfinite`, on every replica, so that all replicas take the same decision."""
        finite = tf.reduce_all(tf.math.is_finite(loss))
        if not isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            checks = [tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None]
            finite = tf.logical_and(finite, tf.reduce_all(tf.stack(checks)))
        ctx = tf.distribute.get_replica_context()
        if self.skip_nonfinite and ctx is not None and ctx.num_replicas_in_sync > 1:
            not_finite = ctx.all_reduce(tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
            finite = tf.equal(not_finite, 0.0)
        return finite

    def get_config(self):
        serialize = keras.saving.serialize_keras_object
        return {
            **super().get_config(),
            "backbone": serialize(self.backbone),
            "projector": serialize(self.projector),
            "queue_size": self.negatives.queue_size,
            "momentum": float(self.momentum.numpy()),
            "temperature": self.temperature,
            "momentum_scope": self.momentum_scope,
            "negatives": self.negatives.kind,
            "symmetric": self.symmetric,
            "predictor": None if self.predictor is None else serialize(self.predictor),
            "loss_scale": self.loss_scale,
            "seed": self.seed,
            "augmenter": None if self.augmenter is None else serialize(self.augmenter),
            "skip_nonfinite": self.skip_nonfinite,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("backbone", "projector", "predictor", "augmenter"):
            if config.get(key) is not None:
                config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)
