"""Reliability, round two: each case of docs/reliability.md that is not tested elsewhere. Every
bad input is refused where it enters, with one line that names it; no failure loses work."""
import gc
import json
import math
import os
import re
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import synthetic  # noqa: E402
from moco_tf import checkpoint as checkpoint_lib  # noqa: E402
from moco_tf import config as config_lib  # noqa: E402
from moco_tf import errors, export, train_lib  # noqa: E402
from moco_tf.config import ConfigError, DataError  # noqa: E402
from moco_tf.eval import knn  # noqa: E402
from moco_tf.models.backbones import build_backbone  # noqa: E402

# (config key, value, what the one line says)
BAD_VALUES = [
    ("train.steps_per_epoch", -1, "'train.steps_per_epoch' must be >= 1, got -1"),
    ("train.steps_per_epoch", 0, "'train.steps_per_epoch' must be >= 1, got 0"),
    ("train.base_learning_rate", -5.0, "'train.base_learning_rate' must be > 0, got -5.0"),
    ("train.base_learning_rate", 0.0, "'train.base_learning_rate' must be > 0"),
    ("train.base_learning_rate", math.inf, "'train.base_learning_rate' must be > 0, got inf"),
    ("moco.temperature", math.inf, "'moco.temperature' must be > 0, got inf"),
    ("moco.temperature", math.nan, "'moco.temperature' must be > 0, got nan"),
    ("moco.momentum", math.nan, "'moco.momentum' must be >= 0 and <= 1, got nan"),
    ("model.split_bn_groups", 0, "'model.split_bn_groups' must be >= 1, got 0"),
    ("model.stem_stride", 3, "'model.stem_stride' must be >= 1 and <= 2, got 3"),
    ("moco.queue_size", 0, "'moco.queue_size' must be >= 1, got 0"),
    ("data.image_size", 0, "'data.image_size' must be >= 8, got 0"),
    ("data.image_size", 4, "'data.image_size' must be >= 8, got 4"),
    ("train.batch_size", 0, "'train.batch_size' must be >= 1, got 0"),
    ("train.epochs", 0, "'train.epochs' must be >= 1, got 0"),
    ("train.weight_decay", -1e-4, "'train.weight_decay' must be >= 0"),
    ("train.optimizer_momentum", 1.5, "'train.optimizer_momentum' must be >= 0 and <= 1"),
    ("train.warmup_epochs", 5, "'train.warmup_epochs' (5) must be fewer than 'train.epochs' (2)"),
    ("data.crop_scale", (0.5, 0.2), "'data.crop_scale' must be (low, high) with 0 < low <= high"),
    ("data.crop_scale", (0.0, 1.0), "'data.crop_scale' must be (low, high) with 0 < low"),
    ("data.crop_scale", (0.2, 1.5), "'data.crop_scale' must be (low, high)"),
    ("data.channels", 2, "'data.channels' must be 1 (gray) or 3 (RGB), got 2"),
    ("data.std", (0.0,), "'data.std' must be positive"),
    ("eval.knn_ks", (0,), "'eval.knn_ks' must be neighbour counts >= 1"),
    ("eval.knn_ks", (), "'eval.knn_ks' must be neighbour counts >= 1"),
    ("eval.batch_size", 0, "'eval.batch_size' must be >= 1, got 0"),
    ("eval.knn_temperature", 0.0, "'eval.knn_temperature' must be > 0"),
    ("model.width", 0, "'model.width' must be >= 1, got 0"),
    ("moco.dim", 0, "'moco.dim' must be >= 1, got 0"),
    ("moco.loss_scale", 0.0, "'moco.loss_scale' must be > 0"),
    ("train.steps_per_execution", 0, "'train.steps_per_execution' must be >= 1"),
    ("train.summary_every_steps", 0, "'train.summary_every_steps' must be >= 1"),
    ("data.num_classes", 0, "'data.num_classes' must be >= 1, got 0"),
    ("model.projector_layers", 1, "'model.projector_layers' must be >= 2 for an MLP projector"),
    ("moco.momentum_scope", "from:", "momentum_scope must be one of full, projector, none or "
                                     "'from:<block>'"),
    # Tuple elements of the default's type (was: trained, then a KeyError / TypeError traceback).
    ("eval.knn_ks", (5.5,), "'eval.knn_ks' must be a tuple of int, e.g. (200, 20), got (5.5,)"),
    ("eval.knn_ks", ("a",), "'eval.knn_ks' must be a tuple of int, e.g. (200, 20), got ('a',)"),
    ("eval.knn_ks", (True,), "'eval.knn_ks' must be a tuple of int"),
    ("data.std", ("abc",), "'data.std' must be a tuple of float, e.g. (0.353,), got ('abc',)"),
    ("data.mean", (math.nan,), "'data.mean' must be finite numbers, got (nan,)"),
    ("data.mean", (math.inf,), "'data.mean' must be finite numbers, got (inf,)"),
    ("seed", -1, "'seed' must be >= 0 and <= 4294967295, got -1"),
    ("seed", 2**32, "'seed' must be >= 0 and <= 4294967295, got 4294967296"),
    ("train.lr_decay_epochs", (-1, 5), "'train.lr_decay_epochs' must be increasing epochs > 0"),
    ("train.lr_decay_epochs", (2, 1), "'train.lr_decay_epochs' must be increasing epochs > 0"),
    ("train.lr_decay_epochs", (2, 2), "'train.lr_decay_epochs' must be increasing epochs > 0"),
    ("train.lr_decay_epochs", (1.5,), "'train.lr_decay_epochs' must be a tuple of int"),
    # Python's bool is an int: True would train 1 epoch.
    ("train.epochs", True, "'train.epochs' must be of type int, got True (a bool)"),
]


@pytest.mark.parametrize("key,value,message", BAD_VALUES,
                         ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_a_bad_config_value_is_refused_with_one_line(key, value, message):
    c = synthetic.get_config()
    *section, name = key.split(".")
    (c[section[0]] if section else c)[name] = value
    with pytest.raises(ConfigError, match=None) as error:
        config_lib.validate(c)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("overrides,message", [
    ({"model.backbone": "vit_tiny", "data.image_size": 30},
     "'data.image_size' (30) must be a multiple of 'model.patch_size' (16) for a ViT"),
    ({"model.backbone": "resnet50", "model.cifar_stem": False},
     "too small for an ImageNet ResNet stem"),
    ({"model.stem_stride": 2, "model.cifar_stem": False, "data.image_size": 32},
     "'model.stem_stride' (2) applies to the CIFAR stem only"),
    ({"moco.negatives": "both_views", "moco.symmetric": False}, "needs symmetric=True"),
    ({"moco.momentum_scope": "none"}, "needs a momentum encoder"),
    ({"model.predictor_last_bn": True}, "'model.predictor_last_bn' needs a predictor"),
    ({"model.zero_init_residual": True, "model.backbone": "small_cnn"},
     "'model.zero_init_residual' applies to ResNets"),
])
def test_combinations_that_cannot_work_are_refused(overrides, message):
    c = synthetic.get_config()
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_lib.validate(c)


@pytest.mark.parametrize("key,value,message", [
    ("train.steps_per_epoch", "ten", "'train.steps_per_epoch' must be of type int or None, got "
                                     "'ten'."),
    ("train.steps_per_epoch", True, "'train.steps_per_epoch' must be of type int or None, got "
                                    "True (a bool)."),
    ("eval.knn_ks", ("a",), "'eval.knn_ks' must be a tuple of int"),
    ("moco.temperature", False, "'moco.temperature' must be of type float, got False (a bool)"),
])
def test_a_file_config_of_the_wrong_type_names_the_type_of_the_schema(key, value, message):
    # Built from a dict, as a hand-written config file can be: the defaults' types, not the
    # value's (a placeholder's default None is "NoneType"), are named.
    import ml_collections

    raw = config_lib.defaults().to_dict()
    section, name = key.split(".")
    raw[section][name] = value
    with pytest.raises(ConfigError) as error:
        config_lib.validate(ml_collections.ConfigDict(raw))
    assert message in str(error.value) and "NoneType" not in str(error.value)


def test_fashion_mnist_with_fewer_classes_than_its_ten_is_refused_up_front():
    from configs import fashion_mnist

    c = fashion_mnist.get_config()
    c.data.num_classes = 4
    with pytest.raises(ConfigError, match=r"'data.num_classes' \(4\) is smaller than the 10 "
                                          r"classes of Fashion-MNIST; set data.num_classes=10"):
        config_lib.validate(c)
    c.eval.knn_every_epochs, c.eval.raw_pixel_baseline = 0, False  # no labels read: fine
    config_lib.validate(c)


def small_config(**train):
    c = synthetic.get_config()
    c.eval.knn_every_epochs, c.eval.export, c.train.verbose = 0, False, 0
    for key, value in train.items():
        c.train[key] = value
    return c


# --- data ----------------------------------------------------------------------------------------


def _folder(root, names, content=None):
    (root / "c").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / "c" / name)
        if content is not None:
            (root / "c" / name).write_bytes(content((root / "c" / name).read_bytes()))


def folder_config(folder, **data):
    c = small_config()
    c.data.update(dict(source="image_folder", data_dir=str(folder), channels=3,
                       mean=(0.5,) * 3, std=(0.25,) * 3, cache=False, **data))
    c.train.batch_size, c.moco.queue_size, c.model.split_bn_groups = 4, 16, 2
    return c


def _corrupt(png):
    """Header and IEND intact, the pixel data destroyed: found only when decoded."""
    png = bytearray(png)
    start = png.index(b"IDAT") + 4
    png[start:start + 100] = b"\0" * 100
    return bytes(png)


def test_a_folder_whose_every_image_is_corrupt_is_refused_before_training(tmp_path):
    _folder(tmp_path, [f"{i}.png" for i in range(6)], _corrupt)
    with pytest.raises(DataError, match=r"None of the first 6 images of .* can be decoded"):
        train_lib.train_and_evaluate(folder_config(tmp_path), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")  # nothing was built or written


def test_an_evaluation_folder_whose_every_image_is_corrupt_fails_the_evaluation_only(tmp_path):
    # Was: the kNN error, then a `write_embedding_projector: the dataset is empty` traceback and
    # no results.json.
    _folder(tmp_path / "train", [f"{i}.png" for i in range(6)])
    _folder(tmp_path / "val", [f"{i}.png" for i in range(4)], _corrupt)
    c = folder_config(tmp_path / "train", eval_dir=str(tmp_path / "val"))
    c.train.steps_per_epoch, c.train.epochs = 2, 1
    c.eval.knn_every_epochs, c.eval.export, c.eval.raw_pixel_baseline = 1, True, True
    c.eval.knn_ks = (3,)
    with pytest.raises(errors.EvaluationError,
                       match=r"Trained, checkpointed and exported, but the final kNN evaluation "
                             r"failed \(.*empty.*\); the raw-pixel kNN baseline failed .*; the "
                             r"embedding projector failed \(.*the dataset is empty.\); "
                             r"results.json has the rest") as error:
        train_lib.train_and_evaluate(c, str(tmp_path / "run"))
    assert "\n" not in str(error.value)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 2 and os.path.isdir(results["export_dir"])
    assert [e["step"] for e in results["eval_errors"]] == ["raw-pixel kNN baseline",
                                                           "embedding projector"]
    assert [e["epoch"] for e in results["knn_errors"]] == [1]


def test_odd_file_names_are_read(tmp_path):
    names = ["a b.png", "ünïcödé.png", "[x](y).png", "-dash.png", "#hash%.png", "dot.s.png",
             "UPPER.PNG", "quote'.png"]
    _folder(tmp_path, names)
    c = folder_config(tmp_path)
    c.train.steps_per_epoch, c.train.epochs = 2, 1
    _, results = train_lib.train_and_evaluate(c, str(tmp_path / "run"))
    assert results["skipped_images"] == 0 and np.isfinite(results["final_loss"])


# --- checkpoints ---------------------------------------------------------------------------------


def _trained(workdir, **changes):
    c = small_config(epochs=1, steps_per_epoch=3)
    for key, value in changes.items():
        section, name = key.split(".")
        c[section][name] = value
    return train_lib.train_and_evaluate(c, str(workdir))


def test_a_checkpoint_of_another_seed_or_batch_size_is_refused(tmp_path):
    # Row 70, at the checkpoint itself (what a workdir without config.json relies on).
    c = small_config(epochs=1, steps_per_epoch=3)
    model = train_lib.build_model(c)
    model.optimizer.build(model.trainable_variables)  # slots exist, as after a step
    checkpoint_lib.Checkpointer(str(tmp_path), model, seed=0, batch_size=32).save(1, 0)
    for seed, batch, message in ((5, 32, "written with seed=0, but this run has seed=5"),
                                 (0, 16, "written with batch_size=32, but this run has "
                                         "batch_size=16")):
        other = checkpoint_lib.Checkpointer(str(tmp_path), train_lib.build_model(c), seed=seed,
                                            batch_size=batch)
        with pytest.raises(checkpoint_lib.CheckpointMismatch, match=message):
            other.restore_latest()


@pytest.mark.parametrize("change,value", [("model.backbone", "resnet18"),
                                          ("moco.queue_size", 128), ("seed", 7)])
def test_resuming_another_runs_workdir_is_refused_with_one_line(tmp_path, change, value, caplog):
    _trained(tmp_path)
    c = small_config(epochs=2, steps_per_epoch=3)
    *section, name = change.split(".")
    (c[section[0]] if section else c)[name] = value
    # The run's config.json names the change before anything is built...
    with pytest.raises(ConfigError, match=rf"{tmp_path} holds a run with other values of what "
                                          rf"defines it: {re.escape(change)} .* -> {value!r}; "
                                          r".*or use a new --workdir") as error:
        train_lib.train_and_evaluate(c, str(tmp_path))
    assert "\n" not in str(error.value)
    # ...and a workdir written before config.json existed: the checkpoint itself refuses.
    os.remove(tmp_path / train_lib.CONFIG_FILE)
    what = ("was written with seed=0, but this run has seed=7" if change == "seed" else
            "does not match this model")
    with pytest.raises(checkpoint_lib.CheckpointMismatch,
                       match=f"{what}.*Use another --workdir") as error:
        train_lib.train_and_evaluate(c, str(tmp_path))
    assert "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / train_lib.CONFIG_FILE)  # not overwritten by a refusal
    # When the refused restore is deleted, TensorFlow's list of the values it did not restore
    # (2 to 30 warning lines after our one line) stays silent.
    error = None
    gc.collect()
    assert "unrestored values" not in caplog.text
    assert "could not be found in the restored object" not in caplog.text


def test_resuming_with_other_values_of_the_runs_math_lists_each_change(tmp_path):
    _trained(tmp_path)
    c = small_config(epochs=2, steps_per_epoch=3)
    c.train.base_learning_rate *= 10
    c.moco.temperature = 0.1
    c.data.augmentation = "moco_v1"
    with pytest.raises(ConfigError) as error:
        train_lib.train_and_evaluate(c, str(tmp_path))
    assert ("holds a run with other values of what defines it: data.augmentation 'moco_v2' -> "
            "'moco_v1', moco.temperature 0.2 -> 0.1, train.base_learning_rate 0.5 -> 5.0; "
            "resuming would continue another run. Put the values back") in str(error.value)


def test_resuming_with_safe_changes_goes_on_and_a_changed_knn_ks_is_evaluated_anew(tmp_path,
                                                                                   caplog):
    c = small_config(epochs=1, steps_per_epoch=3)
    c.eval.knn_every_epochs, c.eval.knn_ks = 1, (5,)
    train_lib.train_and_evaluate(c, str(tmp_path))
    c.train.epochs, c.eval.knn_ks, c.train.checkpoint_every_steps = 2, (3, 2), 2
    _, results = train_lib.train_and_evaluate(c, str(tmp_path))  # was KeyError 'k3'
    assert results["resumed_from_step"] == 3 and results["steps"] == 6
    assert "train.epochs 1 -> 2: the lr and momentum schedules stretch" in caplog.text
    assert [e["epoch"] for e in results["knn_per_epoch"]] == [2]  # epoch 1 had k=5 only
    assert set(results["knn_per_epoch"][0]) == {"epoch", "k3", "k2"}
    # Rerun the finished run with yet other ks: evaluated again with them, no KeyError.
    c.eval.knn_ks = (4,)
    _, again = train_lib.train_and_evaluate(c, str(tmp_path))
    assert again["resumed_from_step"] == 6 and "knn_top1" in again
    assert json.loads((tmp_path / train_lib.CONFIG_FILE).read_text())["eval.knn_ks"] == [4]


def test_a_checkpoint_past_the_configs_last_step_is_refused_with_the_real_step(tmp_path):
    _trained(tmp_path, **{"train.epochs": 2})  # ckpt-6
    c = small_config(epochs=1, steps_per_epoch=3)  # 3 steps: was "already complete", exit 0
    with pytest.raises(ConfigError, match=r"ckpt-6 is at step 6, past the 3 steps this config "
                                          r"trains \(train.epochs=1 x 3 steps\): there is "
                                          r"nothing to train. Set train.epochs=2"):
        train_lib.train_and_evaluate(c, str(tmp_path))


@pytest.mark.parametrize("state", [
    "this is { not a checkpoint state proto",                       # garbage
    'model_checkpoint_path: "ckpt-99"\nall_model_checkpoint_paths: "ckpt-99"\n',  # a lost file
    ""])                                                            # empty
def test_a_damaged_checkpoint_state_file_does_not_block_the_resume(tmp_path, state):
    _trained(tmp_path)
    (tmp_path / "checkpoints" / "checkpoint").write_text(state)
    _, results = _trained(tmp_path, **{"train.epochs": 2})  # found by its .index file
    assert results["resumed_from_step"] == 3 and results["steps"] == 6


def test_a_checkpoint_of_an_older_format_is_refused(tmp_path):
    _trained(tmp_path)
    c = small_config(epochs=2, steps_per_epoch=3)
    model = train_lib.build_model(c)
    saver = checkpoint_lib.Checkpointer(str(tmp_path / "old"), model, seed=c.seed,
                                        batch_size=c.train.batch_size)
    saver.save(1, 0)
    reader = checkpoint_lib.Checkpointer(str(tmp_path / "old"), model, seed=c.seed,
                                         batch_size=c.train.batch_size)
    original = checkpoint_lib.FORMAT
    checkpoint_lib.FORMAT = 3  # as if this version wrote format 3: the file holds 2
    try:
        with pytest.raises(checkpoint_lib.CheckpointError, match="written by an older moco_tf "
                                                                 r"\(checkpoint format 2"):
            reader.restore_latest()
    finally:
        checkpoint_lib.FORMAT = original


# --- serving -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("served"))
    export.export_backbone(build_backbone("small_cnn", (16, 16, 3)), out, image_shape=(16, 16, 3))
    return tf.saved_model.load(os.path.join(out, "saved_model")).signatures["serving_default"]


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (2, 16, 16, 1), (16, 16, 3), (1, 2, 16, 16, 3)])
def test_serving_refuses_images_of_another_shape(served, shape):
    # Our check in the graph, or the signature's own binding: a clear error, never features of
    # a wrong-size image, never an abort.
    with pytest.raises((tf.errors.InvalidArgumentError, TypeError),
                       match=r"takes a batch of images \[N, 16, 16, 3\]|Can not cast TensorSpec"):
        served(images=tf.zeros(shape, tf.uint8))
    assert served(images=tf.zeros((3, 16, 16, 3), tf.uint8))["features"].shape == (3, 64)


# --- interruptions and failures after the work -----------------------------------------------


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    import keras

    class CtrlC(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == 3:
                raise KeyboardInterrupt

    c = small_config(epochs=2, steps_per_epoch=4, checkpoint_every_steps=0)
    with pytest.raises(errors.Interrupted, match=r"Interrupted at step 3 of 8; saved .*ckpt-3\. "
                                                    r"Rerun the same command to resume"):
        train_lib.train_and_evaluate(c, str(tmp_path), callbacks=[CtrlC()])
    _, results = train_lib.train_and_evaluate(c, str(tmp_path))
    assert results["resumed_from_step"] == 3 and results["steps"] == 8


def test_ctrl_c_during_the_final_evaluation_keeps_the_training_and_says_so(tmp_path,
                                                                           monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    c = small_config(epochs=1, steps_per_epoch=3)
    c.eval.export = True
    monkeypatch.setattr(export, "export_backbone", interrupted)
    with pytest.raises(errors.Interrupted,
                       match=r"^Interrupted after training, during the evaluation and export; all "
                             r"3 steps are saved \(.*ckpt-3\)\. Rerun the same command to "
                             r"evaluate and export \(nothing is left to train\)\.$"):
        train_lib.train_and_evaluate(c, str(tmp_path))
    monkeypatch.undo()
    _, results = train_lib.train_and_evaluate(c, str(tmp_path))
    assert results["resumed_from_step"] == 3 and os.path.isdir(results["export_dir"])


def test_a_failed_evaluation_keeps_the_checkpoints_and_the_export(tmp_path, monkeypatch):
    def broken(self):
        raise MemoryError("the kNN bank does not fit")

    monkeypatch.setattr(knn.KNNMonitor, "evaluate", broken)
    c = small_config(epochs=2, steps_per_epoch=3)
    c.eval.knn_every_epochs, c.eval.export = 1, True
    with pytest.raises(errors.EvaluationError, match="Trained, checkpointed and exported, but "
                                                        "the final kNN evaluation failed"):
        train_lib.train_and_evaluate(c, str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert [e["epoch"] for e in results["knn_errors"]] == [1, 2]  # training went on after epoch 1
    assert results["steps"] == 6 and os.path.isdir(results["export_dir"])
    assert checkpoint_lib.checkpoints_in(str(tmp_path / "checkpoints"))[0].endswith("ckpt-6")


def test_results_json_never_holds_a_bare_nan():
    safe = train_lib._json_safe({"loss": math.nan, "per_epoch": [1.0, math.inf], "ok": 2})
    assert safe == {"loss": None, "per_epoch": [1.0, None], "ok": 2}
    json.dumps(safe, allow_nan=False)  # valid JSON


def test_knn_jsonl_never_holds_a_bare_nan(tmp_path):
    path = tmp_path / "knn.jsonl"
    monitor = knn.KNNMonitor(None, None, 2, ks=(3,), history_path=str(path), verbose=0)
    monitor.evaluate = lambda: {3: math.nan}  # e.g. an accuracy over no test image
    monitor.record(1)
    assert json.loads(path.read_text()) == {"epoch": 1, "k3": None}  # strict JSON: null
    monitor.restore_history(1)  # a null accuracy is no evaluation of that epoch
    assert monitor.history == [] and json.loads(path.read_text())["k3"] is None


def test_red_team_table_lists_at_least_60_cases():
    text = open(os.path.join(ROOT, "docs", "reliability.md")).read()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) - 1 >= 60  # minus the header
