"""Import of official PyTorch MoCo checkpoints (and torchvision ResNets, timm ViTs) into Keras.

Reads a `.pth`/`.pth.tar` file, picks the query encoder, loads its ResNet onto
`moco_tf.models.build_backbone` (same layer names as torchvision, see backbones.py) or its ViT
onto `moco_tf.models.vit.build_vit` (timm's names: MoCo v3's `vit-s-300ep.pth.tar`,
`vit-b-300ep.pth.tar`), and writes the exports training writes (`moco_tf.export.export_backbone`:
SavedModel + `backbone.keras`), so `python -m moco_tf.eval.linear`, kNN and fine-tuning take
converted weights unchanged.

Checkpoint layouts recognised (the first that holds `conv1.weight`, or `cls_token`, wins):
  `module.encoder_q.*`     MoCo v1/v2 (facebookresearch/moco `main_moco.py`, DDP-wrapped)
  `module.base_encoder.*`  MoCo v3 ResNet or ViT (facebookresearch/moco-v3)
  `encoder_q.*`, `base_encoder.*`, `module.*`   the same without DDP / a DDP-wrapped ResNet
  no prefix                a torchvision ResNet or timm ViT `state_dict`
                           (`torch.save(model.state_dict())`)
A dict with a `"state_dict"` entry is unwrapped first (the official files also hold `epoch`,
`arch`, `optimizer`). The key encoder and the queue are ignored. The `fc` head is the
projector (v1: `fc` linear; v2: `fc.0`-ReLU-`fc.2`; v3: `fc.0`-BN-ReLU-`fc.3`-BN; a v3 ViT's
`head.*`, three layers) and is written to `projector.keras` with `--projector`. MoCo v3's
predictor (`predictor.0`-BN-ReLU-`predictor.3`, and for ViTs a last BN without affine, whose
running statistics are loaded too) is written to `predictor.keras` with `--predictor`.

Numerics: the official pre-processing is ImageNet mean/std on RGB in [0, 1]; our models take
[0, 1] images and standardise inside, so the converted backbone's `normalize` layer gets those
constants. Conv weights [out, in, kh, kw] -> kernel [kh, kw, in, out]; Linear weight -> its
transpose; BN weight/bias/running_mean/running_var -> gamma/beta/moving_mean/moving_variance
(eps 1e-5 in both); `num_batches_tracked` has no counterpart.

  python -m moco_tf.convert.torch_moco --checkpoint=moco_v2_800ep_pretrain.pth.tar \\
      --out=runs/moco_v2_800ep/export [--arch=resnet50] [--projector] [--predictor] \\
      [--image_size=224]

An unreadable or missing file, or a checkpoint of another architecture than `--arch`, stops the
command with `error: <why and what to do>` and exit status 2 (as `to_torch`).

PyTorch is an optional dependency (the `convert` extra: `pip install "moco-tf[convert]"`),
imported only when a checkpoint is read.
"""
from __future__ import annotations

import json
import os
import re
import tarfile
import zipfile

if __name__ == "__main__":  # before TensorFlow is imported: without its C++ start-up lines
    from moco_tf import cli

    cli.import_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402

from moco_tf.convert import names  # noqa: E402
from moco_tf.models.backbones import RESNETS, build_backbone  # noqa: E402
from moco_tf.models.heads import build_predictor, build_projector  # noqa: E402
from moco_tf.models.vit import VITS, build_vit  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the official MoCo / torchvision Normalize
IMAGENET_STD = (0.229, 0.224, 0.225)
# Query-encoder prefixes, most specific first (a bare "module." would also match v1/v2 files).
ENCODER_PREFIXES = ("module.encoder_q.", "module.base_encoder.", "encoder_q.", "base_encoder.",
                    "module.", "")
PROJECTOR_FILE = "projector.keras"
PREDICTOR_FILE = "predictor.keras"
INFO_FILE = "conversion.json"
INSTALL_HINT = ('pip install "moco-tf[convert]" (from a checkout: pip install -e ".[convert]"; '
                "on Linux add --extra-index-url https://download.pytorch.org/whl/cpu for the "
                "CPU build)")
_SHOWN = 10  # keys listed per category in a mismatch error

class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message says why and what to do."""


# --- reading ------------------------------------------------------------------------------------


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"Reading PyTorch checkpoints needs PyTorch, an optional dependency of moco_tf: "
            f"{INSTALL_HINT}"
        ) from e
    return torch


def read_checkpoint(path: str, *, allow_pickle: bool = False) -> tuple[dict, dict]:
    """Reads a torch checkpoint: `(state_dict {key: float32 np.ndarray}, metadata)`.

    `metadata` holds the checkpoint's scalar entries (`epoch`, `arch`, ...). The file is loaded with
    `weights_only=True` (no code from the file runs) unless `allow_pickle`, for trusted files
    that pickle other Python objects (e.g. an argparse Namespace).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint file at {path}.")
    if not _looks_like_torch_file(path):
        raise ConversionError(
            f"{path} is not a PyTorch checkpoint: torch.save writes a zip archive (or, before "
            f"PyTorch 1.6, a pickle), and this file is neither."
        )
    torch = _import_torch()
    try:
        # Only torch.load here: `import triton` (pulled in by torchvision or torch.optim) crashes
        # a process that has loaded TensorFlow >= 2.20 first (tensorflow/tensorflow#124205).
        checkpoint = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... here
        if "Weights only load failed" in str(e):
            lines = str(e).splitlines()
            detail = next((x.strip() for x in lines if "Unsupported global" in x), _first_line(e))
            raise ConversionError(
                f"{path} pickles Python objects besides tensors, which are not loaded by default "
                f"(loading them runs code from the file). If you trust the file, pass "
                f"--allow_pickle (convert(..., allow_pickle=True)). ({detail})"
            ) from e
        raise ConversionError(
            f"{path} is not a PyTorch checkpoint that torch.load can read "
            f"({type(e).__name__}: {_first_line(e)})."
        ) from e

    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        metadata = {k: v for k, v in checkpoint.items() if isinstance(v, (int, float, str, bool))}
        state_dict = checkpoint["state_dict"]
    elif isinstance(checkpoint, dict):
        metadata, state_dict = {}, checkpoint
    else:
        raise ConversionError(
            f"{path} holds a {type(checkpoint).__name__}, not a state_dict (a dict of tensors). "
            f"Save `model.state_dict()`, not the model object."
        )
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConversionError(f"{path}: the state_dict holds no tensors.")
    arrays = {k: v.detach().cpu().float().numpy() for k, v in tensors.items()}
    return arrays, metadata


def _looks_like_torch_file(path: str) -> bool:
    """A zip archive (torch >= 1.6), a tar (torch < 0.4) or a pickle (legacy `torch.save`)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head[:1] == b"\x80" or zipfile.is_zipfile(path) or tarfile.is_tarfile(path)


def _first_line(error) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --- layouts and architectures ------------------------------------------------------------------


def query_encoder(state_dict: dict) -> tuple[dict, str]:
    """The query encoder's weights without their prefix: `(encoder_state_dict, prefix)`.

    A ResNet is found by `conv1.weight`, a ViT (MoCo v3) by `cls_token`, under the first of
    `ENCODER_PREFIXES` that has it."""
    for marker in ("conv1.weight", "cls_token"):
        for prefix in ENCODER_PREFIXES:
            if f"{prefix}{marker}" in state_dict:
                return ({k[len(prefix):]: v for k, v in state_dict.items()
                         if k.startswith(prefix)}, prefix)
    raise ConversionError(
        "Architecture mismatch: no ResNet (key `conv1.weight`) and no ViT (key `cls_token`) under "
        f"any of the prefixes {[p for p in ENCODER_PREFIXES if p]} or without prefix. First keys "
        f"of the checkpoint: {list(state_dict)[:_SHOWN]}"
    )


def infer_vit(encoder: dict) -> tuple[str, int]:
    """(`vit_small` / `vit_base` / `vit_tiny`, patch size) from the ViT's weights."""
    dim = int(encoder["cls_token"].shape[-1])
    depth = len({m.group(1) for m in map(re.compile(r"blocks\.(\d+)\.").match, encoder) if m})
    patch = int(encoder["patch_embed.proj.weight"].shape[-1])
    for name, (d, n, _) in VITS.items():
        if (d, n) == (dim, depth):
            return name, patch
    raise ConversionError(
        f"Architecture mismatch: the checkpoint's ViT has width {dim} and {depth} blocks, which is "
        f"none of {', '.join(f'{k} ({d}, {n})' for k, (d, n, _) in VITS.items())}.")


def infer_arch(encoder: dict) -> str:
    """`resnet18`/`resnet34`/`resnet50` from the blocks per stage and the block type."""
    depths = []
    for stage in range(1, 5):
        pattern = re.compile(rf"layer{stage}\.(\d+)\.")
        depths.append(len({m.group(1) for m in map(pattern.match, encoder) if m}))
    block = "bottleneck" if "layer1.0.conv3.weight" in encoder else "basic"
    for arch, spec in RESNETS.items():
        if spec == (block, tuple(depths)):
            return arch
    raise ConversionError(
        f"Architecture mismatch: the checkpoint's ResNet has {block} blocks {tuple(depths)} per "
        f"stage, which is none of the supported {sorted(RESNETS)} "
        f"({', '.join(f'{a}: {s[0]} {s[1]}' for a, s in RESNETS.items())})."
    )


# --- assigning ----------------------------------------------------------------------------------


def load_torch_weights(model: keras.Model, state_dict: dict, torch_prefix=lambda name: name,
                       *, ignore=lambda key: False, what: str = "model") -> int:
    """Assigns `state_dict` (torch keys, numpy values) to the layers of `model`.

    Layer `L` takes the keys `torch_prefix(L.name) + ".weight"` etc. (see `names`). Every
    weight of `model` must be found with its shape, and every checkpoint key not `ignore`d must be
    used; otherwise a ConversionError lists the first missing/unexpected/mis-shaped keys and
    nothing is assigned. Returns the number of tensors assigned.
    """
    assignments, missing, shapes, used = [], [], [], set()
    for layer in model.layers:
        for variable in layer.weights:
            short = variable.name.split("/")[-1]
            key = names.torch_key(torch_prefix(layer.name), short)
            if key is None:
                raise ConversionError(f"No torch counterpart for {variable.path} of {what}.")
            if key not in state_dict:
                missing.append(key)
                continue
            used.add(key)
            value = names.to_keras(short, state_dict[key])
            if tuple(value.shape) != tuple(variable.shape):
                ours = names.to_torch(short, np.empty(variable.shape, np.uint8))
                shapes.append(f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model "
                              f"{ours.shape}")
                continue
            assignments.append((variable, value))
    unexpected = [k for k in state_dict
                  if k not in used and not k.endswith("num_batches_tracked") and not ignore(k)]
    if missing or unexpected or shapes:
        parts = [f"Architecture mismatch between the checkpoint and the Keras {what}:"]
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", shapes)):
            if keys:
                more = f" ... (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
                parts.append(f"  {len(keys)} {label}: {', '.join(keys[:_SHOWN])}{more}")
        raise ConversionError("\n".join(parts))
    for variable, value in assignments:
        variable.assign(value.astype(variable.dtype))
    return len(assignments)


def backbone_from_encoder(encoder: dict, *, arch: str | None = None, image_size=224,
                          mean=IMAGENET_MEAN, std=IMAGENET_STD, cifar_stem=False) -> keras.Model:
    """The Keras ResNet `[B, S, S, 3]` in [0, 1] -> `[B, D]` with the encoder's weights.

    `encoder`: torchvision keys (`conv1.weight`, `layer1.0.bn1.running_mean`, ...); `fc.*` is
    ignored. `arch` defaults to the one the keys describe; a different one gives a mismatch error.
    """
    if "cls_token" in encoder:
        return _vit_from_encoder(encoder, arch=arch, image_size=image_size, mean=mean, std=std)
    if arch is not None and arch not in RESNETS:
        raise ConversionError(
            f"--arch={arch}, but the checkpoint holds a ResNet ({_described_resnet(encoder)}): "
            f"pass one of {sorted(RESNETS)} or leave --arch out.")
    arch = arch or infer_arch(encoder)  # an explicit arch is checked key by key below
    conv1 = encoder["conv1.weight"]  # [width, in, k, k]
    if conv1.ndim != 4 or conv1.shape[1] != 3:
        raise ConversionError(
            f"conv1.weight has shape {conv1.shape}; expected [64, 3, 7, 7] (RGB).")
    if conv1.shape[-1] == 3 and not cifar_stem:
        raise ConversionError(
            "conv1 is 3x3, not the ImageNet 7x7 stem: a CIFAR-style ResNet. If it is 3x3 stride 1 "
            "without max-pool, pass --cifar_stem."
        )
    width = int(conv1.shape[0])  # 64 in torchvision
    backbone = build_backbone(arch, (image_size, image_size, 3), mean=mean, std=std,
                              cifar_stem=cifar_stem, width=width)
    try:
        load_torch_weights(backbone, encoder, ignore=lambda k: k.startswith("fc."), what=arch)
    except ConversionError as e:
        try:
            described = infer_arch(encoder)
        except ConversionError:
            raise e from None
        if described != arch:
            raise ConversionError(f"{e}\nThe checkpoint holds a {described}: pass "
                                  f"--arch={described} or leave --arch out.") from None
        raise
    return backbone


def _described_resnet(encoder) -> str:
    try:
        return infer_arch(encoder)
    except ConversionError:
        return "of no supported depth"


def _vit_from_encoder(encoder, *, arch, image_size, mean, std):
    """The Keras ViT with the encoder's (timm-named) weights; `head.*` is the projector."""
    described, patch = infer_vit(encoder)
    if arch is not None and arch != described:
        dim, depth, _ = VITS[described]
        raise ConversionError(
            f"--arch={arch}, but the checkpoint holds a {described} (ViT of width {dim}, {depth} "
            f"blocks, {patch} px patches): pass --arch={described} or leave --arch out.")
    arch = described
    tokens = encoder["pos_embed"].shape[1] - 1
    if image_size % patch or (image_size // patch) ** 2 != tokens:
        side = int(round(tokens ** 0.5)) * patch
        raise ConversionError(
            f"The checkpoint's position embedding has {tokens} patches of {patch} px: images of "
            f"{side} px; pass --image_size={side} (got {image_size}).")
    backbone = build_vit(arch, (image_size, image_size, 3), patch_size=patch, mean=mean, std=std)
    load_torch_weights(backbone, encoder, ignore=lambda k: k.startswith("head."), what=arch)
    return backbone


def projector_from_encoder(encoder: dict) -> keras.Model:
    """The `fc` head as a Keras projector `[B, D]` -> `[B, dim]` (layer `projector.i` = `fc.i`).

    v1 `fc` (Linear), v2 `fc.0`-ReLU-`fc.2` (Linear with biases), v3 `fc.0`-BN-ReLU-`fc.3`-BN
    (no biases, last BN without affine); also the ImageNet classifier of a torchvision model.
    """
    head = "head" if "cls_token" in encoder else "fc"  # timm's ViT calls it head
    if f"{head}.weight" in encoder:  # a single Linear
        out_dim, in_dim = encoder[f"{head}.weight"].shape
        model = build_projector("linear", in_dim, out_dim, use_bias=f"{head}.bias" in encoder)
        load_torch_weights(model, encoder, lambda name: head,
                           ignore=lambda k: not k.startswith(head + "."), what="linear projector")
        return model
    linear, bns = _mlp_layout(encoder, head)
    if len(linear) < 2:
        raise ConversionError(
            f"No projector head (`{head}.*`) in the checkpoint; keys: {list(encoder)[:_SHOWN]}")
    in_dim = encoder[f"{head}.{linear[0]}.weight"].shape[1]
    hidden = encoder[f"{head}.{linear[0]}.weight"].shape[0]
    out_dim = encoder[f"{head}.{linear[-1]}.weight"].shape[0]
    model = build_projector(
        "mlp", in_dim, out_dim, hidden_dim=hidden, num_layers=len(linear),
        use_bn=(linear[0] + 1) in bns, last_bn=(linear[-1] + 1) in bns,
        use_bias=f"{head}.{linear[0]}.bias" in encoder,
    )
    load_torch_weights(model, encoder, lambda name: f"{head}." + name.split(".")[-1],
                       ignore=lambda k: not k.startswith(head + "."), what="MLP projector")
    return model


def predictor_from_checkpoint(state_dict: dict, prefix: str) -> keras.Model | None:
    """MoCo v3's predictor `[B, dim]` -> `[B, dim]` as `build_predictor` builds it, or None if
    the checkpoint has none (it sits beside the query encoder: `module.predictor.*`).

    `predictor.0`-BN-ReLU-`predictor.3`, and with `predictor.4` (moco-v3's ViT predictor, not
    its ResNet one) the last BN without affine: `build_predictor(..., last_bn=True)`, its running
    statistics loaded.
    """
    if not prefix.endswith("base_encoder."):
        return None
    outer = prefix[:-len("base_encoder.")]
    weights = {k[len(outer):]: v for k, v in state_dict.items()
               if k.startswith(outer + "predictor.")}
    if not weights:
        return None
    linear, bns = _mlp_layout(weights, "predictor")
    if linear != [0, 3] or 1 not in bns or any(k.endswith(".bias") and int(k.split(".")[1]) in
                                               linear for k in weights):
        raise ConversionError(
            f"The checkpoint's predictor is not moco-v3's Linear-BN-ReLU-Linear[-BN] without "
            f"biases: Linear layers {linear}, BN layers {sorted(bns)}.")
    first, last = weights["predictor.0.weight"], weights["predictor.3.weight"]
    model = build_predictor(first.shape[1], last.shape[0], first.shape[0], last_bn=4 in bns)
    load_torch_weights(model, weights, what="predictor")
    return model


def _mlp_layout(weights: dict, head: str) -> tuple[list, set]:
    """(indices of the Linear layers, indices of the BN layers) of the `nn.Sequential` `head`."""
    linear = sorted(int(m.group(1)) for k, v in weights.items()
                    for m in [re.fullmatch(rf"{head}\.(\d+)\.weight", k)] if m and v.ndim == 2)
    bn_key = re.compile(rf"{head}\.(\d+)\.running_mean")
    return linear, {int(m.group(1)) for m in map(bn_key.fullmatch, weights) if m}


# --- the conversion -----------------------------------------------------------------------------


def convert(checkpoint: str, out_dir: str | None, *, arch: str | None = None, projector=False,
            predictor=False, image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            cifar_stem=False, allow_pickle=False) -> dict:
    """Converts `checkpoint` and (unless `out_dir` is None) writes its exports.

    Writes under `out_dir`: `saved_model/` + `backbone.keras` (`moco_tf.export.export_backbone`,
    serving input uint8 `[None, image_size, image_size, 3]`), `projector.keras` with `projector`,
    `predictor.keras` with `predictor` (MoCo v3 checkpoints), and `conversion.json` (source,
    layout, arch, tensors converted).
    Returns `{"backbone": keras.Model, "projector": keras.Model | None, "predictor": keras.Model
    | None, "info": dict}`.
    """
    state_dict, metadata = read_checkpoint(checkpoint, allow_pickle=allow_pickle)
    encoder, prefix = query_encoder(state_dict)
    backbone = backbone_from_encoder(encoder, arch=arch, image_size=image_size, mean=mean, std=std,
                                     cifar_stem=cifar_stem)
    head = projector_from_encoder(encoder) if projector else None
    pred = predictor_from_checkpoint(state_dict, prefix) if predictor else None
    if predictor and pred is None:
        raise ConversionError(
            f"{checkpoint} has no predictor (MoCo v3 checkpoints hold `module.predictor.*`; the "
            f"query encoder here is under {prefix!r}): leave --predictor out.")
    info = {
        "checkpoint": os.path.abspath(checkpoint),
        "prefix": prefix,
        "layout": {"module.encoder_q.": "moco_v1/v2", "module.base_encoder.": "moco_v3",
                   "": "timm" if "cls_token" in encoder else "torchvision"}.get(
                       prefix, prefix.rstrip(".")),
        "arch": backbone.name,
        "checkpoint_arch": metadata.get("arch"),
        "epoch": metadata.get("epoch"),
        "image_size": int(image_size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "cifar_stem": bool(cifar_stem) and "cls_token" not in encoder,
        "feature_dim": int(backbone.output_shape[-1]),
        "backbone_tensors": len(backbone.weights),
        "projector": None if head is None else [int(d) for d in head.output_shape[1:]],
        "predictor": None if pred is None else [int(d) for d in pred.output_shape[1:]],
    }
    if out_dir is not None:
        from moco_tf import export as export_lib  # writes SavedModels: only when asked to

        export_lib.export_backbone(backbone, out_dir, image_shape=(image_size, image_size, 3))
        if head is not None:
            head.save(os.path.join(out_dir, PROJECTOR_FILE))
        if pred is not None:
            pred.save(os.path.join(out_dir, PREDICTOR_FILE))
        with open(os.path.join(out_dir, INFO_FILE), "w") as f:
            json.dump(info, f, indent=2)
        info["out_dir"] = out_dir
    return {"backbone": backbone, "projector": head, "predictor": pred, "info": info}


# --- command line -------------------------------------------------------------------------------


def _define_flags():
    from absl import flags

    flags.DEFINE_string("checkpoint", None, "The .pth / .pth.tar file: MoCo v1/v2/v3 (ResNet or "
                        "ViT), or a torchvision ResNet / timm ViT state_dict.")
    flags.DEFINE_string("out", None, "Export dir to write (saved_model/, backbone.keras, ...).")
    flags.DEFINE_enum("arch", None, sorted(RESNETS) + sorted(VITS),
                      "ResNet or ViT; default: read from the checkpoint.")
    flags.DEFINE_bool("projector", False, "Also convert the fc head to projector.keras.")
    flags.DEFINE_bool("predictor", False, "Also convert MoCo v3's predictor to predictor.keras.")
    flags.DEFINE_integer("image_size", 224, "Input size S of the exported model ([B, S, S, 3]).")
    flags.DEFINE_list("mean", [str(m) for m in IMAGENET_MEAN], "Per-channel mean (RGB in [0, 1]).")
    flags.DEFINE_list("std", [str(s) for s in IMAGENET_STD], "Per-channel std (RGB in [0, 1]).")
    flags.DEFINE_bool("cifar_stem", False, "conv1 is 3x3 stride 1 and there is no max-pool.")
    flags.DEFINE_bool("allow_pickle", False, "Load a trusted file that pickles non-tensor objects.")
    flags.mark_flags_as_required(["checkpoint", "out"])


def main(argv):
    del argv
    import sys

    from absl import flags, logging

    f = flags.FLAGS
    if not f["verbosity"].present:  # TF's SavedModel writer logs a page at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        result = convert(
            f.checkpoint, f.out, arch=f.arch, projector=f.projector, predictor=f.predictor,
            image_size=f.image_size,
            mean=[float(m) for m in f.mean], std=[float(s) for s in f.std],
            cifar_stem=f.cifar_stem, allow_pickle=f.allow_pickle,
        )
    except (ConversionError, ImportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)  # input errors, as to_torch
    info = result["info"]
    print(f"Converted {info['layout']} {info['arch']} ({info['backbone_tensors']} tensors, "
          f"features [B, {info['feature_dim']}]) from {f.checkpoint}")
    heads = "".join(f", {file}" for file, model in ((PROJECTOR_FILE, result["projector"]),
                                                     (PREDICTOR_FILE, result["predictor"]))
                    if model is not None)
    print(f"Written: {info['out_dir']} (saved_model/, backbone.keras{heads}, {INFO_FILE})")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
