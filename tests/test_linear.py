"""Linear evaluation (frozen backbone, the MoCo protocol) and the embedding projector."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from configs import synthetic

from moco_tf import data, export
from moco_tf.eval import linear, projector
from moco_tf.models import backbones

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG_FILE = os.path.join(ROOT, "configs", "synthetic.py")


def synthetic_config():
    c = synthetic.get_config()
    c.data.synthetic_examples = 128
    return c


def small_backbone():
    return backbones.build_backbone("small_cnn", (16, 16, 1), mean=(0.5,), std=(0.25,))


def all_weights(model):
    return [w.numpy().copy() for w in model.weights]


def test_frozen_backbone_keeps_its_weights_and_bn_statistics_while_the_linear_layer_learns():
    backbone = small_backbone()
    before = all_weights(backbone)
    assert any("moving" in w.path for w in backbone.weights)  # BN statistics are checked too
    classifier = linear.linear_classifier(backbone, num_classes=4)
    classifier.compile(keras.optimizers.SGD(30.0, momentum=0.9),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    images, labels = next(iter(data.eval_dataset(synthetic_config().data, "train", 64)))
    dense_before = classifier.get_layer("linear").kernel.numpy().copy()
    classifier.fit(images, labels, epochs=2, batch_size=32, verbose=0)
    for a, w in zip(before, backbone.weights):
        np.testing.assert_array_equal(w.numpy(), a, err_msg=w.path)
    assert not np.allclose(classifier.get_layer("linear").kernel.numpy(), dense_before)
    assert [w.path for w in classifier.trainable_weights] == ["linear/kernel", "linear/bias"]


def test_linear_classifier_sees_l2_normalised_features_unless_told_otherwise():
    backbone = small_backbone()
    images, _ = next(iter(data.eval_dataset(synthetic_config().data, "train", 8)))
    features = backbone(images, training=False).numpy()
    for normalize, expected in (("l2", features / np.linalg.norm(features, axis=1, keepdims=True)),
                                ("none", features)):
        classifier = linear.linear_classifier(backbone, num_classes=4, normalize=normalize)
        dense = classifier.get_layer("linear")
        np.testing.assert_allclose(classifier(images).numpy(),
                                   expected @ dense.kernel.numpy() + dense.bias.numpy(),
                                   rtol=1e-4, atol=1e-5, err_msg=normalize)
    with pytest.raises(ValueError, match="'l2' or 'none', got 'standardize'.*train_linear"):
        linear.linear_classifier(backbone, num_classes=4, normalize="standardize")


def test_linear_protocol_on_separable_features_and_on_a_random_backbone():
    rng = np.random.default_rng(0)
    # Class means far apart in 20 dims: any sane linear protocol must get them all right.
    centers = rng.normal(0, 3, (4, 20))
    y_train, y_test = rng.integers(0, 4, 400), rng.integers(0, 4, 100)
    x_train = centers[y_train] + rng.normal(0, 0.5, (400, 20))
    x_test = centers[y_test] + rng.normal(0, 0.5, (100, 20))
    for normalize in linear.NORMALIZATIONS:
        result = linear.train_linear(x_train, y_train, x_test, y_test, num_classes=4, epochs=5,
                                     normalize=normalize)
        assert result["top1"] == 1.0, (normalize, result)

    # Features of a random (untrained) CNN on the synthetic classes: well above chance (0.25).
    c = synthetic_config()
    backbone = small_backbone()
    train = linear.extract_features(backbone, data.eval_dataset(c.data, "train", 64))
    test = linear.extract_features(backbone, data.eval_dataset(c.data, "test", 64))
    assert train[0].shape == (128, backbone.output_shape[-1]) and test[0].shape[0] == 32
    # 128 images: batch 32 for 4 steps per epoch (measured 0.875-0.94 over 4 backbone seeds).
    result = linear.train_linear(*train, *test, num_classes=4, epochs=30, batch_size=32)
    assert result["top1"] > 0.6, result


def test_cli_writes_linear_eval_json_with_the_raw_pixel_baseline(tmp_path):
    export_dir = export.export_backbone(small_backbone(), str(tmp_path / "export"),
                                        image_shape=(16, 16, 1))
    config_path = CONFIG_FILE
    proc = subprocess.run(
        [sys.executable, "-m", "moco_tf.eval.linear", f"--export={export_dir}",
         f"--config={config_path}", "--config.data.synthetic_examples=128", "--epochs=10",
         "--batch_size=32", "--raw_pixels"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Linear top-1:" in proc.stdout and "raw pixels" in proc.stdout
    result = json.loads((tmp_path / "export" / "linear_eval.json").read_text())
    # (Raw pixels of the synthetic gratings, l2-normalised, are near chance: the class is in a
    # brightness level, which l2 removes, and the orientation of a grating with a random phase,
    # which no linear map of pixels sees.)
    assert 0.25 < result["top1"] <= 1.0 and 0.0 <= result["top1_raw_pixels"] <= 1.0
    assert result["epochs"] == 10 and result["learning_rate"] == 30.0 and result["normalize"] == "l2"
    assert result["train_examples"] == 128 and result["test_examples"] == 32


def test_embedding_projector_writes_features_labels_and_sprite(tmp_path):
    c = synthetic_config()
    backbone = small_backbone()
    test_ds = data.eval_dataset(c.data, "test", 20)
    log_dir = str(tmp_path / "projector")
    n = projector.write_embedding_projector(backbone, test_ds, log_dir, max_examples=25)
    assert n == 25
    images = np.concatenate([x for x, _ in test_ds.as_numpy_iterator()])[:25]
    labels = np.concatenate([y for _, y in test_ds.as_numpy_iterator()])[:25]
    with open(os.path.join(log_dir, "metadata.tsv")) as f:
        assert [int(line) for line in f] == labels.tolist()
    reader = tf.train.load_checkpoint(log_dir)
    stored = reader.get_tensor("embedding/.ATTRIBUTES/VARIABLE_VALUE")
    np.testing.assert_allclose(stored, backbone(images, training=False).numpy(), atol=1e-5)
    named = str(tmp_path / "named")
    projector.write_embedding_projector(backbone, test_ds, named, max_examples=4,
                                        class_names=["zero", "one", "two", "three"])
    with open(os.path.join(named, "metadata.tsv")) as f:
        assert f.readline() == "label\tclass\n"  # a header: two columns
        assert [line.split("\t")[1].strip() for line in f] == [
            ["zero", "one", "two", "three"][y] for y in labels[:4]]
    config = open(os.path.join(log_dir, "projector_config.pbtxt")).read()
    assert "metadata.tsv" in config and "sprite.png" in config
    sprite = tf.io.decode_png(tf.io.read_file(os.path.join(log_dir, "sprite.png"))).numpy()
    assert sprite.shape == (5 * 16, 5 * 16, 1)  # 25 thumbnails of 16 px in a 5 x 5 grid
    np.testing.assert_array_equal(sprite[:16, 16:32, 0], np.round(images[1, :, :, 0] * 255))


LAZY_EVAL = """
import sys
import moco_tf
assert "tensorflow" not in sys.modules  # `import moco_tf` (and moco_tf.eval) stays light
evaluation = moco_tf.eval
assert "tensorflow" not in sys.modules and "moco_tf.eval.linear" not in sys.modules
print(moco_tf.eval.projector.write_embedding_projector.__module__)
print(moco_tf.eval.linear.train_linear.__module__, moco_tf.eval.knn_accuracy.__module__)
from moco_tf.eval import KNNMonitor, projector
print(set(dir(moco_tf.eval)) >= {"knn", "linear", "projector", "KNNMonitor"})
try:
    moco_tf.eval.no_such_thing
except AttributeError as error:
    print(error)
"""


def test_eval_submodules_are_attributes_of_moco_tf_eval_after_import_moco_tf():
    # As documented: moco_tf.eval.projector.write_embedding_projector(...) after `import moco_tf`.
    proc = subprocess.run([sys.executable, "-c", LAZY_EVAL], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [
        "moco_tf.eval.projector", "moco_tf.eval.linear moco_tf.eval.knn", "True",
        "module 'moco_tf.eval' has no attribute 'no_such_thing'"]
