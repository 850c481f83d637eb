"""Backbones: ResNet-18/50 in torchvision's layout and naming, and a tiny CNN for tests.

`build_backbone(name, input_shape)` returns a functional `keras.Model`: float32 images in [0, 1],
`[B, H, W, C]` -> globally average-pooled features `[B, D]` (`model.output_shape[-1]` is D:
512 for resnet18, 2048 for resnet50, 64 for small_cnn). The first layer, `normalize`, computes
`(x - mean) / std` per channel, so exported models take raw images.

Mapping a torchvision ResNet `state_dict` (or an official MoCo checkpoint after stripping
`module.encoder_q.`) onto these models is mechanical, because Keras 3 accepts dots in layer names:

    torch key `<module>.<param>`  ->  keras `model.get_layer("<module>")`, weight by param:
      Conv2d     `weight` [out, in, kh, kw]   -> `kernel` [kh, kw, in, out]  (transpose 2, 3, 1, 0)
      BatchNorm  `weight`, `bias`             -> `gamma`, `beta`
                 `running_mean`, `running_var`-> `moving_mean`, `moving_variance`
                 `num_batches_tracked`        -> (no counterpart; skip)
    e.g. `layer1.0.downsample.0.weight` -> layer `layer1.0.downsample.0`, `kernel`.
    `fc.*` is not part of the backbone (see heads.py).

Numerics follow torchvision: convs without bias, BN eps=1e-5 and momentum 0.1 in torch terms
(Keras momentum 0.9), symmetric padding for strided convs and the max-pool (Keras "same" pads a
stride-2 layer asymmetrically: 0 before, 1 after, which shifts every window), ResNet v1.5
(the Bottleneck's stride sits on the 3x3 conv), kaiming-normal(fan_out) conv init.
BN layers are `SplitBatchNorm` (also for plain and synchronized BN): like torch, their moving
variance is updated with the *unbiased* batch variance (Keras' BatchNormalization uses the biased
one), so trained and imported models mean the same thing by `moving_variance`.
"""

import keras
from keras import ops
import tensorflow as tf

BN_EPSILON = 1e-5  # torch default
BN_MOMENTUM = 0.9  # torch momentum 0.1: moving = 0.9 * moving + 0.1 * batch


def _conv_init():
    """torchvision resnet.py: conv weights ~ kaiming_normal_(mode="fan_out", nonlinearity="relu").

    A new instance per layer: an unseeded Keras 3 initializer fixes its seed at construction, so
    one shared instance would give every same-shaped kernel identical values.
    """
    return keras.initializers.VarianceScaling(2.0, mode="fan_out",
                                              distribution="untruncated_normal")


# arch -> (block type, blocks per stage); the stages are torchvision's layer1..layer4.
RESNETS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
STAGE_WIDTHS = (64, 128, 256, 512)
NORMS = ("bn", "split_bn", "sync_bn")


@keras.saving.register_keras_serializable(package="moco_tf")
class Standardize(keras.layers.Layer):
    """Per-channel `(x - mean) / std` with constant mean/std (torchvision `Normalize`).

    Runs in float32 even under a mixed-precision policy: pixel statistics need the precision.
    """

    def __init__(self, mean=0.0, std=1.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.mean = [float(m) for m in _as_list(mean)]
        self.std = [float(s) for s in _as_list(std)]
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}.")

    def build(self, input_shape):
        channels = input_shape[-1]
        for label, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise ValueError(
                    f"{label} has {len(values)} values but the images have {channels} channels; "
                    f"give one value per channel (or a single value for all)."
                )

    def call(self, x):
        return (x - ops.array(self.mean, x.dtype)) / ops.array(self.std, x.dtype)

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std}


@keras.saving.register_keras_serializable(package="moco_tf")
class SplitBatchNorm(keras.layers.BatchNormalization):
    """BatchNorm with torch's statistics, over `num_splits` sub-batches: per-GPU BN (and
    shuffle-BN) emulated on one device; `num_splits=1` is plain BN, `synchronized=True` BN over
    the global batch of all replicas (SyncBN).

    Training (`training=True` and the layer trainable): the batch `[B, ..., C]` is cut into
    `num_splits` contiguous sub-batches of `B / num_splits`, each normalised with its own mean and
    (biased) variance; the moving statistics are updated, as torch does, with the average of the
    sub-batch means and *unbiased* variances (n/(n-1) times the biased one, n values per channel
    and sub-batch). Inference: plain BatchNormalization with the moving statistics.
    The official MoCo single-GPU colab groups samples `i % G` rather than contiguously; with the
    shuffled key batch of shuffle-BN the two are the same in distribution.

    `num_splits=1` is plain BatchNormalization (what `norm="bn"` builds): images `[B, H, W, C]`
    are normalised in training by TF's fused kernel, which Keras 3 does not use.

    B must be divisible by `num_splits` (a ValueError when B is static, a runtime assertion
    otherwise). Channels-last only (`axis=-1`).
    """

    def __init__(self, num_splits=8, **kwargs):
        super().__init__(**kwargs)
        if int(num_splits) < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}.")
        if self.renorm:
            raise ValueError("SplitBatchNorm does not support renorm.")
        if self.synchronized and int(num_splits) != 1:
            raise ValueError("A synchronized SplitBatchNorm has one split (the global batch).")
        self.num_splits = int(num_splits)

    def build(self, input_shape):
        if self.axis not in (-1, len(input_shape) - 1):
            raise ValueError(
                f"SplitBatchNorm needs channels-last inputs (axis=-1), got axis={self.axis}.")
        super().build(input_shape)

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable):
            return super().call(inputs, training=training, mask=mask)
        if mask is not None:
            raise NotImplementedError("SplitBatchNorm does not support masks.")
        if self.synchronized:
            return self._synchronized_call(inputs)
        groups = self.num_splits
        batch = inputs.shape[0]
        message = (
            f"SplitBatchNorm '{self.name}': batch size must be divisible by num_splits={groups}"
        )
        if batch is not None and batch % groups:
            raise ValueError(f"{message}, got batch size {batch}.")
        if batch is None:  # checked when the graph runs, before the reshape can fail obscurely
            check = tf.debugging.assert_equal(tf.shape(inputs)[0] % groups, 0, message=message)
            with tf.control_dependencies([check]):
                inputs = tf.identity(inputs)

        if len(inputs.shape) == 4:
            return self._fused_call(inputs)
        x = ops.cast(inputs, _float32_or_wider(inputs.dtype))
        shape = ops.shape(x)
        # [B, ..., C] -> [G, B/G, ..., C]: sub-batch g is rows g*B/G ... (g+1)*B/G - 1.
        x = ops.reshape(x, (groups, -1) + tuple(shape[1:]))
        mean, variance = ops.moments(x, axes=list(range(1, len(x.shape) - 1)), keepdims=True)
        outputs = (x - mean) * ops.rsqrt(variance + self.epsilon)
        if self.scale:
            outputs = outputs * ops.cast(self.gamma, x.dtype)
        if self.center:
            outputs = outputs + ops.cast(self.beta, x.dtype)
        channels = x.shape[-1]
        n = ops.cast(ops.size(x) // (groups * channels), variance.dtype)
        self._update_moving_stats(
            ops.reshape(mean, (groups, channels)),
            ops.reshape(_unbiased(variance, n), (groups, channels)))
        return ops.cast(ops.reshape(outputs, shape), self.compute_dtype)

    def _synchronized_call(self, inputs):
        """SyncBN: Keras' moments over all replicas, then torch's moving statistics."""
        x = ops.cast(inputs, _float32_or_wider(inputs.dtype))
        mean, variance = self._moments(x, None)  # reduced over the replicas
        ctx = tf.distribute.get_replica_context()
        replicas = ctx.num_replicas_in_sync if ctx is not None else 1
        n = ops.cast(ops.size(x) // x.shape[-1] * replicas, variance.dtype)
        self._update_moving_stats(mean[None], _unbiased(variance, n)[None])
        outputs = ops.batch_normalization(
            x, mean, variance, axis=-1, epsilon=self.epsilon,
            offset=ops.cast(self.beta, x.dtype) if self.center else None,
            scale=ops.cast(self.gamma, x.dtype) if self.scale else None)
        return ops.cast(outputs, self.compute_dtype)

    def _fused_call(self, inputs):
        """Images [B, H, W, C]: TF's fused batch-norm kernel, forward and backward in one op each.

        One kernel call per direction instead of the composite ops above: BN is a large share of a
        narrow ResNet's step (docs/performance.md has the measurement). The G sub-batches become
        channels so that one call normalises them all:
        [B, H, W, C] -> [G, B/G, H, W, C] -> [B/G, H, W, G*C].
        """
        groups, channels = self.num_splits, inputs.shape[-1]
        _, height, width, _ = tf.unstack(tf.shape(inputs))
        x = inputs
        if groups > 1:
            x = tf.reshape(x, [groups, -1, height, width, channels])
            x = tf.reshape(tf.transpose(x, [1, 2, 3, 0, 4]), [-1, height, width, groups * channels])
        ones = tf.ones([channels], tf.float32)
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else ones
        beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros_like(ones)
        y, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=tf.tile(gamma, [groups]), offset=tf.tile(beta, [groups]),
            mean=tf.zeros([0]), variance=tf.zeros([0]), epsilon=self.epsilon,
            data_format="NHWC", is_training=True,
        )
        # The kernel returns the unbiased variance, the one torch's moving statistics use.
        self._update_moving_stats(
            tf.reshape(mean, [groups, channels]), tf.reshape(variance, [groups, channels])
        )
        if groups > 1:
            y = tf.reshape(y, [-1, height, width, groups, channels])
            y = tf.reshape(tf.transpose(y, [3, 0, 1, 2, 4]), tf.shape(inputs))
        return tf.cast(y, self.compute_dtype)

    def _update_moving_stats(self, mean, variance):
        """Moving statistics from the sub-batch ones [G, C]: their average (as the colab does)."""
        m = self.momentum
        for moving, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
            batch = ops.mean(ops.cast(batch, moving.dtype), axis=0)
            moving.assign(moving * m + batch * (1.0 - m))

    def get_config(self):
        return {**super().get_config(), "num_splits": self.num_splits}


def batch_norm(norm, split_bn_groups=8, **kwargs):
    """The BN layer of `norm`: "bn" (one batch, TF's fused kernel on images),
    "split_bn" (`split_bn_groups` sub-batches) or "sync_bn" (the global batch of all replicas) —
    all `SplitBatchNorm`, with torch's moving statistics."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
    return SplitBatchNorm(num_splits=split_bn_groups if norm == "split_bn" else 1,
                          synchronized=norm == "sync_bn", **kwargs)


def build_backbone(
    name,
    input_shape,
    *,
    cifar_stem=False,
    stem_stride=1,
    norm="bn",
    split_bn_groups=8,
    mean=None,
    std=None,
    zero_init_residual=False,
    width=64,
    patch_size=16,
):
    """Builds a backbone `keras.Model`: images `[B, H, W, C]` in [0, 1] -> features `[B, D]`.

    Args:
      name: "resnet18", "resnet50" (also "resnet34"), "small_cnn" (tiny, for tests), or a ViT
        ("vit_small", "vit_base", "vit_tiny": `moco_tf.models.vit`, patches of `patch_size`).
      input_shape: `(H, W, C)`; any C (1 for Fashion-MNIST, 3 for RGB); H, W may be None.
      cifar_stem: ResNets only: conv1 is 3x3 stride 1 and there is no max-pool, for 28-32 px
        images (as in the MoCo CIFAR recipes). Ignored by small_cnn.
      stem_stride: the CIFAR stem's conv1 stride. 2 runs layer1-4 at half the resolution
        (28 px: 14, 7, 4, 2), a quarter of the convolution work.
      norm: "bn" (BatchNormalization), "split_bn" (SplitBatchNorm with `split_bn_groups`
        sub-batches) or "sync_bn" (BatchNormalization(synchronized=True), across replicas).
      mean, std: per-channel (or scalar) constants of the input normalisation; default 0 and 1.
      width: ResNets: channels of conv1 and layer1 (64 in torchvision; layer2-4 have 2x, 4x, 8x).
        A narrower ResNet computes about (width / 64)^2 of the convolutions; only 64 matches
        torchvision's weights.
      zero_init_residual: ResNets: gamma of the last BN of each block starts at 0 (torchvision's
        option: off in MoCo v1/v2, on in moco-v3's ResNet-50).
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (H, W, C), got {input_shape}.")
    if stem_stride != 1 and not cifar_stem:
        raise ValueError(f"stem_stride={stem_stride} applies to the CIFAR stem only "
                         f"(cifar_stem=True); the ImageNet stem has its own stride and max-pool.")
    if name.startswith("vit"):
        from moco_tf.models import vit  # it builds on this module's Standardize

        return vit.build_vit(name, input_shape, patch_size=patch_size, mean=mean, std=std)

    def norm_layer(layer_name, zero_init=False):
        kwargs = dict(
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            gamma_initializer="zeros" if zero_init else "ones",
            name=layer_name,
        )
        return batch_norm(norm, split_bn_groups, **kwargs)

    inputs = keras.Input(shape=tuple(input_shape), name="images")
    x = Standardize(0.0 if mean is None else mean, 1.0 if std is None else std,
                    name="normalize")(inputs)
    if name in RESNETS:
        x = _resnet(x, *RESNETS[name], norm_layer, cifar_stem, zero_init_residual, width,
                    stem_stride)
    elif name == "small_cnn":
        x = _small_cnn(x, norm_layer)
    else:
        raise ValueError(f"Unknown backbone {name!r}; choose from "
                         f"{sorted(RESNETS) + ['small_cnn', 'vit_tiny', 'vit_small', 'vit_base']}.")
    # float32 features even under mixed precision: the projector and the loss want them exact.
    features = keras.layers.GlobalAveragePooling2D(name="avgpool", dtype="float32")(x)
    return keras.Model(inputs, features, name=name)


# --- building blocks ---------------------------------------------------------------------------


def _conv(x, filters, kernel, stride, name):
    """torch `Conv2d(k, stride, padding=k // 2, bias=False)`.

    Stride 1 with an odd kernel: Keras "same" pads k // 2 on each side, as torch does. Stride > 1:
    explicit symmetric zero padding, then "valid" (Keras "same" would pad asymmetrically).
    """
    padding = "same"
    if stride > 1 and kernel > 1:
        x = keras.layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
        padding = "valid"
    return keras.layers.Conv2D(
        filters, kernel, stride, padding=padding, use_bias=False, kernel_initializer=_conv_init(),
        name=name
    )(x)


def _relu(x, name):
    return keras.layers.ReLU(name=name)(x)


def _basic_block(x, planes, stride, prefix, norm_layer, zero_init):
    """torchvision BasicBlock: 3x3 -> BN -> ReLU -> 3x3 -> BN, + shortcut, ReLU."""
    shortcut = _downsample(x, planes, stride, prefix, norm_layer)
    y = _relu(norm_layer(f"{prefix}.bn1")(_conv(x, planes, 3, stride, f"{prefix}.conv1")),
              f"{prefix}.relu1")
    y = norm_layer(f"{prefix}.bn2", zero_init)(_conv(y, planes, 3, 1, f"{prefix}.conv2"))
    return _relu(keras.layers.Add(name=f"{prefix}.add")([y, shortcut]), f"{prefix}.out")


def _bottleneck_block(x, planes, stride, prefix, norm_layer, zero_init):
    """torchvision Bottleneck (v1.5): 1x1 -> 3x3 (stride here) -> 1x1 (x4), + shortcut, ReLU."""
    shortcut = _downsample(x, planes * 4, stride, prefix, norm_layer)
    y = _relu(norm_layer(f"{prefix}.bn1")(_conv(x, planes, 1, 1, f"{prefix}.conv1")),
              f"{prefix}.relu1")
    y = _relu(norm_layer(f"{prefix}.bn2")(_conv(y, planes, 3, stride, f"{prefix}.conv2")),
              f"{prefix}.relu2")
    y = norm_layer(f"{prefix}.bn3", zero_init)(_conv(y, planes * 4, 1, 1, f"{prefix}.conv3"))
    return _relu(keras.layers.Add(name=f"{prefix}.add")([y, shortcut]), f"{prefix}.out")


def _downsample(x, out_channels, stride, prefix, norm_layer):
    """torchvision `downsample = Sequential(conv1x1(stride), BN)` when the shape changes."""
    if stride == 1 and x.shape[-1] == out_channels:
        return x
    x = _conv(x, out_channels, 1, stride, f"{prefix}.downsample.0")
    return norm_layer(f"{prefix}.downsample.1")(x)


def _resnet(x, block, depths, norm_layer, cifar_stem, zero_init_residual, width=64,
            stem_stride=1):
    """torchvision ResNet without `fc`: stem (conv1, bn1, relu, maxpool) and layer1..layer4."""
    if cifar_stem:  # 3x3, no max-pool: stride 1 keeps 32x32 inputs at 32x32 into layer1
        x = _relu(norm_layer("bn1")(_conv(x, width, 3, stem_stride, "conv1")), "relu")
    else:
        x = _relu(norm_layer("bn1")(_conv(x, width, 7, 2, "conv1")), "relu")
        # torch pads the max-pool with -inf; its input is post-ReLU (>= 0) and every window holds at
        # least one real value, so zero padding gives the same maxima.
        x = keras.layers.ZeroPadding2D(1, name="maxpool_pad")(x)
        x = keras.layers.MaxPooling2D(3, 2, name="maxpool")(x)
    block_fn = _basic_block if block == "basic" else _bottleneck_block
    for stage, (multiple, depth) in enumerate(zip(STAGE_WIDTHS, depths), start=1):
        planes = width * multiple // STAGE_WIDTHS[0]
        for i in range(depth):
            stride = 2 if (stage > 1 and i == 0) else 1
            x = block_fn(x, planes, stride, f"layer{stage}.{i}", norm_layer, zero_init_residual)
    return x


def _small_cnn(x, norm_layer, widths=(16, 32, 64)):
    """Three conv3x3(stride 2)-BN-ReLU blocks: a fast stand-in for tests (D = widths[-1])."""
    for i, width in enumerate(widths, start=1):
        x = _relu(norm_layer(f"bn{i}")(_conv(x, width, 3, 2, f"conv{i}")), f"relu{i}")
    return x


def _unbiased(variance, n):
    """The unbiased variance from the biased one of n values (torch's `running_var` update)."""
    return variance * n / ops.maximum(n - 1.0, 1.0)


def _float32_or_wider(dtype):
    """float32 for low-precision inputs: BN statistics overflow in float16/bfloat16."""
    return keras.backend.result_type(dtype, "float32")


def _as_list(values):
    if isinstance(values, (int, float)):
        return [values]
    return list(values)


__all__ = ["build_backbone", "SplitBatchNorm", "Standardize", "RESNETS"]
