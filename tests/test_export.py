"""Export: SavedModel serving signature (checked in a fresh process) and .keras round trip."""
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from moco_tf import export

IMAGE_SHAPE = (12, 12, 3)


def _backbone():
    """Small Functional backbone whose BN statistics are far from the defaults (0 mean, 1 var),
    so serving in training mode or losing the moving stats would change the features."""
    inputs = keras.Input(IMAGE_SHAPE)
    x = keras.layers.Rescaling(2.0, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same")(x)
    bn = keras.layers.BatchNormalization()
    x = bn(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, x, name="backbone")
    rng = np.random.default_rng(0)
    bn.moving_mean.assign(rng.normal(0.0, 0.5, size=8).astype(np.float32))
    bn.moving_variance.assign(rng.uniform(0.2, 3.0, size=8).astype(np.float32))
    bn.gamma.assign(rng.uniform(0.5, 2.0, size=8).astype(np.float32))
    bn.beta.assign(rng.normal(0.0, 0.5, size=8).astype(np.float32))
    return model


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *IMAGE_SHAPE), dtype=np.uint8)


def _in_memory(model, images):
    return model(images.astype(np.float32) / 255.0, training=False).numpy()


@pytest.fixture
def exported(tmp_path):
    model = _backbone()
    export_dir = export.export_backbone(model, str(tmp_path / "export"), image_shape=IMAGE_SHAPE)
    return model, export_dir


def test_saved_model_serves_in_a_fresh_process(exported, tmp_path):
    model, export_dir = exported
    assert os.path.isdir(os.path.join(export_dir, "saved_model"))
    images = _images(7)
    np.save(tmp_path / "images.npy", images)
    # Only TensorFlow in the child: the SavedModel must not need moco_tf or the Python objects.
    script = textwrap.dedent(
        f"""
        import os, numpy as np, tensorflow as tf
        out = {str(tmp_path)!r}
        loaded = tf.saved_model.load({os.path.join(export_dir, "saved_model")!r})
        serve = loaded.signatures["serving_default"]
        images = tf.constant(np.load(os.path.join(out, "images.npy")))
        np.save(os.path.join(out, "out7.npy"), serve(images=images)["features"].numpy())
        np.save(os.path.join(out, "out1.npy"), serve(images=images[:1])["features"].numpy())
        floats = tf.cast(images, tf.float32) / 255.0
        feats = loaded.features_from_float(floats)["features"]
        np.save(os.path.join(out, "outf.npy"), feats.numpy())
        """
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, capture_output=True)

    expected = _in_memory(model, images)
    out7, out1 = np.load(tmp_path / "out7.npy"), np.load(tmp_path / "out1.npy")
    assert out7.shape == (7, 8) and out7.dtype == np.float32
    np.testing.assert_allclose(out7, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out1, expected[:1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "outf.npy"), expected, rtol=0, atol=1e-5)
    # Sanity: inference mode matters for this backbone (training-mode BN gives other features).
    train_mode = model(images.astype(np.float32) / 255.0, training=True).numpy()
    assert np.abs(train_mode - expected).max() > 1e-2


def test_load_serving_helper(exported):
    model, export_dir = exported
    images = _images(3, seed=1)
    features = export.load_serving(export_dir)
    np.testing.assert_allclose(features(images).numpy(), _in_memory(model, images), atol=1e-5)


def test_load_backbone_round_trip(exported):
    model, export_dir = exported
    x = _images(5, seed=2).astype(np.float32) / 255.0
    for path in (export_dir, os.path.join(export_dir, "backbone.keras")):
        loaded = export.load_backbone(path)
        assert not loaded.trainable
        np.testing.assert_allclose(
            loaded(x, training=False).numpy(), model(x, training=False).numpy(), atol=1e-6
        )
    with pytest.raises(FileNotFoundError):
        export.load_backbone(os.path.join(export_dir, "missing.keras"))


def _fit_one_step(backbone):
    """Backbone as a layer under a linear head; one SGD step. Returns (backbone, head) weights
    before and after."""
    inputs = keras.Input(IMAGE_SHAPE)
    head = keras.layers.Dense(2)
    model = keras.Model(inputs, head(backbone(inputs)))
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    x = _images(8, seed=3).astype(np.float32) / 255.0
    y = np.random.default_rng(4).normal(size=(8, 2)).astype(np.float32)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # builds the head, then one step
    before = ([w.numpy() for w in backbone.weights], [w.numpy() for w in head.weights])
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    after = ([w.numpy() for w in backbone.weights], [w.numpy() for w in head.weights])
    return before, after


def _changed(before, after):
    return [not np.array_equal(b, a) for b, a in zip(before, after)]


def test_load_backbone_fine_tunes_or_stays_frozen(exported):
    _, export_dir = exported
    (bb_before, head_before), (bb_after, head_after) = _fit_one_step(
        export.load_backbone(export_dir, trainable=True)
    )
    assert all(_changed(head_before, head_after))
    assert any(_changed(bb_before, bb_after))  # conv kernel / BN weights moved

    (bb_before, head_before), (bb_after, head_after) = _fit_one_step(
        export.load_backbone(export_dir, trainable=False)
    )
    assert all(_changed(head_before, head_after))  # the step did happen
    # Frozen: no weight moves, BN moving statistics included (frozen BN runs in inference mode).
    assert not any(_changed(bb_before, bb_after))


# A process that cannot import moco_tf: what a user without it installed has.
_WITHOUT_MOCO_TF = textwrap.dedent("""
    import sys
    sys.modules["moco_tf"] = None  # any `import moco_tf...` now raises ImportError
    import keras, numpy as np, tensorflow as tf
    export, images_path, out = sys.argv[1:4]
    images = np.load(images_path)
    backbone = keras.models.load_model(export + "/backbone.keras")
    serve = tf.saved_model.load(export + "/saved_model").signatures["serving_default"]
    np.savez(out, keras=backbone(images.astype("float32") / 255.0, training=False).numpy(),
             served=serve(images=tf.constant(images))["features"].numpy(),
             layers=[type(layer).__name__ for layer in backbone.layers])
""")


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny"])
def test_a_moco_tf_backbone_exports_to_plain_keras_that_loads_without_moco_tf(arch, tmp_path):
    from moco_tf.models.backbones import build_backbone

    if arch == "resnet18":
        backbone = build_backbone("resnet18", (16, 16, 3), cifar_stem=True, width=8,
                                  norm="split_bn", split_bn_groups=2, mean=(0.4, 0.5, 0.6),
                                  std=(0.2, 0.3, 0.25))
        backbone(np.random.default_rng(0).uniform(size=(4, 16, 16, 3)), training=True)  # BN stats
        custom = {"SplitBatchNorm", "Standardize"}
    else:
        backbone = build_backbone("vit_tiny", (16, 16, 3), patch_size=8, mean=(0.4, 0.5, 0.6),
                                  std=(0.2, 0.3, 0.25))
        embed = backbone.get_layer("embed")  # a class token far from its N(0, 1e-6) init
        embed.cls_token.assign(np.random.default_rng(2).normal(size=embed.cls_token.shape))
        custom = {"Attention", "ClassTokenAndPosition", "Standardize"}
    export.export_backbone(backbone, str(tmp_path / "export"), image_shape=(16, 16, 3))
    images = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_MOCO_TF, str(tmp_path / "export"),
                           str(tmp_path / "images.npy"), str(tmp_path / "out.npz")],
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    expected = backbone(images.astype(np.float32) / 255.0, training=False).numpy()
    np.testing.assert_allclose(out["keras"], expected, atol=1e-5)
    np.testing.assert_allclose(out["served"], expected, atol=1e-5)
    assert "Normalization" in out["layers"] and not custom & set(out["layers"])
    if arch == "vit_tiny":  # fine-tuning the export trains what training trained, no more
        tuned = export.load_backbone(str(tmp_path / "export"), trainable=True)
        paths = [w.path for w in tuned.trainable_weights]
        assert any("cls_token/bias" in p for p in paths)
        assert not any("pos_embed" in p or "patch_embed" in p or "zeros" in p for p in paths)


def test_model_save_stores_each_weight_once_and_loads_back(tmp_path):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import synthetic
    from moco_tf import train_lib

    for scope in ("full", "from:layer3", "projector"):
        c = synthetic.get_config()
        c.model.backbone, c.model.width, c.moco.momentum_scope = "resnet18", 8, scope
        model = train_lib.build_model(c)
        path = str(tmp_path / f"{scope.replace(':', '_')}.keras")
        model.save(path)
        weight_bytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
                           for v in model.weights)
        # Each weight once, plus the config and the archive's own overhead.
        assert os.path.getsize(path) < 1.2 * weight_bytes + 600_000, scope
        again = keras.models.load_model(path)
        for a, b in zip(model.weights, again.weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        assert again.momentum_scope == scope


def test_an_empty_batch_serves_empty_features(exported):
    # A batching client may send zero images: [0, D] back, not a shape error from a BN kernel.
    model, export_dir = exported
    features = export.load_serving(export_dir)
    empty = features(np.zeros((0, *IMAGE_SHAPE), np.uint8))
    assert empty.shape == (0, 8) and empty.dtype == "float32"
    from_float = features.saved_model.features_from_float(np.zeros((0, *IMAGE_SHAPE), np.float32))
    assert from_float["features"].shape == (0, 8)
    np.testing.assert_allclose(features(_images(2)).numpy(), _in_memory(model, _images(2)),
                               atol=1e-5)  # and a batch after it is served as before
