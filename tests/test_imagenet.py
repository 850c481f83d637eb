"""configs/moco_v2.py and configs/moco_v3.py end to end on ImageNet's two layouts, made small:
tfds `imagenet2012` prepared from its manual-download archives (a few JPEGs in the official tar
layout), and an ILSVRC-style folder (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG)."""
import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import moco_v2, moco_v3  # noqa: E402
from moco_tf import train_lib  # noqa: E402

WNIDS = ("n01440764", "n01443537", "n01484850")  # the first three ImageNet classes


def photo(rng, height, width):
    """JPEG bytes of a smooth random colour field (a little like a photo)."""
    coarse = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _add(tar, name, content):
    info = tarfile.TarInfo(name)
    info.size = len(content)
    tar.addfile(info, io.BytesIO(content))


def make_imagenet_archives(folder, per_class=4, val=6):
    """ILSVRC2012_img_train.tar (one tar per class inside) and ILSVRC2012_img_val.tar (flat,
    labels from tfds' validation label list), as image-net.org ships them."""
    rng = np.random.default_rng(0)
    os.makedirs(folder)
    with tarfile.open(os.path.join(folder, "ILSVRC2012_img_train.tar"), "w") as train:
        for wnid in WNIDS:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as t:
                for k in range(per_class):
                    _add(t, f"{wnid}_{k}.JPEG", photo(rng, 60 + 8 * k, 80))
            _add(train, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(os.path.join(folder, "ILSVRC2012_img_val.tar"), "w") as tar:
        for k in range(1, val + 1):
            _add(tar, f"ILSVRC2012_val_{k:08d}.JPEG", photo(rng, 70, 90))


def make_ilsvrc_folder(root, per_class=4):
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for wnid in WNIDS:
            os.makedirs(os.path.join(root, split, wnid))
            for k in range(per_class if split == "train" else 2):
                with open(os.path.join(root, split, wnid, f"{wnid}_{k}.JPEG"), "wb") as f:
                    f.write(photo(rng, 50 + 10 * k, 75))


def small(config):
    """The recipe, at a size this CPU trains in seconds: everything else as in the file."""
    config.data.image_size = 32
    config.model.backbone = "resnet18"
    config.model.width = 8
    config.model.cifar_stem = True
    if config.model.projector_hidden_dim:
        config.model.projector_hidden_dim = 64
    if config.model.predictor_hidden_dim:
        config.model.predictor_hidden_dim = 64
    config.moco.dim = 32
    config.moco.queue_size = 8
    config.train.batch_size = 4
    config.train.epochs = 1
    config.train.warmup_epochs = 0
    config.train.steps_per_epoch = 2
    config.train.verbose = 0
    config.eval.knn_every_epochs = 1
    config.eval.knn_ks = (4, 2)
    config.eval.batch_size = 8
    return config


@pytest.mark.slow
def test_moco_v2_config_on_tfds_imagenet2012_prepared_from_the_manual_archives(tmp_path):
    make_imagenet_archives(str(tmp_path / "manual"))
    config = small(moco_v2.get_config())
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.tfds_manual_dir = str(tmp_path / "manual")
    _, results = train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    # Prepared once, in the data_dir given.
    assert os.path.isdir(tmp_path / "tfds" / "imagenet2012")
    assert results["steps"] == 2 and np.isfinite(results["final_loss"])
    assert 0.0 <= results["knn_top1"] <= 1.0
    assert os.path.isdir(results["export_dir"])
    assert json.load(open(tmp_path / "run" / "results.json"))["knn_top1"] == results["knn_top1"]


@pytest.mark.slow
def test_moco_v3_config_on_an_ilsvrc_folder_with_device_augmentation(tmp_path):
    make_ilsvrc_folder(str(tmp_path / "imagenet"))
    config = small(moco_v3.get_config())
    config.data.source = "image_folder"
    config.data.data_dir = str(tmp_path / "imagenet" / "train")
    config.data.eval_dir = str(tmp_path / "imagenet" / "val")
    config.data.augment_on = "device"
    _, results = train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    assert results["steps"] == 2 and np.isfinite(results["final_loss"])
    assert [row["epoch"] for row in results["knn_per_epoch"]] == [1]
    assert results["skipped_images"] == 0


@pytest.mark.parametrize("layout", ["flat_val", "flat_train"])
def test_a_folder_without_labels_is_refused_before_training_when_knn_needs_them(tmp_path, layout):
    make_ilsvrc_folder(str(tmp_path / "imagenet"))
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "ILSVRC2012_val_00000001.JPEG").write_bytes(
        photo(np.random.default_rng(2), 40, 40))
    config = small(moco_v2.get_config())
    config.data.source = "image_folder"
    config.data.data_dir = str(flat if layout == "flat_train" else tmp_path / "imagenet" / "train")
    config.data.eval_dir = str(flat if layout == "flat_val" else tmp_path / "imagenet" / "val")
    config.train.batch_size = 1
    config.moco.queue_size = 4
    key = "data.eval_dir" if layout == "flat_val" else "data.data_dir"
    with pytest.raises(train_lib.config_lib.DataError,
                       match=f"{key} .* has no class sub-folders, but the kNN monitor needs labels"):
        train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_the_flat_ilsvrc_validation_folder_is_sorted_into_class_folders(tmp_path, capsys):
    from moco_tf.data import imagenet_val

    labels = imagenet_val.validation_labels()
    assert len(labels) == 50000 and labels[0] == "n01751748"
    for k in (1, 2, 3):
        (tmp_path / f"ILSVRC2012_val_{k:08d}.JPEG").write_bytes(b"jpeg")
    (tmp_path / "README").write_text("left alone")
    assert imagenet_val.main([str(tmp_path), "--dry_run"]) == 0
    assert "Would move 3 images into" in capsys.readouterr().out
    assert (tmp_path / "ILSVRC2012_val_00000001.JPEG").exists()
    counts = imagenet_val.sort_validation_folder(str(tmp_path))
    assert sum(counts.values()) == 3
    for k in (1, 2, 3):
        assert (tmp_path / labels[k - 1] / f"ILSVRC2012_val_{k:08d}.JPEG").exists()
    assert (tmp_path / "README").exists()
    assert imagenet_val.main([str(tmp_path)]) == 2  # nothing left to sort: a clear error
