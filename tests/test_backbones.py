"""Backbones (torchvision-compatible ResNets, small CNN), SplitBatchNorm and projection heads."""

import numpy as np
import pytest
import keras
import tensorflow as tf

from moco_tf.models.backbones import SplitBatchNorm, Standardize, build_backbone
from moco_tf.models.heads import build_predictor, build_projector


def _images(batch, size=16, channels=3, seed=0):
    return np.random.default_rng(seed).random((batch, size, size, channels), dtype=np.float32)


def _trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def _submodel(model, layer_name):
    return keras.Model(model.input, model.get_layer(layer_name).output)


# --- ResNets in torchvision layout ---------------------------------------------------------------

# torchvision parameter counts minus fc (resnet18: 11,689,512 - (512*1000 + 1000);
# resnet50: 25,557,032 - (2048*1000 + 1000)); torch counts parameters, not BN buffers.
# Conv/BN layer counts: resnet18 16 block convs + conv1 + 3 downsample; resnet50 48 + 1 + 4.
@pytest.mark.parametrize(
    "arch, params, dim, convs",
    [("resnet18", 11_176_512, 512, 20), ("resnet50", 23_508_032, 2048, 53)],
)
def test_resnet_matches_torchvision_params_and_dims(arch, params, dim, convs):
    model = build_backbone(arch, (32, 32, 3))
    assert _trainable_count(model) == params
    assert model.output_shape == (None, dim)
    out = model(_images(2, 32), training=False)
    assert out.shape == (2, dim) and np.all(np.isfinite(out))
    conv_layers = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    bn_layers = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(conv_layers) == len(bn_layers) == convs
    assert all(not l.use_bias for l in conv_layers)
    assert all(l.epsilon == 1e-5 and l.momentum == 0.9 for l in bn_layers)


def test_resnet_layer_names_follow_torchvision_state_dict():
    r18 = build_backbone("resnet18", (32, 32, 3))
    # torch shape [out, in, kh, kw] <-> keras kernel [kh, kw, in, out]
    expected_kernels = {
        "conv1": (7, 7, 3, 64),
        "layer1.0.conv1": (3, 3, 64, 64),
        "layer2.0.conv1": (3, 3, 64, 128),
        "layer2.0.downsample.0": (1, 1, 64, 128),
        "layer4.1.conv2": (3, 3, 512, 512),
    }
    for name, shape in expected_kernels.items():
        assert tuple(r18.get_layer(name).kernel.shape) == shape, name
    for name in ("bn1", "layer1.0.bn2", "layer3.0.downsample.1", "layer4.1.bn2"):
        assert isinstance(r18.get_layer(name), keras.layers.BatchNormalization), name
    # layer1 of resnet18 keeps 64 channels at stride 1: torchvision has no downsample there.
    assert "layer1.0.downsample.0" not in {l.name for l in r18.layers}

    r50 = build_backbone("resnet50", (32, 32, 3))
    assert tuple(r50.get_layer("layer1.0.downsample.0").kernel.shape) == (1, 1, 64, 256)
    # v1.5: the stride sits on the 3x3 conv2, conv1 (1x1) keeps stride 1.
    assert r50.get_layer("layer2.0.conv2").strides == (2, 2)
    assert r50.get_layer("layer2.0.conv1").strides == (1, 1)
    assert tuple(r50.get_layer("layer4.2.conv3").kernel.shape) == (1, 1, 512, 2048)
    assert isinstance(r50.get_layer("layer4.2.bn3"), keras.layers.BatchNormalization)


def test_conv_kernels_are_independent_kaiming_fan_out_draws():
    model = build_backbone("resnet18", (16, 16, 3))
    names = ("layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1")
    a, b, c = (model.get_layer(n).kernel.numpy() for n in names)
    assert not np.allclose(a, b) and not np.allclose(a, c)
    # torchvision: kaiming_normal_(mode="fan_out"), std = sqrt(2 / (k * k * out_channels))
    np.testing.assert_allclose(a.std(), np.sqrt(2.0 / (3 * 3 * 64)), rtol=0.05)


def test_cifar_stem_keeps_resolution_imagenet_stem_downsamples_by_4():
    cifar = build_backbone("resnet18", (32, 32, 3), cifar_stem=True)
    imagenet = build_backbone("resnet18", (32, 32, 3))
    assert cifar.get_layer("conv1").output.shape[1:3] == (32, 32)
    assert cifar.get_layer("layer1.1.out").output.shape[1:3] == (32, 32)
    assert "maxpool" not in {l.name for l in cifar.layers}
    assert tuple(cifar.get_layer("conv1").kernel.shape) == (3, 3, 3, 64)
    assert imagenet.get_layer("layer1.1.out").output.shape[1:3] == (8, 8)
    assert cifar.get_layer("layer4.1.out").output.shape[1:3] == (4, 4)


def test_cifar_stem_stride_2_halves_every_stage_and_pads_like_torch():
    model = build_backbone("resnet18", (28, 28, 1), cifar_stem=True, stem_stride=2, width=8)
    assert "maxpool" not in {l.name for l in model.layers}
    assert model.get_layer("layer1.1.out").output.shape[1:3] == (14, 14)
    assert model.get_layer("layer4.1.out").output.shape[1:3] == (2, 2)
    x = _images(2, 28, channels=1)
    conv1 = model.get_layer("conv1")
    # torch Conv2d(3, stride=2, padding=1): one zero row/column on every side.
    torch_like = tf.nn.conv2d(np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)]), conv1.kernel, 2, "VALID")
    np.testing.assert_allclose(_submodel(model, "conv1")(x).numpy(), torch_like, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="applies to the CIFAR stem only"):
        build_backbone("resnet18", (32, 32, 3), stem_stride=2)


def test_strided_convs_and_maxpool_pad_symmetrically_like_torch():
    model = build_backbone("resnet18", (16, 16, 3))
    x = _images(2, 16)
    conv1 = model.get_layer("conv1")
    got = _submodel(model, "conv1")(x).numpy()  # normalize is the identity by default
    # torch Conv2d(7, stride=2, padding=3): pad 3 on every side, then a valid convolution.
    torch_like = tf.nn.conv2d(np.pad(x, [(0, 0), (3, 3), (3, 3), (0, 0)]), conv1.kernel, 2, "VALID")
    np.testing.assert_allclose(got, torch_like, rtol=1e-4, atol=1e-5)
    keras_same = tf.nn.conv2d(x, conv1.kernel, 2, "SAME")  # pads 2 before, 3 after: shifted windows
    assert not np.allclose(got, keras_same, atol=1e-3)

    # torch MaxPool2d(3, stride=2, padding=1) pads with -inf.
    relu = _submodel(model, "relu")(x).numpy()
    padded = np.pad(relu, [(0, 0), (1, 1), (1, 1), (0, 0)], constant_values=-np.inf)
    torch_pool = tf.nn.max_pool2d(padded, 3, 2, "VALID")
    np.testing.assert_allclose(_submodel(model, "maxpool")(x), torch_pool, rtol=1e-6)

    # a downsampling 3x3 conv inside a block
    block_in = _submodel(model, "layer1.1.out")(x).numpy()
    kernel = model.get_layer("layer2.0.conv1").kernel
    torch_like = tf.nn.conv2d(np.pad(block_in, [(0, 0), (1, 1), (1, 1), (0, 0)]), kernel, 2, "VALID")
    np.testing.assert_allclose(_submodel(model, "layer2.0.conv1")(x), torch_like, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("arch", ["small_cnn", "resnet18"])
def test_any_channel_count_and_normalisation(arch, channels):
    mean = (0.5, 0.4, 0.3)[:channels]
    std = (0.25, 0.2, 0.5)[:channels]
    model = build_backbone(arch, (16, 16, channels), cifar_stem=True, mean=mean, std=std)
    x = _images(3, 16, channels)
    normalized = _submodel(model, "normalize")(x)
    np.testing.assert_allclose(normalized, (x - np.array(mean)) / np.array(std), rtol=1e-6, atol=1e-6)
    assert model(x).shape == (3, model.output_shape[-1])
    assert model.get_layer("conv1").kernel.shape[2] == channels


def test_normalisation_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match="channels"):
        build_backbone("small_cnn", (16, 16, 1), mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))


def test_unknown_backbone_and_norm_raise():
    with pytest.raises(ValueError, match="Unknown backbone"):
        build_backbone("vgg", (16, 16, 3))
    with pytest.raises(ValueError, match="norm"):
        build_backbone("small_cnn", (16, 16, 3), norm="layer_norm")


# --- SplitBatchNorm ---------------------------------------------------------------------------------


def _split_bn_input(groups=4, per_group=2):
    # Sub-batches with clearly different statistics, so shared-statistics BN would not match.
    rng = np.random.default_rng(1)
    parts = [rng.normal(g * 3.0, 1.0 + g, (per_group, 4, 4, 3)) for g in range(groups)]
    return np.concatenate(parts).astype(np.float32)


def _set_affine(layer, seed=2):
    rng = np.random.default_rng(seed)
    layer.gamma.assign(rng.uniform(0.5, 2.0, 3).astype(np.float32))
    layer.beta.assign(rng.normal(size=3).astype(np.float32))


def test_split_bn_training_normalises_each_sub_batch_alone():
    x = _split_bn_input(groups=4, per_group=2)
    split = SplitBatchNorm(num_splits=4, momentum=0.9, epsilon=1e-5)
    split.build(x.shape)
    _set_affine(split)
    out = split(x, training=True).numpy()
    for g in range(4):
        plain = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
        plain.build(x.shape)
        plain.set_weights(split.get_weights())
        np.testing.assert_allclose(
            out[2 * g : 2 * g + 2], plain(x[2 * g : 2 * g + 2], training=True), rtol=1e-4, atol=1e-4
        )
    # a plain BN over the whole batch gives something else
    whole = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    whole.build(x.shape)
    whole.set_weights(split.get_weights())
    assert not np.allclose(out, whole(x, training=True), atol=1e-2)


def test_split_bn_moving_stats_are_group_averages_and_inference_is_plain_bn():
    x = _split_bn_input(groups=4, per_group=2)
    split = SplitBatchNorm(num_splits=4, momentum=0.9, epsilon=1e-5)
    split(x, training=True)
    groups = x.reshape(4, 2, 4, 4, 3)
    group_mean = groups.mean(axis=(1, 2, 3)).mean(0)
    # torch's running_var: the unbiased variance of each sub-batch (n = 2 * 4 * 4 values)
    group_var = groups.var(axis=(1, 2, 3), ddof=1).mean(0)
    np.testing.assert_allclose(split.moving_mean, 0.1 * group_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(split.moving_variance, 0.9 + 0.1 * group_var, rtol=1e-5)
    # the same in the composite path (features [B, C], as in the projector's BN)
    flat = SplitBatchNorm(num_splits=2, momentum=0.0)
    flat(x.reshape(8, -1), training=True)
    np.testing.assert_allclose(
        flat.moving_variance, x.reshape(2, 4, -1).var(axis=1, ddof=1).mean(0), rtol=1e-5)

    _set_affine(split)
    plain = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    plain.build(x.shape)
    plain.set_weights(split.get_weights())
    np.testing.assert_allclose(split(x, training=False), plain(x, training=False), rtol=1e-5, atol=1e-5)
    before = split.moving_mean.numpy()
    split(x, training=False)
    np.testing.assert_array_equal(split.moving_mean, before)  # inference leaves the stats alone


def test_synchronized_bn_uses_the_whole_batch_and_torch_statistics():
    x = _split_bn_input(groups=2, per_group=3)
    sync = SplitBatchNorm(num_splits=1, synchronized=True, momentum=0.0, epsilon=1e-5)
    out = sync(x, training=True).numpy()
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(sync.moving_variance, x.reshape(-1, 3).var(0, ddof=1), rtol=1e-5)
    with pytest.raises(ValueError, match="one split"):
        SplitBatchNorm(num_splits=2, synchronized=True)


def test_split_bn_in_tf_function_matches_eager_and_checks_divisibility():
    x = _split_bn_input(groups=4, per_group=2)
    eager = SplitBatchNorm(num_splits=4)
    graph = SplitBatchNorm(num_splits=4)
    expected = eager(x, training=True)
    run = tf.function(lambda t: graph(t, training=True))
    np.testing.assert_allclose(run(tf.constant(x)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(graph.moving_variance, eager.moving_variance, rtol=1e-6)
    with pytest.raises(ValueError, match="divisible by num_splits=4"):
        SplitBatchNorm(num_splits=4)(x[:6], training=True)
    # unknown batch size: the check runs at execution time
    dynamic = tf.function(
        lambda t: graph(t, training=True), input_signature=[tf.TensorSpec([None, 4, 4, 3])]
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="divisible"):
        dynamic(tf.constant(x[:6]))


def test_split_bn_get_config_round_trip():
    layer = SplitBatchNorm(num_splits=3, momentum=0.9, epsilon=1e-5, name="bn")
    clone = SplitBatchNorm.from_config(layer.get_config())
    assert (clone.num_splits, clone.momentum, clone.epsilon, clone.name) == (3, 0.9, 1e-5, "bn")
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(revived, SplitBatchNorm) and revived.num_splits == 3
    std = Standardize(mean=[0.5], std=[0.25])
    assert Standardize.from_config(std.get_config()).std == [0.25]


def test_split_bn_backbone_trains_with_sub_batch_statistics():
    model = build_backbone("small_cnn", (16, 16, 3), norm="split_bn", split_bn_groups=2)
    assert all(
        isinstance(l, SplitBatchNorm) and l.num_splits == 2
        for l in model.layers
        if isinstance(l, keras.layers.BatchNormalization)
    )
    x = _images(4, 16)
    # With per-sub-batch statistics, the first half's features do not depend on the second half.
    a = model(x, training=True).numpy()
    b = model(np.concatenate([x[:2], _images(2, 16, seed=5)]), training=True).numpy()
    np.testing.assert_allclose(a[:2], b[:2], rtol=1e-4, atol=1e-5)
    assert not np.allclose(a[2:], b[2:], atol=1e-3)


def test_small_cnn_split_bn_keras_save_load_round_trip(tmp_path):
    model = build_backbone("small_cnn", (8, 8, 1), norm="split_bn", split_bn_groups=2, mean=0.3, std=0.2)
    x = _images(4, 8, channels=1)
    for _ in range(3):  # move the moving statistics away from their initial values
        model(x, training=True)
    path = str(tmp_path / "backbone.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.get_layer("bn2"), SplitBatchNorm)
    assert loaded.get_layer("bn2").num_splits == 2
    np.testing.assert_allclose(loaded(x, training=False), model(x, training=False), rtol=1e-6)
    np.testing.assert_allclose(loaded(x, training=True), model(x, training=True), rtol=1e-5, atol=1e-6)


# --- heads ------------------------------------------------------------------------------------------


def test_linear_projector_is_x_w_plus_b():
    head = build_projector("linear", 6, 4)
    assert head.output_shape == (None, 4)
    x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    dense = head.get_layer("projector.0")
    np.testing.assert_allclose(head(x), x @ dense.kernel.numpy() + dense.bias.numpy(), rtol=1e-5, atol=1e-6)
    # torch nn.Linear default init: uniform within +-1/sqrt(fan_in)
    assert np.abs(dense.kernel.numpy()).max() <= 1 / np.sqrt(6) and np.any(dense.bias.numpy() != 0)


def test_mlp_projector_has_relu_between_layers():
    head = build_projector("mlp", 4, 4)  # MoCo v2: 4-4(ReLU)-4 with biases
    assert [type(l).__name__ for l in head.layers[1:]] == ["Dense", "ReLU", "Dense"]
    first, last = head.get_layer("projector.0"), head.get_layer("projector.2")
    for dense in (first, last):
        dense.kernel.assign(np.eye(4, dtype=np.float32))
        dense.bias.assign(np.zeros(4, np.float32))
    x = np.array([[1.0, -2.0, 3.0, -0.5], [-1.0, 0.5, -3.0, 2.0]], np.float32)
    np.testing.assert_allclose(head(x), np.maximum(x, 0.0))  # negative pre-activations zeroed


def test_moco_v3_projector_and_predictor():
    # moco-v3 builder.py, ResNet: Linear-BN-ReLU-Linear-BN(affine=False), torch statistics.
    head = build_projector("mlp", 8, 6, hidden_dim=16, num_layers=2, use_bn=True, last_bn=True)
    kinds = [type(l).__name__ for l in head.layers[1:]]
    assert kinds == ["Dense", "SplitBatchNorm", "ReLU", "Dense", "SplitBatchNorm"]
    assert all(not l.use_bias for l in head.layers if isinstance(l, keras.layers.Dense))
    last_bn = head.layers[-1]
    assert not last_bn.center and not last_bn.scale
    assert {w.name for w in last_bn.weights} == {"moving_mean", "moving_variance"}
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(16, 8)).astype(np.float32)
    out = head(x, training=True).numpy()
    assert out.shape == (16, 6)
    # affine-free output BN: in training every output feature has mean 0 and variance ~1
    np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(out.var(0), 1.0, rtol=1e-2)

    pred = build_predictor(6, 6, 12)
    kinds = [type(l).__name__ for l in pred.layers[1:]]
    assert kinds == ["Dense", "SplitBatchNorm", "ReLU", "Dense"]  # no BN on the output
    assert all(not l.use_bias for l in pred.layers if isinstance(l, keras.layers.Dense))
    assert pred(out).shape == (16, 6)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_fused_one_split_bn_equals_keras_bn_values_stats_and_gradients(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        x = tf.constant(_split_bn_input(groups=2, per_group=3))
        fused = SplitBatchNorm(num_splits=1, momentum=0.9, epsilon=1e-5)
        plain = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
        for layer in (fused, plain):
            layer.build(x.shape)
        _set_affine(fused)
        plain.set_weights(fused.get_weights())
        results = []
        for layer in (fused, plain):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.cos(x))
            results.append((y, *tape.gradient(loss, [x, layer.gamma, layer.beta])))
        tol = 1e-4 if policy == "float32" else 3e-2
        for a, b in zip(*results):
            np.testing.assert_allclose(
                tf.cast(a, tf.float32), tf.cast(b, tf.float32), rtol=tol, atol=tol
            )
        np.testing.assert_allclose(fused.moving_mean, plain.moving_mean, rtol=1e-5, atol=1e-6)
        # Keras updates its moving variance with the biased batch variance, torch (and we) with
        # the unbiased one: n / (n - 1) of it, n = 6 * 4 * 4 values per channel.
        n = 96
        np.testing.assert_allclose(fused.moving_variance - 0.9,
                                   (plain.moving_variance - 0.9) * n / (n - 1), rtol=1e-4)
        assert fused.compute_dtype == ("bfloat16" if policy != "float32" else "float32")
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_bn_backbone_uses_the_fused_layer_and_trains_like_keras_bn():
    model = build_backbone("small_cnn", (8, 8, 3), norm="bn")
    norms = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert norms and all(isinstance(l, SplitBatchNorm) and l.num_splits == 1 for l in norms)
    # batch statistics over the whole batch: every example's output depends on the others
    x = _images(4, 8)
    a = model(x, training=True).numpy()
    b = model(np.concatenate([x[:2], _images(2, 8, seed=5)]), training=True).numpy()
    assert not np.allclose(a[:2], b[:2], atol=1e-4)
