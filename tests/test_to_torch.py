"""Export to PyTorch: torchvision ResNet-18/50 and detectron2 ResNets, timm ViTs; features equal
to the Keras backbone's, torch -> Keras -> torch round trips that give the same tensors back (but
BN's `num_batches_tracked`, which Keras has not), and the errors. The torch side runs in a child
process without TensorFlow (see test_convert.py)."""
import importlib.util
import json
import os
import pickle
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from moco_tf import export
from moco_tf.convert import to_torch, torch_moco
from moco_tf.convert.torch_moco import ConversionError
from moco_tf.models.backbones import build_backbone

TESTS = os.path.dirname(os.path.abspath(__file__))
TOLERANCE = 1e-4

# argv: out folder. Loads the exported files into the reference torch models (fc / head removed,
# strict=True), runs them on the saved images normalised as the .json says, saves the features
# and the loaded ResNet-18's state_dict; writes a random torchvision resnet18 state_dict (BN
# counters nonzero) and a random timm-named ViT state_dict for the round trips.
TORCH_SIDE = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from torch import nn
    try:
        from torchvision.models import resnet18, resnet50
    except ImportError:
        from torch_resnet import resnet18, resnet50
    from torch_vit import vit_tiny

    out = sys.argv[1]
    images = np.load(f"{out}/images.npy")

    def run(model, path):
        info = json.load(open(path + ".json"))
        x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
        mean = torch.tensor(info["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(info["std"]).view(1, 3, 1, 1)
        with torch.no_grad():
            return model((x - mean) / std).numpy()

    r18, r50 = resnet18(), resnet50()
    r18.fc, r50.fc = nn.Identity(), nn.Identity()
    r18.load_state_dict(torch.load(f"{out}/r18.pth"), strict=True)
    r50.load_state_dict(torch.load(f"{out}/r50.pth"), strict=True)
    vit = vit_tiny()
    vit.head = nn.Identity()
    vit.load_state_dict(torch.load(f"{out}/vit.pth")["model"], strict=True)
    r18.eval(), r50.eval(), vit.eval()
    np.savez(f"{out}/torch.npz", r18=run(r18, f"{out}/r18.pth"), r50=run(r50, f"{out}/r50.pth"),
             vit=run(vit.forward_features, f"{out}/vit.pth"))
    np.savez(f"{out}/r18_state.npz", **{k: v.numpy() for k, v in r18.state_dict().items()})

    torch.manual_seed(0)
    original = resnet18()
    with torch.no_grad():
        for i, m in enumerate(m for m in original.modules() if isinstance(m, nn.BatchNorm2d)):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.2)
            m.num_batches_tracked.fill_(5000 + i)  # as after training; Keras keeps no counter
    torch.save(original.state_dict(), f"{out}/original.pth")
    vit = vit_tiny()
    with torch.no_grad():
        for p in vit.parameters():
            if p.requires_grad:  # all but the fixed sin-cos position embedding
                p.normal_(0, 0.3)
    torch.save(vit.state_dict(), f"{out}/vit_original.pth")
""")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    if importlib.util.find_spec("torch") is None:
        pytest.skip('PyTorch not installed: pip install -e ".[convert]"')
    out = tmp_path_factory.mktemp("to_torch")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.save(out / "images.npy", images)
    models = {}
    for name, arch, kwargs in (("r18", "resnet18", {}), ("r50", "resnet50", {}),
                               ("vit", "vit_tiny", {"patch_size": 8})):
        backbone = build_backbone(arch, (32, 32, 3), mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25),
                                  **kwargs)
        for v in backbone.weights:  # BN statistics and norms far from their defaults
            if any(k in v.name for k in ("moving_mean", "beta")):
                v.assign(rng.normal(0, 0.2, v.shape).astype("float32"))
            elif any(k in v.name for k in ("moving_variance", "gamma")):
                # The last BN of a bottleneck smaller, as trained: ResNet-50's features stay O(1).
                scale = 0.3 if v.path.endswith("bn3/gamma") else 1.0
                v.assign(scale * rng.uniform(0.5, 1.5, v.shape).astype("float32"))
        if name == "r50":  # to_torch reads only backbone.keras: skip the SavedModel's cost
            os.makedirs(out / "r50_export")
            export.plain_keras(backbone).save(str(out / "r50_export" / export.KERAS_FILE))
        else:
            export.export_backbone(backbone, str(out / f"{name}_export"), image_shape=(32, 32, 3))
        models[name] = backbone
    to_torch.convert(str(out / "r18_export"), str(out / "r18.pth"), "torchvision")
    to_torch.convert(str(out / "r50_export"), str(out / "r50.pth"), "torchvision")
    to_torch.convert(str(out / "r18_export"), str(out / "r18.pkl"), "detectron2")
    to_torch.convert(str(out / "vit_export"), str(out / "vit.pth"), "timm")
    proc = subprocess.run([sys.executable, "-c", TORCH_SIDE, str(out)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": TESTS})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, models, images


def test_torchvision_and_timm_exports_give_the_keras_features(exported):
    out, models, images = exported
    torch_features = np.load(out / "torch.npz")
    for name in ("r18", "r50", "vit"):
        expected = models[name](images.astype(np.float32) / 255.0, training=False).numpy()
        assert np.abs(torch_features[name] - expected).max() <= TOLERANCE, name
    assert torch_features["r50"].shape == (2, 2048)
    info = json.load(open(out / "r18.pth.json"))
    assert info["arch"] == "resnet18" and info["mean"] == [0.4, 0.5, 0.6]
    assert info["std"] == [0.2, 0.3, 0.25]


def test_detectron2_export_has_the_official_scripts_names_and_values(exported):
    out, models, _ = exported
    with open(out / "r18.pkl", "rb") as f:
        obj = pickle.load(f)
    assert obj["__author__"] == "MOCO" and obj["matching_heuristics"] is True
    model = obj["model"]
    backbone = models["r18"]
    np.testing.assert_array_equal(  # conv1 -> stem.conv1, [kh, kw, in, out] -> [out, in, kh, kw]
        model["stem.conv1.weight"], backbone.get_layer("conv1").kernel.numpy().transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(model["stem.conv1.norm.running_var"],
                                  backbone.get_layer("bn1").moving_variance.numpy())
    np.testing.assert_array_equal(model["res3.0.shortcut.norm.weight"],
                                  backbone.get_layer("layer2.0.downsample.1").gamma.numpy())
    assert "res5.1.conv2.norm.bias" in model and not any("layer" in k for k in model)
    assert not any(k.endswith("num_batches_tracked") for k in model)


def _detectron2_key(key):
    """facebookresearch/moco `detection/convert-pretrain-to-detectron2.py`'s renaming of a
    torchvision key, restated: keys outside the stages go under `stem.`; stage t is `res{t+1}`;
    BN i becomes the norm of conv i; the projection shortcut's conv and BN are `shortcut` and
    `shortcut.norm`."""
    if "layer" not in key:
        key = "stem." + key
    key = re.sub(r"layer([1-4])", lambda m: f"res{int(m.group(1)) + 1}", key)
    key = re.sub(r"\bbn([1-3])\b", r"conv\1.norm", key)
    return re.sub(r"downsample\.([01])", lambda m: ("shortcut", "shortcut.norm")[int(m.group(1))],
                  key)


def test_detectron2_export_is_the_official_renaming_of_the_torchvision_state_dict(exported):
    out, _, _ = exported
    torchvision_state = dict(np.load(out / "r18_state.npz"))  # after strict loading of r18.pth
    with open(out / "r18.pkl", "rb") as f:
        model = pickle.load(f)["model"]
    # The official script would also copy the num_batches_tracked counters; they are left out.
    expected = {_detectron2_key(k): v for k, v in torchvision_state.items()
                if not k.endswith("num_batches_tracked")}
    assert sorted(model) == sorted(expected)
    assert len(model) == 100  # ResNet-18: 20 convs + 20 BNs x 4 tensors
    for key, value in expected.items():
        np.testing.assert_array_equal(model[key], value, err_msg=key)


def test_torch_to_keras_to_torch_gives_back_the_same_tensors(exported, tmp_path):
    import torch

    out, _, _ = exported
    original = torch.load(out / "original.pth")
    torch_moco.convert(str(out / "original.pth"), str(tmp_path / "export"), image_size=32)
    to_torch.convert(str(tmp_path / "export"), str(tmp_path / "back.pth"), "torchvision")
    back = torch.load(tmp_path / "back.pth")
    assert sorted(back) == sorted(k for k in original if not k.startswith("fc."))
    counters = [k for k in back if k.endswith("num_batches_tracked")]
    assert len(counters) == 20
    for key, value in back.items():
        if key in counters:  # Keras BN keeps no counter: written as 0 (to_torch's docstring)
            assert original[key].item() >= 5000 and value.item() == 0, key
            assert value.dtype == original[key].dtype and value.shape == original[key].shape
        else:
            assert torch.equal(value, original[key]), key


def test_vit_torch_to_keras_to_timm_gives_back_the_same_tensors(exported, tmp_path):
    import torch

    out, _, _ = exported
    original = torch.load(out / "vit_original.pth")
    result = torch_moco.convert(str(out / "vit_original.pth"), str(tmp_path / "export"),
                                image_size=32)
    assert (result["info"]["layout"], result["info"]["arch"]) == ("timm", "vit_tiny")
    to_torch.convert(str(tmp_path / "export"), str(tmp_path / "back.pth"), "timm")
    back = torch.load(tmp_path / "back.pth")["model"]
    assert sorted(back) == sorted(k for k in original if not k.startswith("head."))
    for key, value in back.items():
        assert torch.equal(value, original[key]), key


def test_export_errors_say_what_is_wrong(exported, tmp_path, capsys):
    out, _, _ = exported
    with pytest.raises(ConversionError, match="--format=timm takes a ViT; the export holds a "
                                              "resnet18"):
        to_torch.convert(str(out / "r18_export"), str(tmp_path / "x.pth"), "timm")
    with pytest.raises(ConversionError, match="--format=torchvision takes a ResNet"):
        to_torch.convert(str(out / "vit_export"), str(tmp_path / "x.pth"), "torchvision")
    with pytest.raises(ConversionError, match="is not an export folder"):
        to_torch.convert(str(tmp_path / "nowhere"), str(tmp_path / "x.pth"))
    with pytest.raises(ConversionError, match="exists; pass --force"):
        to_torch.convert(str(out / "r18_export"), str(out / "r18.pth"))
    missing = tmp_path / "no_such_folder" / "x.pth"
    with pytest.raises(ConversionError, match=f"the folder {re.escape(str(missing.parent))} "
                                              f"does not exist; create it first"):
        to_torch.convert(str(out / "r18_export"), str(missing))
    for force in (False, True):
        with pytest.raises(ConversionError, match="is a directory; --out takes the path of the "
                                                  "file to write"):
            to_torch.convert(str(out / "r18_export"), str(tmp_path), force=force)
    small = build_backbone("small_cnn", (16, 16, 3))
    export.export_backbone(small, str(tmp_path / "small"), image_shape=(16, 16, 3))
    with pytest.raises(ConversionError, match="neither a ResNet nor a ViT"):
        to_torch.convert(str(tmp_path / "small"), str(tmp_path / "s.pth"))
    narrow = build_backbone("resnet18", (16, 16, 3), cifar_stem=True, width=16)
    export.export_backbone(narrow, str(tmp_path / "narrow"), image_shape=(16, 16, 3))
    with pytest.raises(ConversionError, match="width 16 with a 3x3 stem"):
        to_torch.convert(str(tmp_path / "narrow"), str(tmp_path / "n.pth"))
    # The command line: one line, exit 2.
    assert to_torch.main(["--export", str(tmp_path / "small"), "--out",
                          str(tmp_path / "s.pth")]) == 2
    assert "error: The export holds a" in capsys.readouterr().err
    assert to_torch.main(["--export", str(out / "r18_export"), "--out", str(missing)]) == 2
    assert to_torch.main(["--export", str(out / "r18_export"), "--out", str(tmp_path),
                          "--force"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("error: --out=") for line in err)
    assert to_torch.main(["--export", str(out / "r18_export"), "--out", str(tmp_path / "ok.pth"),
                          "--format", "detectron2"]) == 0
    assert "Normalise RGB in [0, 1] with mean=[0.4, 0.5, 0.6]" in capsys.readouterr().out
