"""The key encoder: which part of the query encoder has a momentum (EMA) copy, and how keys are made.

| scope          | keys                                                          | backbone passes per view |
|----------------|---------------------------------------------------------------|--------------------------|
| `full`         | EMA backbone + EMA projector, shuffle-BN (MoCo v1/v2/v3)      | 2 (online, momentum)     |
| `from:<block>` | online backbone up to `<block>`, EMA copy of the rest of the  | 1 up to the block, then  |
|                | backbone and of the projector, shuffle-BN on the EMA part     | 2 for the blocks after   |
| `projector`    | online backbone features, EMA projector (Pham et al. 2022)    | 1                        |
| `none`         | the online encoder itself, with gradients (SimCLR)            | 1                        |

`<block>` names the first block with a momentum copy: a layer-name prefix of the backbone, e.g.
`layer3` (ResNet: stem, layer1, layer2 are shared) or `conv2` (small_cnn).

The EMA copy never receives gradients (its variables are not trainable); `update(m)` moves it
towards the query encoder: theta_k <- m * theta_k + (1 - m) * theta_q, for the weights only — BN
statistics of the copy come from its own forwards, as in the official code.
"""

import keras
import tensorflow as tf

from moco_tf import distribute
from moco_tf.momentum import ema_update

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


def split_at(backbone, block):
    """(trunk, head): the backbone cut before the first layer named `block` or `block.*`.

    trunk: images -> the activation entering the block; head: that activation -> features.
    Both share the backbone's layers (and weights): head(trunk(x)) == backbone(x).
    """
    first = next((layer for layer in backbone.layers
                  if layer.name == block or layer.name.startswith(block + ".")), None)
    if first is None or first is backbone.layers[0]:
        blocks = sorted({layer.name.split(".")[0] for layer in backbone.layers[1:]})
        raise ValueError(f"momentum_scope 'from:{block}': the backbone has no layer '{block}' "
                         f"or '{block}.*' after its input; its layer prefixes: {', '.join(blocks)}")
    cut = first.input
    return keras.Model(backbone.input, cut, name="trunk"), keras.Model(cut, backbone.output,
                                                                        name="head")


class KeyEncoder(keras.layers.Layer):
    """The momentum key encoder of a query encoder (backbone, projector), for a momentum scope.

    Args:
      backbone, projector: the query encoder (the key encoder never changes them).
      scope: see the module docstring.
      seed: seeds the shuffle-BN permutation (a function of seed, view and step).

    Attributes:
      backbone, projector: the EMA copies (None where the scope shares the online part); with
        `from:<block>`, `backbone` is the copy of the blocks from `<block>` on (the head).
      trunk: `from:<block>` only: the online backbone up to the block (shared with the query).
      targets, sources: the (EMA copy, query) variable pairs `update` moves.
    """

    def __init__(self, backbone, projector, scope="full", seed=0, **kwargs):
        super().__init__(**kwargs)
        self.scope, self.seed = scope, int(seed)
        trunk = head = None
        query_parts, self.backbone, self.projector = [], None, None
        if scope == "full":
            self.backbone = _clone(backbone, "key_backbone")
            query_parts = [backbone, projector]
        elif scope.startswith("from:"):
            trunk, head = split_at(backbone, scope[len("from:"):])
            self.backbone = split_at(_clone(backbone, "key_backbone"), scope[len("from:"):])[1]
            query_parts = [head, projector]
        elif scope == "projector":
            query_parts = [projector]
        if scope != "none":
            self.projector = _clone(projector, "key_projector")
        key_parts = [m for m in (self.backbone, self.projector) if m is not None]
        # Pairs taken before freezing: both lists are in the same (architecture) order. The
        # online parts and the pairs are the query encoder's: held where Keras does not track
        # (or save, or checkpoint) them a second time.
        self._online = _Untracked(
            projector=projector, trunk=trunk, head=head,
            targets=[v for m in key_parts for v in m.trainable_weights],
            sources=[v for m in query_parts for v in m.trainable_weights])
        for m in key_parts:
            _freeze_variables(m)

    trunk = property(lambda self: self._online.trunk)
    targets = property(lambda self: self._online.targets)
    sources = property(lambda self: self._online.sources)

    @property
    def shares_backbone(self):
        """True if keys start from the online backbone's activations (no full second pass)."""
        return self.scope != "full"

    def online_features(self, backbone, images):
        """(features [B, D], activation at the cut or None): the query backbone's forward, split
        where the keys need its intermediate activation (`from:<block>`)."""
        if self.trunk is None:
            return backbone(images, training=True), None
        cut = self.trunk(images, training=True)
        return self._online.head(cut, training=True), cut

    def keys(self, images, features, cut, step, view=0):
        """L2-normalised keys k [B, dim] of `images`, float32.

        `features`, `cut`: the online forward of the same images (`online_features`); `step`
        and `view` seed the shuffle-BN permutation. No gradient flows into the keys, except
        with scope `none`, where the key encoder is the online encoder.
        """
        if self.scope == "none":
            return _normalize(self._online.projector(features, training=True))
        if self.scope == "projector":
            out = self.projector(tf.stop_gradient(features), training=True)
        else:
            # Shuffle-BN: the momentum encoder sees the batch in another order, so its BN
            # (sub-)batches hold other images than the query's and BN statistics cannot reveal
            # the positive. Under several replicas the permutation spans the global batch.
            seed = tf.stack([tf.constant(self.seed, tf.int64) * 2 + view, tf.cast(step, tf.int64)])
            inputs = images if self.scope == "full" else tf.stop_gradient(cut)
            shuffled, unshuffle = distribute.shuffle_across_replicas(inputs, seed)
            out = self.projector(self.backbone(shuffled, training=True), training=True)
            out = unshuffle(tf.cast(out, tf.float32))
        return tf.stop_gradient(_normalize(out))

    def update(self, momentum):
        """The momentum update: theta_k <- m * theta_k + (1 - m) * theta_q."""
        ema_update(self.targets, self.sources, momentum)


class _Untracked:
    """Attributes Keras leaves alone (not a Layer, Variable, list or dict)."""

    def __init__(self, **attributes):
        self.__dict__.update(attributes)


def _normalize(x):
    return tf.math.l2_normalize(tf.cast(x, tf.float32), 1)
