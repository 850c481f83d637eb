"""Config validation: one clear error per mistake, and train.py turning it into exit status 2."""

import os
import subprocess
import sys

import ml_collections
import pytest

from moco_tf import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import (  # noqa: E402
    fashion_mnist, moco_v1, moco_v2, moco_v3, projector_momentum, simclr, simclr_momentum, synthetic,
)

METHODS = (moco_v3, simclr, simclr_momentum, projector_momentum)


@pytest.mark.parametrize(
    "module,variant",
    [(synthetic, ""), (fashion_mnist, ""), (fashion_mnist, "smoke"), (moco_v1, ""), (moco_v1, "runlocal"),
     (moco_v2, ""), (moco_v2, "runlocal")]
    + [(m, v) for m in METHODS for v in ("", "runlocal", "fashion_mnist")],
)
def test_shipped_configs_are_valid_and_have_the_required_keys(module, variant):
    c = module.get_config(variant)
    config_lib.validate(c)
    for key in ("seed", "train.epochs", "train.batch_size", "train.steps_per_epoch",
                "moco.queue_size", "moco.momentum", "moco.temperature", "moco.dim"):
        node = c
        for part in key.split("."):
            assert part in node, key
            node = node[part]


def test_moco_v1_and_v2_recipes_differ_where_the_papers_do():
    v1, v2 = moco_v1.get_config(), moco_v2.get_config()
    assert (v1.moco.temperature, v2.moco.temperature) == (0.07, 0.2)
    assert (v1.model.projector, v2.model.projector) == ("linear", "mlp")
    assert (v1.train.lr_schedule, v2.train.lr_schedule) == ("step", "cosine")
    assert v1.moco.queue_size == v2.moco.queue_size == 65536
    assert v1.moco.momentum == v2.moco.momentum == 0.999


def test_method_configs_set_the_switches_of_their_paper():
    switches = lambda c: (c.moco.momentum_scope, c.moco.negatives, c.moco.symmetric)
    assert switches(simclr.get_config()) == ("none", "both_views", True)
    assert switches(simclr_momentum.get_config()) == ("full", "both_views", True)
    assert switches(projector_momentum.get_config()) == ("projector", "both_views", True)
    v3 = moco_v3.get_config()
    assert switches(v3) == ("full", "batch", True)
    assert (v3.moco.loss_scale, v3.moco.momentum_schedule, v3.train.optimizer) == (2.0, "cosine", "lars")
    # The study's variants differ from the quickstart only in the method switches.
    base = fashion_mnist.get_config()
    for m in (simclr, simclr_momentum, projector_momentum):
        c = m.get_config("fashion_mnist")
        assert (c.data, c.train, c.model) == (base.data, base.train, base.model)


def test_a_queue_without_a_momentum_encoder_is_refused():
    c = config_lib.defaults()
    c.moco.momentum_scope = "none"
    with pytest.raises(config_lib.ConfigError, match="needs a momentum encoder"):
        config_lib.validate(c)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="runlocal"):
        moco_v2.get_config("tiny")


def test_unknown_key_is_named_with_a_suggestion():
    c = config_lib.defaults()
    c.train.batch_sze = 64
    with pytest.raises(config_lib.ConfigError, match=r"'train.batch_sze'.*Did you mean 'train.batch_size'"):
        config_lib.validate(c)


def test_queue_size_must_be_a_multiple_of_the_batch():
    c = config_lib.defaults()
    c.moco.queue_size, c.train.batch_size = 1000, 256
    with pytest.raises(config_lib.ConfigError, match=r"multiple of 'train.batch_size' \(256\).*try 768"):
        config_lib.validate(c)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("moco.temperature", 0.0, "must be > 0"),
        ("moco.momentum", 1.5, r"must be >= 0 and <= 1, got 1.5"),
        ("model.backbone", "vgg", "choose one of resnet18, resnet34, resnet50, small_cnn, vit_tiny"),
        ("train.epochs", "ten", "must be of type int"),
    ],
)
def test_bad_values_are_rejected(key, value, message):
    # Built from a dict, as a hand-written config file could be (ConfigDict would refuse a
    # wrongly typed assignment to a key that already holds a default).
    raw = config_lib.defaults().to_dict()
    section, name = key.split(".")
    raw[section][name] = value
    c = ml_collections.ConfigDict(raw)
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(c)


def test_values_are_cast_by_ml_collections_rules_and_new_keys_refused():
    # An int where the default is a float and a list where it is a tuple are accepted (as
    # ml_collections' type safety casts them); a key the defaults do not have is not.
    raw = config_lib.defaults().to_dict()
    raw["moco"]["temperature"], raw["data"]["crop_scale"] = 1, [0.3, 1.0]
    config_lib.validate(ml_collections.ConfigDict(raw))
    raw["data"]["crop_scales"] = (0.3, 1.0)
    with pytest.raises(config_lib.ConfigError, match=r"Unknown config key 'data.crop_scales'. "
                                                     r"Did you mean 'data.crop_scale'\?"):
        config_lib.validate(ml_collections.ConfigDict(raw))


def test_train_py_prints_one_line_and_exits_2_on_a_config_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "--config=configs/fashion_mnist.py:smoke",
         f"--workdir={tmp_path}", "--config.train.batch_size=60"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Config error: 'train.batch_size' (60) must be divisible by" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.listdir(tmp_path)  # stopped before anything was built or written
