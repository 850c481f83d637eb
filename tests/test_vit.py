"""MoCo v3 with a Vision Transformer: the ViT's pieces and predictor, training in float32,
bfloat16 and float16 with XLA, the config variants, export and linear evaluation (the PyTorch
equality is in test_convert/test_to_torch)."""
import os
import sys

import keras
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import moco_v3  # noqa: E402
from moco_tf import data, export, train_lib  # noqa: E402
from moco_tf.eval import linear  # noqa: E402
from moco_tf.models import heads, vit  # noqa: E402


def test_vit_pieces():
    model = vit.build_vit("vit_tiny", (32, 32, 3), patch_size=8)
    assert model.output_shape == (None, 64)
    # moco-v3: the patch projection stays at its random init; the position embedding is fixed.
    trainable = {w.path for w in model.trainable_weights}
    assert not any(p.startswith("patch_embed.proj") or p.endswith("pos_embed") for p in trainable)
    assert "embed/cls_token" in trainable
    # The class token's features: a different image in one slot changes only its own row.
    x = np.random.default_rng(0).uniform(size=(3, 32, 32, 3)).astype("float32")
    y = x.copy()
    y[1] = 1.0 - y[1]
    a, b = model(x).numpy(), model(y).numpy()
    np.testing.assert_allclose(a[[0, 2]], b[[0, 2]], atol=1e-5)
    assert np.abs(a[1] - b[1]).max() > 1e-3
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        vit.build_vit("vit_tiny", (30, 30, 3), patch_size=8)
    table = vit.sincos_position_embedding(2, 2, 8)
    assert table.shape == (5, 8) and not table[0].any()  # row 0: the class token


def test_the_vit_predictor_ends_with_an_affine_free_bn():
    # moco-v3 MoCo_ViT: predictor = _build_mlp(2, dim, mlp_dim, dim), last_bn=True:
    # Linear-BN-ReLU-Linear-BN(affine=False), no biases; index i = its nn.Sequential index.
    predictor = heads.build_predictor(8, 8, 16, last_bn=True)
    layers = predictor.layers[1:]
    assert [(layer.name, type(layer).__name__) for layer in layers] == [
        ("predictor.0", "Dense"), ("predictor.1", "SplitBatchNorm"), ("predictor.2", "ReLU"),
        ("predictor.3", "Dense"), ("predictor.4", "SplitBatchNorm")]
    assert not any(layer.use_bias for layer in layers if isinstance(layer, keras.layers.Dense))
    assert not layers[-1].center and not layers[-1].scale
    assert {w.name for w in layers[-1].weights} == {"moving_mean", "moving_variance"}
    x = np.random.default_rng(0).normal(2.0, 3.0, (32, 8)).astype("float32")
    out = predictor(x, training=True).numpy()
    np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-4)  # standardised per feature
    # The default is MoCo_ResNet's predictor: it stops at the last Linear.
    assert type(heads.build_predictor(8, 8, 16).layers[-1]).__name__ == "Dense"


def test_the_vit_recipe_is_the_papers():
    for variant, arch in (("vit_small", "vit_small"), ("vit_base", "vit_base")):
        c = moco_v3.get_config(variant)
        assert c.model.backbone == arch and c.model.projector_layers == 3
        assert (c.train.optimizer, c.train.base_learning_rate, c.train.weight_decay) == (
            "adamw", 1.5e-4, 0.1)
        assert (c.train.warmup_epochs, c.train.epochs, c.train.batch_size) == (40, 300, 4096)
        assert c.moco.temperature == 0.2 and c.moco.loss_scale == pytest.approx(0.4)
        assert tuple(c.data.crop_scale) == (0.08, 1.0) and c.precision == "auto"  # AMP there
        assert c.model.predictor_last_bn and not c.model.zero_init_residual
    # ResNet-50, 300 epochs (CONFIG.md over main_moco.py's defaults).
    r50 = moco_v3.get_config("")
    assert r50.model.projector_layers == 2  # builder.py: 2 for ResNets
    assert (r50.train.optimizer, r50.train.base_learning_rate, r50.train.weight_decay) == (
        "lars", 0.3, 1e-6)
    assert (r50.train.warmup_epochs, r50.train.epochs, r50.train.batch_size) == (10, 300, 4096)
    assert tuple(r50.data.crop_scale) == (0.2, 1.0) and r50.moco.temperature == 1.0
    assert (r50.moco.momentum, r50.moco.momentum_schedule, r50.moco.dim) == (0.99, "cosine", 256)
    assert r50.model.zero_init_residual and not r50.model.predictor_last_bn  # MoCo_ResNet
    assert moco_v3.get_config("vit_runlocal").precision == "float32"
    model = train_lib.build_model(moco_v3.get_config("vit_runlocal"))
    assert type(model.predictor.layers[-1]).__name__ == "SplitBatchNorm"  # MoCo_ViT's last BN
    optimizer = model.optimizer
    assert isinstance(optimizer, keras.optimizers.AdamW) and optimizer.epsilon == 1e-8


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_vit_moco_v3_trains_and_exports(precision, tmp_path):
    c = moco_v3.get_config("vit_runlocal")
    c.precision = precision
    c.train.verbose, c.eval.knn_every_epochs = 0, 1
    model, results = train_lib.train_and_evaluate(c, str(tmp_path))
    assert np.isfinite(results["final_loss"]) and 0.0 <= results["knn_top1"] <= 1.0
    backbone = export.load_backbone(results["export_dir"])
    images, _ = next(iter(data.eval_dataset(c.data, batch_size=4)))
    expected = model.backbone(images, training=False).numpy().astype("float32")
    # bfloat16: the export's attention (Keras MultiHeadAttention) rounds at other points than the
    # fused qkv. On a CPU that emulates bfloat16 the features differed by 0.031 at |x| < 2: four
    # of bfloat16's steps there (2^-7). Allowed: 16 rounding units (2^-8) of the largest feature,
    # twice that; a wrong weight is off by O(1).
    tol = 16 * 2.0**-8 * np.abs(expected).max() if precision != "float32" else 1e-5
    np.testing.assert_allclose(backbone(images), expected, atol=tol)
    if precision == "float32":  # linear evaluation takes the ViT's export as a ResNet's
        probe = linear.evaluate(results["export_dir"], c, epochs=2, batch_size=16,
                                learning_rate=3.0, normalize="none")
        assert probe["feature_dim"] == 64 and 0.0 <= probe["top1"] <= 1.0
        assert os.path.isfile(probe["output"])


@pytest.mark.slow
def test_vit_trains_in_float16_with_xla(tmp_path):
    # mixed_float16 (the official runs' AMP) with loss scaling, and jit_compile, on one device.
    c = moco_v3.get_config("vit_runlocal")
    c.precision, c.train.jit_compile = "mixed_float16", True
    c.train.verbose, c.eval.knn_every_epochs, c.eval.export = 0, 0, False
    model, results = train_lib.train_and_evaluate(c, str(tmp_path))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.backbone.get_layer("blocks.0.attn").compute_dtype == "float16"
    assert results["steps"] == 2 and np.isfinite(results["final_loss"])
    assert all(np.isfinite(np.asarray(w, np.float32)).all() for w in model.backbone.weights)
