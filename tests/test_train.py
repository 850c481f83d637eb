"""End to end: config -> fit -> kNN -> export -> results.json, in process and through train.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from configs import synthetic
from moco_tf import callbacks, data, export, losses, train_lib
from moco_tf.data import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def synthetic_config():
    c = synthetic.get_config()
    c.train.epochs = 4
    c.train.verbose = 0
    c.eval.knn_every_epochs = 2
    return c


CLASS_NAMES = ["circle", "square", "stripes", "noise"]  # names for the 4 synthetic classes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    # Synthetic data has no class names; give it some, as Fashion-MNIST and image folders have,
    # so that the run's projector shows what a labelled source gets.
    named = lambda data_cfg: CLASS_NAMES if data_cfg.source == "synthetic" else None  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets, "class_names", named)
        model, results = train_lib.train_and_evaluate(synthetic_config(), workdir)
    return model, results, workdir


def instance_loss(model, views):
    """In-batch InfoNCE of held-out views: how well the encoder tells these 64 images apart."""
    q = tf.math.l2_normalize(model.projector(model.backbone(views["view1"])), 1)
    k = tf.math.l2_normalize(model.key_projector(model.key_backbone(views["view2"])), 1)
    return float(tf.reduce_mean(losses.info_nce_batch(q, k, 0.2)[0]))


def test_two_epochs_of_training_lower_the_contrastive_loss():
    c = synthetic_config()
    c.train.epochs = 2
    # The synthetic "test" split: 64 other images (another seed) than the 256 trained on.
    views = next(iter(data.train_dataset(c.data, 64, seed=1, split="test")))
    model = train_lib.build_model(c, total_steps=16, epoch_steps=8)
    before = instance_loss(model, views)
    history = model.fit(data.train_dataset(c.data, 32, seed=0), epochs=2, steps_per_epoch=8,
                        verbose=0)
    after = instance_loss(model, views)
    assert all(np.isfinite(history.history["loss"]))
    assert after < before - 0.1, (before, after)  # measured: 4.15 (~log 64, chance) -> 3.98


def test_training_writes_results_tensorboard_and_export(trained):
    _, results, workdir = trained
    assert len(results["loss_per_epoch"]) == 4 and all(np.isfinite(results["loss_per_epoch"]))
    with open(os.path.join(workdir, "results.json")) as f:
        on_disk = json.load(f)
    for key in ("knn_top1", "knn_top1_k5", "epochs", "images_per_sec", "export_dir"):
        assert key in on_disk, key
    assert 0.0 <= on_disk["knn_top1"] <= 1.0
    assert on_disk["images_per_sec"] > 0
    assert [e["epoch"] for e in on_disk["knn_per_epoch"]] == [2, 4]


def _summaries(log_dir):
    """{tag: [(step, value or image count)]} of the TensorBoard event files in log_dir."""
    out = {}
    for name in os.listdir(log_dir):
        if not name.startswith("events.out"):
            continue
        for event in tf.compat.v1.train.summary_iterator(os.path.join(log_dir, name)):
            for value in event.summary.value:
                tensor = tf.make_ndarray(value.tensor) if value.HasField("tensor") else None
                out.setdefault(value.tag, []).append((event.step, tensor))
    return out


def test_tensorboard_gets_step_and_epoch_scalars_hparams_views_and_labelled_projector(trained):
    model, results, workdir = trained
    tags = _summaries(os.path.join(workdir, "tensorboard"))
    # Step scalars every train.summary_every_steps (50 by default; 4 epochs x 8 steps: none at
    # 50, so the config's cadence is checked on the epoch scalars and in the next test).
    for key in ("loss", "top1"):
        assert [step for step, _ in tags[f"epoch/{key}"]] == [1, 2, 3, 4]
    assert [step for step, _ in tags["epoch/knn_top1"]] == [2, 4]  # the kNN curve
    assert float(tags["epoch/knn_top1"][-1][1]) == pytest.approx(results["knn_top1"])
    assert "_hparams_/session_start_info" in tags
    for view in ("views/view1", "views/view2"):
        assert len(tags[view]) == 1  # an image of augmented pairs, at the start
    assert not any("learning_rate" in tag or "finite" in tag for tag in tags)
    # The embedding projector: test-set features, one metadata row per point with its class name.
    log_dir = os.path.join(workdir, "tensorboard", "projector")
    config = open(os.path.join(log_dir, "projector_config.pbtxt")).read()
    assert 'metadata_path: "metadata.tsv"' in config and 'image_path: "sprite.png"' in config
    rows = [line.rstrip("\n").split("\t") for line in open(os.path.join(log_dir, "metadata.tsv"))]
    assert rows[0] == ["label", "class"]
    c = synthetic_config()
    test_set = data.eval_dataset(c.data, c.data.eval_split, 64)
    images, labels = [np.concatenate(t) for t in zip(*test_set)]
    count = results["projector_examples"]
    assert count == len(rows) - 1 == min(len(labels), train_lib.PROJECTOR_EXAMPLES)
    assert rows[1:] == [[str(y), CLASS_NAMES[y]] for y in labels[:count]]
    assert len({name for _, name in rows[1:]}) == 4
    embedding = tf.train.load_checkpoint(log_dir).get_tensor("embedding/.ATTRIBUTES/VARIABLE_VALUE")
    np.testing.assert_allclose(embedding, model.backbone(images[:count]).numpy(), atol=1e-5)


def test_step_scalars_every_n_steps_and_a_progress_bar_without_bookkeeping(tmp_path, capfd):
    c = synthetic_config()
    c.train.epochs, c.train.steps_per_epoch, c.train.summary_every_steps = 1, 6, 2
    c.train.verbose = 1
    c.eval.knn_every_epochs, c.eval.export = 0, False
    train_lib.train_and_evaluate(c, str(tmp_path))
    tags = _summaries(str(tmp_path / "tensorboard"))
    for key in ("loss", "top1", "lr", "momentum"):
        assert [step for step, _ in tags[f"step/{key}"]] == [2, 4, 6], key
    # Each step scalar is that step's own value (steps.jsonl has every step), not a running mean:
    # the epoch's top-1 is the mean of the steps' top-1s.
    steps = callbacks.read_step_log(str(tmp_path / train_lib.STEP_LOG))
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "top1", "lr"):
        assert [float(v) for _, v in tags[f"step/{key}"]] == pytest.approx(
            [steps[s][key] for s in (2, 4, 6)], rel=1e-6), key
    top1 = [steps[s]["top1"] for s in range(1, 7)]
    assert float(tags["epoch/top1"][0][1]) == pytest.approx(np.mean(top1), rel=1e-5)
    assert len(set(top1)) > 1  # the steps' own values differ: their means would tell apart
    # The lr a step used: the cosine schedule (different at every step) at the step's index, so
    # the last step's lr is not the schedule's end (0).
    schedule = train_lib.learning_rate(c, total_steps=6, epoch_steps=6)
    assert [steps[s]["lr"] for s in range(1, 7)] == pytest.approx(
        [float(schedule(s - 1)) for s in range(1, 7)], rel=1e-6)
    assert steps[6]["lr"] > 0
    bar = capfd.readouterr().out
    assert "top1" in bar and "momentum" in bar and "lr" in bar
    assert "finite" not in bar and "batch_loss" not in bar and "batch_top1" not in bar


def test_predict_scales_integer_images_of_any_dtype_and_refuses_other_values(trained):
    model = trained[0]
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 1), dtype=np.uint8)
    expected = model.predict(images.astype(np.float32) / 255.0, verbose=0)
    np.testing.assert_allclose(model.predict(images, verbose=0), expected, atol=1e-6)
    for dtype in (np.int16, np.int32, np.int64, np.uint16):  # 8-bit values in a wider type
        np.testing.assert_allclose(model.predict(images.astype(dtype), verbose=0), expected,
                                   atol=1e-6, err_msg=str(dtype))
    assert np.abs(model.predict(images.astype(np.float32), verbose=0) - expected).max() > 1e-3
    for bad in (images.astype(np.int32) * 257, images.astype(np.int16) - 128):  # 16-bit, signed
        with pytest.raises(tf.errors.InvalidArgumentError, match="pixel values 0..255"):
            model.predict(bad, verbose=0)


def test_learned_features_beat_chance_on_the_synthetic_classes(trained):
    _, results, _ = trained
    assert results["knn_top1"] > 0.5  # 4 classes: chance is 0.25


def test_export_reloads_in_a_fresh_process_with_the_same_features(trained, tmp_path):
    model, results, _ = trained
    export_dir = results["export_dir"]
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 1), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    expected = model(images.astype("float32") / 255.0).numpy()
    script = (
        "import sys, numpy as np, tensorflow as tf\n"
        f"m = tf.saved_model.load({os.path.join(export_dir, 'saved_model')!r})\n"
        f"x = np.load({str(tmp_path / 'images.npy')!r})\n"
        "f = m.signatures['serving_default'](images=tf.constant(x))['features']\n"
        f"np.save({str(tmp_path / 'features.npy')!r}, f.numpy())\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    served = np.load(tmp_path / "features.npy")
    assert served.shape == expected.shape
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_build_model_gives_a_model_ready_for_fit():
    c = synthetic_config()
    model = train_lib.build_model(c, total_steps=10, epoch_steps=5)
    assert model.optimizer is not None
    assert model.queue.shape == (64, 128)
    assert model.key_backbone is not None and model.key_backbone is not model.backbone
    # lr = base * batch / 256 at step 0 of the cosine schedule.
    assert float(model.optimizer.learning_rate) == pytest.approx(0.5 * 32 / 256)


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST), reason="apt-get install dataset-fashion-mnist")
@pytest.mark.slow
def test_quickstart_smoke_through_train_py_on_real_fashion_mnist(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "--config=configs/fashion_mnist.py:smoke",
         f"--workdir={tmp_path}", "--config.train.verbose=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done. knn_top1=" in proc.stdout
    # moco_tf's INFO lines reach the console, TensorFlow's (one per checkpoint and export) not.
    assert "Saved checkpoint" in proc.stderr
    assert "Sharding callback duration" not in proc.stderr
    assert "fingerprint" not in proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0.1 < results["knn_top1"] <= 1.0  # 10 classes; even 10 steps learn something
    assert os.path.isfile(os.path.join(results["export_dir"], "saved_model", "saved_model.pb"))


DETERMINISM_PROBE = '''
import sys
import tensorflow as tf
from tensorflow.python.framework import config as tf_config
from moco_tf import train_lib
if sys.argv[1] == "started":
    tf.constant(1.0) + 1.0  # TensorFlow runs: its thread pools exist
train_lib.make_ops_deterministic()
print(tf.config.threading.get_inter_op_parallelism_threads(), tf_config.is_op_determinism_enabled())
'''


@pytest.mark.parametrize("when", ["fresh", "started"])
def test_deterministic_means_op_determinism_and_one_inter_op_thread(when):
    # One inter-op thread is what made the quickstart's symmetric EMA steps bit-identical between
    # processes (op determinism alone was not); it can only be set before TensorFlow starts.
    proc = subprocess.run([sys.executable, "-c", DETERMINISM_PROBE, when], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    threads, enabled = proc.stdout.split()
    assert enabled == "True"
    if when == "fresh":
        assert threads == "1"
        assert "already started" not in proc.stderr
    else:  # too late to change the pools: kept, with a warning that says what to do
        assert threads == "0"
        assert "make_ops_deterministic() before using TensorFlow" in proc.stderr
