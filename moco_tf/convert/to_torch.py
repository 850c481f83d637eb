"""Export a trained backbone to PyTorch: torchvision, detectron2 or timm/DeiT.

  python -m moco_tf.convert.to_torch --export=runs/v2/export --out=r50.pth --format=torchvision
  python -m moco_tf.convert.to_torch --export=runs/v2/export --out=r50.pkl --format=detectron2
  python -m moco_tf.convert.to_torch --export=runs/v3/export --out=vit.pth --format=timm

- `torchvision`: a ResNet `state_dict` (`torch.save`) that loads with `strict=True` into
  `torchvision.models.resnet50()` / `resnet18()` once `fc` is replaced by `nn.Identity()`.
  Every BN's `num_batches_tracked` is written as 0: Keras' BN keeps no such counter, and
  PyTorch reads it only for BN with `momentum=None` (a cumulative average of the statistics),
  not at torch's default momentum 0.1, nor in eval mode. A torch -> Keras -> torch round trip
  therefore gives every tensor back bit for bit except these counters, which come back as 0.
- `detectron2`: the pickle facebookresearch/moco's `detection/convert-pretrain-to-detectron2.py`
  writes (`{"model": {name: ndarray}, "__author__": "MOCO", "matching_heuristics": True}`, the
  keys renamed by its rules to detectron2's: `stem.conv1.norm.weight`, `res2.0.conv1.weight`,
  ...), for `MODEL.WEIGHTS` with the MoCo detection configs (which use ImageNet's mean/std). One
  difference: the official script also copies the `num_batches_tracked` counters (and `fc`);
  they are left out, as detectron2's frozen BN has no such buffer and ours would be 0.
- `timm`: a ViT `state_dict` in timm's names, wrapped as moco-v3's `convert_to_deit.py` does
  (`{"model": state_dict}`), for DeiT / timm's `VisionTransformer` (without `head`).

The models normalise their input inside; PyTorch models get normalised images, so the exporter
prints (and writes next to the file, `<out>.json`) the mean and std to normalise with. Exporting
needs PyTorch for the torchvision and timm formats (`torch.save`); detectron2's is a plain pickle.
"""
from __future__ import annotations

import json
import os
import pickle
import sys

if __name__ == "__main__":  # before TensorFlow is imported: without its C++ start-up lines
    from moco_tf import cli

    cli.import_tensorflow()

import numpy as np  # noqa: E402

from moco_tf.convert import names  # noqa: E402
from moco_tf.convert.torch_moco import ConversionError, infer_arch, infer_vit  # noqa: E402

FORMATS = ("torchvision", "detectron2", "timm")


def export_state_dict(backbone) -> tuple[str, dict, dict]:
    """(architecture, {torch key: ndarray}, normalisation) of an exported backbone.

    Raises ConversionError for a backbone that is neither a torchvision-layout ResNet nor a timm
    ViT (a small CNN), or a ResNet with no torchvision counterpart (another width or the CIFAR
    stem, which torchvision's constructors do not build).
    """
    state = names.state_dict(backbone)
    norm = _normalisation(backbone)
    if "cls_token" in state:
        arch, _ = infer_vit(state)
        return arch, state, norm
    if "conv1.weight" not in state or "layer1.0.conv1.weight" not in state:
        raise ConversionError(
            f"The export holds a {backbone.name!r}, which is neither a ResNet nor a ViT: it has no "
            f"torchvision or timm counterpart.")
    arch = infer_arch(state)
    conv1 = state["conv1.weight"]
    if conv1.shape[0] != 64 or conv1.shape[-1] != 7:
        raise ConversionError(
            f"The export holds a {arch} of width {conv1.shape[0]} with a {conv1.shape[-1]}x"
            f"{conv1.shape[-1]} stem; torchvision's {arch}() has width 64 and a 7x7 stem, so its "
            f"state_dict would not load. (The CIFAR-stem, narrow quickstart models have no "
            f"torchvision constructor.)")
    # torch's BN counter, for strict loading. Keras has none; 0 is what torch needs it for:
    # nothing, unless BN momentum is None (docstring).
    for key in [k for k in state if k.endswith(".running_var")]:
        state[key[:-len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
    return arch, state, norm


def detectron2_names(state: dict) -> dict:
    """torchvision ResNet keys -> detectron2's by the official conversion script's renaming
    rules; the `num_batches_tracked` counters are left out (module docstring)."""
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        new = key if "layer" in key else "stem." + key
        for t in (1, 2, 3, 4):
            new = new.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            new = new.replace(f"bn{t}", f"conv{t}.norm")
        new = new.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        out[new] = value
    return out


def write(state: dict, arch: str, fmt: str, out: str) -> None:
    """Writes `state` (torchvision/timm keys) as `fmt` to `out`."""
    is_vit = arch.startswith("vit")
    if fmt == "timm" and not is_vit:
        raise ConversionError(f"--format=timm takes a ViT; the export holds a {arch}: use "
                              f"--format=torchvision or detectron2.")
    if fmt in ("torchvision", "detectron2") and is_vit:
        raise ConversionError(f"--format={fmt} takes a ResNet; the export holds a {arch}: use "
                              f"--format=timm.")
    if fmt == "detectron2":
        with open(out, "wb") as f:
            pickle.dump({"model": detectron2_names(state), "__author__": "MOCO",
                         "matching_heuristics": True}, f)
        return
    try:
        import torch
    except ImportError as e:
        from moco_tf.convert.torch_moco import INSTALL_HINT

        raise ImportError(f"--format={fmt} writes with torch.save: {INSTALL_HINT}") from e
    # ascontiguousarray would make the 0-d num_batches_tracked 1-d.
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) if v.ndim else torch.tensor(v[()])
               for k, v in state.items()}
    torch.save({"model": tensors} if fmt == "timm" else tensors, out)


def convert(export_dir: str, out: str, fmt: str = "torchvision", *, force: bool = False) -> dict:
    """Exports the backbone of `export_dir` to `out` in format `fmt`; returns what it wrote."""
    from moco_tf.export import KERAS_FILE, load_backbone

    if fmt not in FORMATS:
        raise ConversionError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}.")
    if not os.path.isfile(os.path.join(export_dir, KERAS_FILE)):
        raise ConversionError(f"{export_dir} is not an export folder (no {KERAS_FILE} in it): "
                              f"pass the export/ folder a training or a conversion wrote.")
    if os.path.isdir(out):
        raise ConversionError(f"--out={out} is a directory; --out takes the path of the file to "
                              f"write, e.g. {os.path.join(out, 'backbone.pth')}.")
    if os.path.exists(out) and not force:
        raise ConversionError(f"{out} exists; pass --force to overwrite it.")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ConversionError(f"--out={out}: the folder {folder} does not exist; create it "
                              f"first (mkdir -p {folder}).")
    arch, state, norm = export_state_dict(load_backbone(export_dir))
    write(state, arch, fmt, out)
    info = {"format": fmt, "arch": arch, "tensors": len(state), "source": export_dir,
            "input": f"RGB in [0, 1], then (x - mean) / std", **norm}
    with open(out + ".json", "w") as f:
        json.dump(info, f, indent=2)
    return info


def _normalisation(backbone) -> dict:
    """The mean and std the backbone standardises its [0, 1] input with."""
    for layer in backbone.layers:
        config = layer.get_config()
        if "mean" in config and ("std" in config or "variance" in config):
            mean = np.broadcast_to(np.asarray(config["mean"], np.float64).reshape(-1),
                                   (backbone.input_shape[-1],))
            std = (np.asarray(config["std"], np.float64) if "std" in config
                   else np.sqrt(np.asarray(config["variance"], np.float64)))
            std = np.broadcast_to(std.reshape(-1), mean.shape)
            return {"mean": [round(float(m), 6) for m in mean],
                    "std": [round(float(s), 6) for s in std]}
    return {"mean": None, "std": None}


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", required=True, help="the export folder (backbone.keras)")
    parser.add_argument("--out", required=True, help="the file to write")
    parser.add_argument("--format", default="torchvision", choices=FORMATS)
    parser.add_argument("--force", action="store_true", help="overwrite --out")
    args = parser.parse_args(argv)
    try:
        info = convert(args.export, args.out, args.format, force=args.force)
    except (ConversionError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Wrote {args.out} ({info['format']}, {info['arch']}, {info['tensors']} tensors). "
          f"Normalise RGB in [0, 1] with mean={info['mean']} std={info['std']}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
