"""Official PyTorch MoCo checkpoints -> Keras: features equal to torchvision's, exports, errors.

The reference models are torchvision's ResNets (or, without torchvision, `tests/torch_resnet.py`,
the same modules and forward in plain PyTorch), built in a child process that never loads
TensorFlow: `import triton` (torchvision pulls it in) crashes a process holding TensorFlow >= 2.20
(tensorflow/tensorflow#124205). The converter itself only calls `torch.load`, which is safe.
Needs PyTorch (`pip install -e ".[convert]"`); without it the tests are skipped.
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from moco_tf import export
from moco_tf.convert import torch_moco
from moco_tf.convert.torch_moco import ConversionError, convert

SKIP = 'PyTorch not installed: pip install -e ".[convert]"'
TOLERANCE = 1e-4  # max abs error of the pooled features (channels-last vs channels-first)

# Writes <out>/<name>.pth.tar checkpoints in the official layouts and <out>/<name>.npz with the
# images (uint8 [B, S, S, 3]) and torchvision's outputs on them in eval mode.
TORCH_SCRIPT = textwrap.dedent(
    """
    import argparse, sys
    import numpy as np, torch
    from torch import nn
    try:
        from torchvision.models import resnet18, resnet50
    except ImportError:  # the same architecture in plain torch (tests/torch_resnet.py)
        from torch_resnet import resnet18, resnet50

    out = sys.argv[1]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def randomize_bn(model, last_bn):
        # Random statistics and affine parameters in every BN, so a wrong or missing mapping of
        # any of them changes the output. The last BN of each residual branch gets a smaller
        # gamma, as trained ResNets have: it keeps the features O(1), as real ones are.
        with torch.no_grad():
            for name, m in model.named_modules():
                if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                    c = m.num_features
                    m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                    m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                    if m.affine:
                        scale = 0.3 if name.startswith("layer") and name.endswith(last_bn) else 1.0
                        m.weight.copy_((torch.rand(c, generator=g) + 0.5) * scale)
                        m.bias.copy_(torch.randn(c, generator=g) * 0.2)
        return model.eval()

    def run(model, images):
        x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)  # NHWC->NCHW
        with torch.no_grad():
            return model((x - MEAN) / STD).numpy()

    def features(model, images):
        head, model.fc = model.fc, nn.Identity()
        f = run(model, images)
        model.fc = head
        return f

    def mlp_v3(dim_in, hidden, dim, last_bn=True):  # moco-v3 builder._build_mlp(2, ...)
        layers = [nn.Linear(dim_in, hidden, bias=False), nn.BatchNorm1d(hidden),
                  nn.ReLU(inplace=True), nn.Linear(hidden, dim, bias=False)]
        return nn.Sequential(*layers, *([nn.BatchNorm1d(dim, affine=False)] if last_bn else []))

    def predicted(predictor, dim):  # the predictor's eval-mode output on random inputs
        z = torch.randn(2, dim, generator=g)
        with torch.no_grad():
            return {"predictor_input": z.numpy(), "prediction": predictor(z).numpy()}

    def prefixed(prefix, state_dict, scale=1.0):
        return {prefix + k: (v * scale if v.is_floating_point() else v) for k, v in state_dict.items()}

    def save(name, checkpoint, images, **outputs):
        torch.save(checkpoint, f"{out}/{name}.pth.tar")
        np.savez(f"{out}/{name}.npz", images=images, **outputs)

    def images(size, seed):
        return np.random.default_rng(seed).integers(0, 256, (2, size, size, 3), dtype=np.uint8)

    optimizer = {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0, 1]}]}

    # MoCo v2 (main_moco.py --mlp): fc = Linear(2048, 2048) - ReLU - Linear(2048, 128), and the
    # queue (the key encoder is left out here to keep the file small; see r18_v1).
    r50 = randomize_bn(resnet50(), "bn3")
    r50.fc = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 128))
    x = images(64, 0)
    sd = r50.state_dict()
    state = {**prefixed("module.encoder_q.", sd),
             "module.queue": torch.randn(128, 16), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    save("r50_v2", {"epoch": 800, "arch": "resnet50", "state_dict": state, "optimizer": optimizer},
         x, features=features(r50, x), projection=run(r50, x))

    r18 = randomize_bn(resnet18(), "bn2")
    x = images(32, 1)
    f18 = features(r18, x)
    # MoCo v1: fc = Linear(512, 128); the key encoder beside it (scaled, so loading it instead of
    # the query encoder fails).
    r18.fc = nn.Linear(512, 128)
    query = prefixed("module.encoder_q.", r18.state_dict())
    state = {**query, **prefixed("module.encoder_k.", r18.state_dict(), 1.1)}
    save("r18_v1", {"epoch": 200, "arch": "resnet18", "state_dict": state}, x, features=f18,
         projection=run(r18, x))
    # A pickled argparse.Namespace beside the weights, as some training scripts save.
    torch.save({"state_dict": query, "args": argparse.Namespace(lr=0.03)}, f"{out}/r18_args.pth.tar")
    # One key missing, one unexpected.
    broken = dict(query)
    del broken["module.encoder_q.layer2.1.bn1.running_var"]
    broken["module.encoder_q.layer5.0.conv1.weight"] = torch.zeros(3)
    torch.save({"state_dict": broken}, f"{out}/r18_broken.pth.tar")

    # MoCo v3 (moco-v3 builder.py): base_encoder with a BN MLP as fc, and the predictor, which
    # MoCo_ResNet builds without the last BN (the momentum encoder is left out to keep the file
    # small).
    r18.fc = randomize_bn(mlp_v3(512, 64, 32), "none")
    predictor = randomize_bn(mlp_v3(32, 64, 32, last_bn=False), "none")
    state = {**prefixed("module.base_encoder.", r18.state_dict()),
             **prefixed("module.predictor.", predictor.state_dict())}
    save("r18_v3", {"epoch": 300, "arch": "resnet18", "state_dict": state, "scaler": {"scale": 1.0}},
         x, features=f18, projection=run(r18, x), **predicted(predictor, 32))

    # A plain torchvision state_dict (ImageNet classifier head, no prefix).
    r18.fc = nn.Linear(512, 1000)
    torch.save(r18.state_dict(), f"{out}/r18_plain.pth")

    # A MoCo v3 ViT (moco-v3 vits.py on timm's VisionTransformer; tests/torch_vit.py), tiny:
    # width 64, 2 blocks, 8 px patches of 32 px images; head = the 3-layer BN projector.
    from torch_vit import vit_tiny
    vit = vit_tiny()
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if p.requires_grad:  # everything but the fixed position embedding
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim > 1 else 0.2)
                        + (1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight")
                           or name == "norm.weight" else 0.0))
    vit.head = nn.Sequential(nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
                             nn.Linear(32, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
                             nn.Linear(32, 16, bias=False), nn.BatchNorm1d(16, affine=False))
    randomize_bn(vit.head, "none")
    vit.eval()
    x = images(32, 2)
    def vit_run(f):
        t = torch.from_numpy(x.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
        with torch.no_grad():
            return f((t - MEAN) / STD).numpy()
    # MoCo_ViT's predictor ends with a BN without affine: its running statistics matter.
    predictor = randomize_bn(mlp_v3(16, 32, 16), "none")
    state = {**prefixed("module.base_encoder.", vit.state_dict()),
             **prefixed("module.predictor.", predictor.state_dict())}
    save("vit_v3", {"epoch": 300, "arch": "vit_small", "state_dict": state}, x,
         features=vit_run(vit.forward_features), projection=vit_run(vit),
         pos_embed=vit.pos_embed.detach().numpy(), **predicted(predictor, 16))
    """
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Folder of the checkpoints and references; `ckpt / "r50_v2.pth.tar"` etc."""
    if importlib.util.find_spec("torch") is None:  # not imported here: see the docstring
        pytest.skip(SKIP)
    out = tmp_path_factory.mktemp("torch_checkpoints")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.abspath(__file__))}
    result = subprocess.run([sys.executable, "-c", TORCH_SCRIPT, str(out)], capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _refs(ckpt, name):
    refs = np.load(ckpt / f"{name}.npz")
    return refs["images"], refs["features"], refs["projection"]


def _max_error(model, images, expected):
    out = np.asarray(model(images.astype(np.float32) / 255.0, training=False))
    assert out.shape == expected.shape
    return float(np.abs(out - expected).max())


# --- numerical equality ---------------------------------------------------------------------------


def test_moco_v2_resnet50_matches_torchvision(ckpt):
    images, features, projection = _refs(ckpt, "r50_v2")
    result = convert(str(ckpt / "r50_v2.pth.tar"), None, projector=True, image_size=64)
    info = result["info"]
    assert (info["layout"], info["arch"], info["epoch"], info["feature_dim"]) == (
        "moco_v1/v2", "resnet50", 800, 2048)
    assert _max_error(result["backbone"], images, features) <= TOLERANCE
    # The projector on top: fc.0 - ReLU - fc.2.
    projected = result["projector"](result["backbone"](images.astype(np.float32) / 255.0))
    assert np.abs(np.asarray(projected) - projection).max() <= TOLERANCE


def test_moco_v1_resnet18_matches_torchvision(ckpt):
    images, features, projection = _refs(ckpt, "r18_v1")
    result = convert(str(ckpt / "r18_v1.pth.tar"), None, projector=True, image_size=32)
    assert result["info"]["arch"] == "resnet18"
    assert _max_error(result["backbone"], images, features) <= TOLERANCE
    projected = result["projector"](result["backbone"](images.astype(np.float32) / 255.0))
    assert np.abs(np.asarray(projected) - projection).max() <= TOLERANCE
    # Normalisation inside the model, with the official ImageNet constants.
    normalize = result["backbone"].get_layer("normalize")
    assert np.allclose(normalize.mean, torch_moco.IMAGENET_MEAN)
    assert np.allclose(normalize.std, torch_moco.IMAGENET_STD)


def test_moco_v3_layout_with_bn_projector(ckpt):
    images, features, projection = _refs(ckpt, "r18_v3")
    result = convert(str(ckpt / "r18_v3.pth.tar"), None, projector=True, image_size=32)
    assert (result["info"]["layout"], result["info"]["prefix"]) == ("moco_v3", "module.base_encoder.")
    assert _max_error(result["backbone"], images, features) <= TOLERANCE
    # fc.0 (no bias) - BN - ReLU - fc.3 - BN without affine, all in inference mode.
    head = result["projector"]
    assert [type(layer).__name__ for layer in head.layers[1:]] == [
        "Dense", "SplitBatchNorm", "ReLU", "Dense", "SplitBatchNorm"]
    projected = head(result["backbone"](images.astype(np.float32) / 255.0), training=False)
    assert np.abs(np.asarray(projected) - projection).max() <= TOLERANCE
    # MoCo_ResNet's predictor: no BN on its output.
    result = convert(str(ckpt / "r18_v3.pth.tar"), None, predictor=True, image_size=32)
    assert [type(layer).__name__ for layer in result["predictor"].layers[1:]] == [
        "Dense", "SplitBatchNorm", "ReLU", "Dense"]
    assert result["info"]["predictor"] == [32]
    _assert_predicts_as_torch(result["predictor"], np.load(ckpt / "r18_v3.npz"))


def _assert_predicts_as_torch(predictor, refs):
    out = predictor(refs["predictor_input"], training=False)
    assert float(np.abs(np.asarray(out) - refs["prediction"]).max()) <= TOLERANCE


def test_plain_torchvision_state_dict(ckpt):
    images, features, _ = _refs(ckpt, "r18_v1")  # the same ResNet-18 body
    result = convert(str(ckpt / "r18_plain.pth"), None, image_size=32)
    assert (result["info"]["layout"], result["info"]["epoch"]) == ("torchvision", None)
    assert _max_error(result["backbone"], images, features) <= TOLERANCE


def test_cli_export_loads_and_serves_the_same_features(ckpt, tmp_path):
    images, features, projection = _refs(ckpt, "r18_v3")
    out = tmp_path / "export"
    result = subprocess.run(
        [sys.executable, "-m", "moco_tf.convert.torch_moco",
         f"--checkpoint={ckpt / 'r18_v3.pth.tar'}", f"--out={out}", "--projector", "--image_size=32"],
        capture_output=True, text=True, timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),  # `-m` finds moco_tf
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Converted moco_v3 resnet18" in result.stdout
    # What linear eval / kNN / fine-tuning load: the .keras backbone.
    backbone = export.load_backbone(str(out))
    assert _max_error(backbone, images, features) <= TOLERANCE
    # The SavedModel's uint8 serving signature.
    served = np.asarray(export.load_serving(str(out))(images))
    assert np.abs(served - features).max() <= TOLERANCE
    head = keras.saving.load_model(str(out / torch_moco.PROJECTOR_FILE), compile=False)
    projected = head(backbone(images.astype(np.float32) / 255.0), training=False)
    assert np.abs(np.asarray(projected) - projection).max() <= TOLERANCE
    info = json.loads((out / torch_moco.INFO_FILE).read_text())
    assert (info["arch"], info["epoch"], info["image_size"]) == ("resnet18", 300, 32)


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"hello, I am a text file\n", bytes(range(7, 256)) * 4],
                         ids=["text", "random_bytes"])
def test_not_a_torch_checkpoint(tmp_path, content):
    path = tmp_path / "model.pth.tar"
    path.write_bytes(content)
    with pytest.raises(ConversionError, match="is not a PyTorch checkpoint"):
        convert(str(path), None)


def test_corrupt_zip_is_not_a_checkpoint(ckpt, tmp_path):
    pytest.importorskip("torch", reason=SKIP)
    path = tmp_path / "truncated.pth.tar"
    path.write_bytes((ckpt / "r18_v1.pth.tar").read_bytes()[:5000])
    with pytest.raises(ConversionError, match="not a PyTorch checkpoint"):
        convert(str(path), None)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint file"):
        convert(str(tmp_path / "nothing.pth.tar"), None)


def test_architecture_mismatch_lists_keys(ckpt):
    with pytest.raises(ConversionError, match="Architecture mismatch") as error:
        convert(str(ckpt / "r18_broken.pth.tar"), None, image_size=32)
    message = str(error.value)
    assert "1 missing keys: layer2.1.bn1.running_var" in message
    assert "1 unexpected keys: layer5.0.conv1.weight" in message
    # A ResNet-50 checkpoint loaded as a ResNet-18: Bottleneck keys left over, 1x1 vs 3x3 convs.
    with pytest.raises(ConversionError, match="unexpected keys: layer1.0.conv3.weight") as error:
        convert(str(ckpt / "r50_v2.pth.tar"), None, arch="resnet18", image_size=32)
    message = str(error.value)
    assert "layer1.0.conv1.weight: checkpoint (64, 64, 1, 1) vs model (64, 64, 3, 3)" in message
    assert "The checkpoint holds a resnet50" in message


def test_moco_v3_vit_matches_the_timm_reference(ckpt):
    from moco_tf.models.vit import sincos_position_embedding

    images, features, projection = _refs(ckpt, "vit_v3")
    result = convert(str(ckpt / "vit_v3.pth.tar"), None, image_size=32, projector=True)
    assert result["info"]["arch"] == "vit_tiny" and result["info"]["layout"] == "moco_v3"
    assert _max_error(result["backbone"], images, features) <= TOLERANCE
    z = result["projector"](result["backbone"](images.astype(np.float32) / 255.0), training=False)
    assert float(np.abs(np.asarray(z) - projection).max()) <= TOLERANCE
    # Our fixed 2-D sin-cos embedding is moco-v3's, quirk included.
    np.testing.assert_allclose(sincos_position_embedding(4, 4, 64),
                               np.load(ckpt / "vit_v3.npz")["pos_embed"][0], atol=1e-6)
    with pytest.raises(ConversionError, match="pass --image_size=32"):
        convert(str(ckpt / "vit_v3.pth.tar"), None, image_size=64)


def test_moco_v3_vit_predictor_keeps_its_last_bn(ckpt):
    # MoCo_ViT builds its predictor with _build_mlp(2, dim, mlp_dim, dim): last_bn=True.
    result = convert(str(ckpt / "vit_v3.pth.tar"), None, predictor=True, image_size=32)
    predictor = result["predictor"]
    assert [type(layer).__name__ for layer in predictor.layers[1:]] == [
        "Dense", "SplitBatchNorm", "ReLU", "Dense", "SplitBatchNorm"]
    last = predictor.get_layer("predictor.4")
    assert not last.center and not last.scale
    refs = np.load(ckpt / "vit_v3.npz")
    _assert_predicts_as_torch(predictor, refs)
    # The running statistics were loaded, not left at 0 / 1 (randomize_bn set them).
    assert np.abs(np.asarray(last.moving_mean)).max() > 0.01
    assert np.abs(np.asarray(last.moving_variance) - 1).max() > 0.01


def test_arch_of_another_family_or_size_names_what_the_checkpoint_holds(ckpt):
    with pytest.raises(ConversionError, match=r"--arch=vit_small, but the checkpoint holds a "
                                              r"vit_tiny \(ViT of width 64, 2 blocks, 8 px"):
        convert(str(ckpt / "vit_v3.pth.tar"), None, arch="vit_small", image_size=32)
    with pytest.raises(ConversionError, match=r"--arch=vit_small, but the checkpoint holds a "
                                              r"ResNet \(resnet18\)"):
        convert(str(ckpt / "r18_v1.pth.tar"), None, arch="vit_small", image_size=32)
    with pytest.raises(ConversionError, match="has no predictor"):
        convert(str(ckpt / "r18_v1.pth.tar"), None, predictor=True, image_size=32)


def test_cli_input_errors_are_one_line_and_exit_2(ckpt, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "moco_tf.convert.torch_moco", "--arch=resnet50",
         f"--checkpoint={ckpt / 'vit_v3.pth.tar'}", f"--out={tmp_path / 'export'}"],
        capture_output=True, text=True, timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --arch=resnet50, but the checkpoint holds a vit_tiny (ViT of width "
                      "64, 2 blocks, 8 px patches): pass --arch=vit_tiny or leave --arch out."]
    assert "Traceback" not in result.stderr and not (tmp_path / "export").exists()


def test_pickled_objects_need_allow_pickle(ckpt):
    with pytest.raises(ConversionError, match="--allow_pickle.*argparse.Namespace"):
        convert(str(ckpt / "r18_args.pth.tar"), None, image_size=32)
    images, features, _ = _refs(ckpt, "r18_v1")
    result = convert(str(ckpt / "r18_args.pth.tar"), None, image_size=32, allow_pickle=True)
    assert _max_error(result["backbone"], images, features) <= TOLERANCE


def test_missing_torch_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "model.pth"
    path.write_bytes(b"\x80\x02")  # a pickle header: reaches the torch import
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "moco-tf\[convert\]"'):
        convert(str(path), None)
