"""The config schema (every key with its default) and validation.

Configs in `configs/` start from `defaults()` and override what their recipe changes, so every config
has every key. `validate()` turns a mistake into one `ConfigError` with one clear sentence, raised before
any model is built; `train.py` prints it and exits with status 2.
"""

import difflib
import json
import math
import os

import ml_collections


class ConfigError(ValueError):
    """A config value that cannot work; the message says which key and why."""


class DataError(ValueError):
    """Data that cannot be used as it is; the message names the path or dataset and the fix."""


SCOPES = ("full", "projector", "none")  # and "from:<block>"
NEGATIVES = ("queue", "batch", "both_views")


def check_method(momentum_scope: str, negatives: str, symmetric: bool) -> None:
    """Raises ValueError (one sentence) for switches that would not compute what they say."""
    if momentum_scope not in SCOPES and not (
            momentum_scope.startswith("from:") and len(momentum_scope) > len("from:")):
        raise ValueError(f"momentum_scope must be one of {', '.join(SCOPES)} or 'from:<block>' "
                         f"(e.g. 'from:layer3'), got {momentum_scope!r}")
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {', '.join(NEGATIVES)}, got {negatives!r}")
    if negatives == "both_views" and not symmetric:
        raise ValueError("negatives='both_views' (SimCLR's NT-Xent) takes the negatives of both "
                         "views, so it needs symmetric=True (both views are queries).")
    if negatives == "queue" and momentum_scope == "none":
        raise ValueError("negatives='queue' needs a momentum encoder: keys of the online encoder "
                         "go stale in the queue; use 'batch' or 'both_views' with "
                         "momentum_scope 'none'.")


def defaults() -> ml_collections.ConfigDict:
    """Every config key with its default (a small MoCo v2 on Fashion-MNIST)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.deterministic = False
    # The queue, logits, loss and EMA stay float32 either way (docs/performance.md: speed).
    # float32 | mixed_bfloat16 | mixed_float16 | auto (bfloat16 where the hardware has it).
    c.precision = "float32"

    c.data = ml_collections.ConfigDict()
    c.data.source = "fashion_mnist"  # fashion_mnist | tfds | image_folder | synthetic
    c.data.name = ""  # tfds dataset name, e.g. "imagenet2012"
    c.data.data_dir = ""  # IDX dir / image folder / tfds data_dir; "" = the source's default
    # image_folder only: the evaluation folder (class sub-folders named like data_dir's).
    c.data.eval_dir = ""
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.image_size = 28
    c.data.channels = 1
    c.data.augmentation = "moco_v2"  # moco_v1 | moco_v2 (aug+) | moco_v3
    c.data.crop_scale = (0.2, 1.0)
    c.data.cache = True  # in-memory sources: keep the decoded images after the first epoch
    # Examples shuffled in memory: decoded images (in-memory sources), encoded images (tfds
    # ImageNet; ~110 KB each). Image folders shuffle all their file names every epoch.
    c.data.shuffle_buffer = 10000
    # Where colour jitter, grayscale, blur and solarize run: in the input pipeline (host) or at
    # the start of train_step on the accelerator (device; the host only decodes and crops).
    c.data.augment_on = "host"  # host | device
    # Antialiased resize of the random crops: PIL/torchvision's filter, slower to decode and crop
    # than the plain bilinear TF/JAX SSL pipelines use (docs/troubleshooting.md: antialias).
    c.data.antialias = False
    # tf.data service dispatcher ("grpc://host:5050"): the input pipeline runs on its workers
    # (docs/data.md). "" = on this host.
    c.data.service_address = ""
    # tfds: prepare a dataset that is not prepared yet — download it, or for manual datasets
    # (ImageNet) read the archives from tfds_manual_dir.
    c.data.tfds_download = True
    c.data.tfds_manual_dir = ""
    # image_folder: a file that is not a readable image is skipped (counted, first names logged)
    # or stops the run with its name: skip | error
    c.data.on_bad_image = "skip"
    c.data.synthetic_examples = 256
    c.data.num_classes = 10
    # Per-channel normalisation, applied inside the backbone so exports take raw images.
    c.data.mean = (0.2860,)
    c.data.std = (0.3530,)

    c.model = ml_collections.ConfigDict()
    c.model.backbone = "resnet18"  # resnet18 | resnet50 | small_cnn | vit_small | vit_base | vit_tiny
    c.model.patch_size = 16  # ViTs: patch side in pixels
    c.model.cifar_stem = True  # 3x3 stride-1 conv1, no max-pool: for 28-32 px images
    c.model.stem_stride = 1  # CIFAR stem's conv1 stride: 2 = layers at half resolution, 1/4 the work
    c.model.width = 64  # ResNet channels of conv1/layer1 (64 = torchvision); compute ~ width^2
    c.model.norm = "split_bn"  # bn | split_bn (shuffle-BN emulation on one device) | sync_bn
    c.model.split_bn_groups = 8
    c.model.projector = "mlp"  # linear (v1) | mlp (v2)
    c.model.projector_hidden_dim = 0  # 0 = the backbone's feature dim
    c.model.projector_layers = 2  # mlp: Dense layers (2 in MoCo v2 and v3 with a ResNet)
    c.model.projector_bn = False  # mlp: BN on hidden layers + affine-free BN on the output (v3)
    c.model.predictor = False  # the MoCo v3 predictor, on the query side only
    c.model.predictor_hidden_dim = 0  # 0 = the backbone's feature dim
    c.model.predictor_last_bn = False  # predictor ends with an affine-free BN (moco-v3's ViT)
    c.model.zero_init_residual = False  # ResNets: each block's last BN starts at gamma 0

    c.moco = ml_collections.ConfigDict()
    c.moco.dim = 128
    c.moco.queue_size = 4096  # K
    c.moco.momentum = 0.99  # m
    c.moco.temperature = 0.2  # T
    # The momentum-encoder family (DESIGN §2): one model, these switches.
    # full (MoCo) | from:<block>, e.g. from:layer3 (EMA of the blocks from there on) |
    # projector (Pham et al. 2022) | none (SimCLR)
    c.moco.momentum_scope = "full"
    c.moco.momentum_schedule = "constant"  # constant | cosine (m -> 1, MoCo v3 / BYOL)
    c.moco.negatives = "queue"  # queue | batch (MoCo v3) | both_views (SimCLR NT-Xent)
    c.moco.symmetric = False  # add the loss with the views swapped
    c.moco.loss_scale = 1.0  # MoCo v3: 2 * T

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 1
    c.train.batch_size = 256
    c.train.steps_per_epoch = ml_collections.config_dict.placeholder(int)  # None = full epoch
    c.train.base_learning_rate = 0.03  # per 256 images: lr = base * batch_size / 256
    c.train.lr_schedule = "cosine"  # cosine | step | constant
    c.train.lr_decay_epochs = (120, 160)  # step schedule: x0.1 at these epochs
    c.train.warmup_epochs = 0
    c.train.optimizer = "sgd"  # sgd (MoCo v1/v2) | lars (MoCo v3 ResNet) | adamw (MoCo v3 ViT)
    c.train.optimizer_momentum = 0.9  # heavy-ball momentum of SGD and LARS (PyTorch's rule)
    c.train.weight_decay = 1e-4  # L2 added to the gradient (PyTorch's weight_decay)
    c.train.steps_per_execution = 1
    # XLA: measure before using it (slower than graph mode on CPUs, docs/distributed.md); not
    # with several replicas of a MirroredStrategy (keras#19005).
    c.train.jit_compile = False
    # default (one device) | mirrored (local GPUs) | multi_worker (TF_CONFIG) | tpu (TPU VM);
    # train.batch_size stays the global batch, split evenly over the replicas.
    c.train.strategy = "default"
    c.train.verbose = 1  # Keras progress bar: 0 silent, 1 bar, 2 one line per epoch
    c.train.summary_every_steps = 50  # TensorBoard step scalars (loss, top1, lr, m)
    # Checkpoints in <workdir>/checkpoints, also at every epoch end; re-running resumes exactly.
    c.train.checkpoint_every_steps = 500  # 0 = only at epoch ends
    c.train.keep_checkpoints = 3
    # A NaN/inf loss or gradient: stop (naming the step; the last good checkpoint is kept) or
    # skip_step (the step changes nothing; costs a copy of the weights per step): stop | skip_step
    c.train.on_nan = "stop"

    c.eval = ml_collections.ConfigDict()
    c.eval.knn_every_epochs = 1
    c.eval.knn_ks = (200, 20)
    c.eval.knn_temperature = 0.1
    c.eval.batch_size = 512
    c.eval.raw_pixel_baseline = False  # also report kNN on raw pixels (small datasets)
    c.eval.export = True
    return c


_CHOICES = {
    "precision": ("float32", "mixed_bfloat16", "mixed_float16", "auto"),
    "data.source": ("fashion_mnist", "tfds", "image_folder", "synthetic"),
    "data.augmentation": ("moco_v1", "moco_v2", "moco_v3"),
    "data.augment_on": ("host", "device"),
    "model.backbone": ("resnet18", "resnet34", "resnet50", "small_cnn", "vit_tiny", "vit_small",
                       "vit_base"),
    "model.norm": ("bn", "split_bn", "sync_bn"),
    "model.projector": ("linear", "mlp"),
    "moco.momentum_schedule": ("constant", "cosine"),
    "moco.negatives": ("queue", "batch", "both_views"),
    "train.optimizer": ("sgd", "lars", "adamw"),
    "train.strategy": ("default", "mirrored", "multi_worker", "tpu"),
    "train.lr_schedule": ("cosine", "step", "constant"),
    "data.on_bad_image": ("skip", "error"),
    "train.on_nan": ("stop", "skip_step"),
}


def _flatten(cfg, prefix=""):
    out = {}
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def hparams(config: ml_collections.ConfigDict) -> dict:
    """The config flattened for TensorBoard's hparams: {"train.batch_size": 256, ...}; tuples
    become strings."""
    return {key: value if isinstance(value, (bool, int, float, str)) else str(value)
            for key, value in _flatten(config).items() if value is not None}


def flat_keys() -> set:
    """Every config key as a dotted path: {"train.batch_size", ...}."""
    return set(_flatten(defaults()))


# What a resumed run may change: how long it trains (train.epochs: the lr and momentum schedules
# stretch to the new length), how it is evaluated, logged and checkpointed, and where the data is
# read from. Every other key defines the run's math (model, method, optimizer and lr schedule,
# augmentation, data order, seed, batch, precision...), so a new key is refused by default.
RESUMABLE = (
    "train.epochs", "eval.", "train.verbose", "train.summary_every_steps",
    "train.checkpoint_every_steps", "train.keep_checkpoints", "train.on_nan",
    "train.steps_per_execution", "train.jit_compile", "deterministic", "data.data_dir",
    "data.eval_dir", "data.eval_split", "data.num_classes", "data.cache", "data.on_bad_image",
    "data.tfds_download", "data.tfds_manual_dir", "data.service_address",
)


def json_values(config: ml_collections.ConfigDict) -> dict:
    """The config flattened to JSON values ({"train.batch_size": 256, "data.crop_scale": [0.2,
    1.0], ...}): what a workdir's config.json holds."""
    return json.loads(json.dumps(_flatten(config)))


def show_value(value) -> str:
    """A JSON value as it is written in a config (lists as tuples)."""
    return repr(tuple(value)) if isinstance(value, list) else repr(value)


def resume_changes(saved: dict, config: ml_collections.ConfigDict):
    """The changes from `saved` (the `json_values` a run started with) to `config`, as two lists
    of (key, old, new): those that would make a resume continue another run, and the
    `RESUMABLE` ones. A key `saved` lacks (added to moco_tf since) counts as its default."""
    base = json_values(defaults())
    refused, allowed = [], []
    for key, new in json_values(config).items():
        old = saved.get(key, base.get(key))
        if old != new:
            safe = any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE)
            (allowed if safe else refused).append((key, old, new))
    return refused, allowed


def unknown_key_message(path: str) -> str:
    """'Unknown config key ...' with the closest known key, for a config file or an override."""
    close = difflib.get_close_matches(path, sorted(flat_keys()), n=1)
    return f"Unknown config key '{path}'." + (f" Did you mean '{close[0]}'?" if close else "")


def _field_types():
    """{dotted key: (type, whether None is allowed)} of the defaults; a placeholder field (e.g.
    `train.steps_per_epoch`) has its declared type and allows None."""
    out = {}

    def walk(cfg, prefix):
        for key in cfg.keys():
            value = cfg[key]
            if isinstance(value, ml_collections.ConfigDict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = (cfg.get_ref(key).get_type(), value is None)

    walk(defaults(), "")
    return out


def _type_name(kind, nullable):
    return kind.__name__ + (" or None" if nullable else "")


def _element_problem(path, value, default):
    """For a tuple field, why `value`'s elements are not of the default's element type (or
    None): ml_collections checks the tuple, not what is inside it."""
    if not default or not isinstance(value, (tuple, list)):
        return None
    kind = type(default[0])
    numeric = (int, float) if kind is float else (kind,)
    if all(isinstance(v, numeric) and not isinstance(v, bool) for v in value):
        return None
    return (f"'{path}' must be a tuple of {kind.__name__}, e.g. {tuple(default)}, got "
            f"{tuple(value)!r}.")


def _check_keys_and_types(config):
    """Unknown keys and ill-typed values by ml_collections' own rules: `config` is applied key by
    key onto the locked defaults (locking refuses a new key; type safety casts an int to a float
    and a list to a tuple, and refuses the rest). On top: a bool is not a number (Python's bool
    is an int), and a tuple's elements have the type of the default's."""
    schema = defaults().lock()
    types, default_values = _field_types(), _flatten(defaults())
    for path, value in _flatten(config).items():
        try:
            schema.update_from_flattened_dict({path: value})
        except (KeyError, AttributeError):
            raise ConfigError(unknown_key_message(path)) from None
        except TypeError:
            raise ConfigError(f"'{path}' must be of type {_type_name(*types[path])}, got "
                              f"{value!r}.") from None
        kind, nullable = types[path]
        if isinstance(value, bool) and kind in (int, float):
            raise ConfigError(f"'{path}' must be of type {_type_name(kind, nullable)}, got "
                              f"{value!r} (a bool).")
        problem = _element_problem(path, value, default_values[path])
        if problem:
            raise ConfigError(problem)


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks `config` against the defaults' keys and types, then the MoCo constraints.

    Returns the config unchanged; raises `ConfigError` naming the first problem.
    """
    _check_keys_and_types(config)
    given = _flatten(config)
    for key, choices in _CHOICES.items():
        if key in given and given[key] not in choices:
            raise ConfigError(f"'{key}' is {given[key]!r}; choose one of {', '.join(choices)}.")

    _check_ranges(config)
    _check_class_count(config)
    t, m = config.train, config.moco
    if t.checkpoint_every_steps < 0 or t.keep_checkpoints < 1:
        raise ConfigError(
            "'train.checkpoint_every_steps' must be >= 0 (0 = at epoch ends only) and "
            "'train.keep_checkpoints' >= 1."
        )
    if m.negatives == "queue" and m.queue_size % t.batch_size != 0:
        raise ConfigError(
            f"'moco.queue_size' ({m.queue_size}) must be a multiple of 'train.batch_size' "
            f"({t.batch_size}) so that every batch of keys is enqueued whole; try "
            f"{max(1, m.queue_size // t.batch_size) * t.batch_size}."
        )
    try:
        check_method(m.momentum_scope, m.negatives, m.symmetric)
    except ValueError as e:
        raise ConfigError(f"moco: {e}") from None
    if config.model.norm == "split_bn" and t.batch_size % config.model.split_bn_groups:
        raise ConfigError(
            f"'train.batch_size' ({t.batch_size}) must be divisible by "
            f"'model.split_bn_groups' ({config.model.split_bn_groups})."
        )
    d = config.data
    if d.service_address and d.source != "image_folder":
        raise ConfigError(
            f"'data.service_address' works with data.source='image_folder' (the tf.data service "
            f"is for large JPEG collections); {d.source!r} runs on this host: set it to ''.")
    if len(d.mean) != d.channels or len(d.std) != d.channels:
        raise ConfigError(
            f"'data.mean' and 'data.std' need one value per channel ({d.channels})."
        )
    size = _known_size(d, d.train_split)
    if size is not None and t.batch_size > size:
        raise ConfigError(
            f"'train.batch_size' ({t.batch_size}) is larger than the training set ({size} images "
            f"of {d.source} '{d.train_split}')."
        )
    return config


# key -> (lowest, highest, whether the lowest is allowed); every number must be finite.
_RANGES = {
    "seed": (0, 2**32 - 1, True),  # numpy's and TF's seeds are unsigned 32-bit
    "train.batch_size": (1, None, True),
    "train.epochs": (1, None, True),
    "train.steps_per_epoch": (1, None, True),
    "train.base_learning_rate": (0, None, False),
    "train.weight_decay": (0, None, True),
    "train.optimizer_momentum": (0, 1, True),
    "train.warmup_epochs": (0, None, True),
    "train.steps_per_execution": (1, None, True),
    "train.summary_every_steps": (1, None, True),
    "moco.temperature": (0, None, False),
    "moco.momentum": (0, 1, True),
    "moco.loss_scale": (0, None, False),
    "moco.dim": (1, None, True),
    "moco.queue_size": (1, None, True),
    "model.width": (1, None, True),
    "model.split_bn_groups": (1, None, True),
    "model.stem_stride": (1, 2, True),
    "model.projector_hidden_dim": (0, None, True),
    "model.predictor_hidden_dim": (0, None, True),
    "model.projector_layers": (1, None, True),
    "model.patch_size": (1, None, True),
    "data.image_size": (8, None, True),
    "data.num_classes": (1, None, True),
    "data.shuffle_buffer": (1, None, True),
    "data.synthetic_examples": (1, None, True),
    "eval.knn_every_epochs": (0, None, True),
    "eval.batch_size": (1, None, True),
    "eval.knn_temperature": (0, None, False),
}


def _check_ranges(config):
    """Every number finite and in its range; crop scale, channels, ks, std sensible."""
    flat = _flatten(config)
    for key, (low, high, low_ok) in _RANGES.items():
        value = flat.get(key)
        if value is None:
            continue
        bound = f">= {low}" if low_ok else f"> {low}"
        if high is not None:
            bound += f" and <= {high}"
        if (not math.isfinite(value) or value < low or (value == low and not low_ok)
                or (high is not None and value > high)):
            raise ConfigError(f"'{key}' must be {bound}, got {value}.")
    d, t = config.data, config.train
    if d.channels not in (1, 3):
        raise ConfigError(f"'data.channels' must be 1 (gray) or 3 (RGB), got {d.channels}.")
    lo, hi = (tuple(d.crop_scale) + (None, None))[:2]
    if len(d.crop_scale) != 2 or not (0 < lo <= hi <= 1):
        raise ConfigError(f"'data.crop_scale' must be (low, high) with 0 < low <= high <= 1 (a "
                          f"fraction of the image area), got {tuple(d.crop_scale)}.")
    if any(not s > 0 or not math.isfinite(s) for s in d.std):
        raise ConfigError(f"'data.std' must be positive, got {tuple(d.std)}.")
    if any(not math.isfinite(m) for m in d.mean):
        raise ConfigError(f"'data.mean' must be finite numbers, got {tuple(d.mean)}.")
    decays = tuple(t.lr_decay_epochs)
    if any(e <= 0 for e in decays) or list(decays) != sorted(set(decays)):
        raise ConfigError(f"'train.lr_decay_epochs' must be increasing epochs > 0 (the step "
                          f"schedule's x0.1 points, e.g. (120, 160)), got {decays}.")
    if not config.eval.knn_ks or any(k < 1 for k in config.eval.knn_ks):
        raise ConfigError(f"'eval.knn_ks' must be neighbour counts >= 1, got "
                          f"{tuple(config.eval.knn_ks)}.")
    if t.warmup_epochs >= t.epochs and t.warmup_epochs:
        raise ConfigError(f"'train.warmup_epochs' ({t.warmup_epochs}) must be fewer than "
                          f"'train.epochs' ({t.epochs}): the lr would never leave the warm-up.")
    if config.model.backbone.startswith("vit") and d.image_size % config.model.patch_size:
        raise ConfigError(f"'data.image_size' ({d.image_size}) must be a multiple of "
                          f"'model.patch_size' ({config.model.patch_size}) for a ViT.")
    if (config.model.backbone.startswith("resnet") and not config.model.cifar_stem
            and d.image_size < 32):
        raise ConfigError(f"'data.image_size' ({d.image_size}) is too small for an ImageNet "
                          f"ResNet stem (5 halvings: >= 32); set model.cifar_stem=True for "
                          f"small images.")
    if config.model.stem_stride != 1 and not config.model.cifar_stem:
        raise ConfigError(f"'model.stem_stride' ({config.model.stem_stride}) applies to the CIFAR "
                          f"stem only (model.cifar_stem=True); the ImageNet stem has its own "
                          f"stride and max-pool.")
    if config.model.predictor_last_bn and not config.model.predictor:
        raise ConfigError("'model.predictor_last_bn' needs a predictor: set model.predictor=True "
                          "(MoCo v3) or leave it False.")
    if config.model.zero_init_residual and not config.model.backbone.startswith("resnet"):
        raise ConfigError(f"'model.zero_init_residual' applies to ResNets, not "
                          f"'{config.model.backbone}'.")
    if config.model.projector == "mlp" and config.model.projector_layers < 2:
        raise ConfigError("'model.projector_layers' must be >= 2 for an MLP projector (1 is "
                          "model.projector='linear').")


_FASHION_MNIST_SIZES = {"train": 60000, "test": 10000}
_FASHION_MNIST_CLASSES = 10


def _check_class_count(config):
    """Sources whose class count the config alone tells: labels outside data.num_classes would
    stop the kNN evaluation after a whole epoch of training (folders and tfds sets are counted
    by `data.datasets.check`)."""
    d = config.data
    evaluates = config.eval.knn_every_epochs or config.eval.raw_pixel_baseline
    if evaluates and d.source == "fashion_mnist" and d.num_classes < _FASHION_MNIST_CLASSES:
        raise ConfigError(f"'data.num_classes' ({d.num_classes}) is smaller than the "
                          f"{_FASHION_MNIST_CLASSES} classes of Fashion-MNIST; set "
                          f"data.num_classes={_FASHION_MNIST_CLASSES}.")


def _known_size(data, split):
    """Examples in `split` when the config alone tells (other sources: checked when listed)."""
    if data.source == "synthetic":
        return int(data.synthetic_examples) if split == data.train_split else None
    if data.source == "fashion_mnist":
        return _FASHION_MNIST_SIZES.get(split)
    return None


def check_data_paths(config: ml_collections.ConfigDict) -> None:
    """The folders and files the config's data source reads exist; else one `ConfigError`
    naming the key and the path. Run before building anything (train_and_evaluate does)."""
    d = config.data
    if d.source == "fashion_mnist":
        from moco_tf.data.fashion_mnist import fashion_mnist_files

        for key, split in (("data.train_split", d.train_split), ("data.eval_split", d.eval_split)):
            try:
                fashion_mnist_files(d.data_dir, split)  # the reader's own lookup and messages
            except FileNotFoundError as e:
                raise ConfigError(f"'data.data_dir': {e}") from None
            except ValueError as e:
                raise ConfigError(f"'{key}': {e}") from None
    elif d.source == "image_folder":
        if not d.data_dir or not os.path.isdir(d.data_dir):
            raise ConfigError(f"'data.data_dir': the image folder {d.data_dir!r} does not exist.")
        evaluates = config.eval.knn_every_epochs or config.eval.export
        if evaluates and not d.eval_dir:
            raise ConfigError(
                "'data.eval_dir' is empty: the kNN monitor and the embedding projector need a "
                "labelled folder (class sub-folders); set it, or eval.knn_every_epochs=0 and "
                "eval.export=False."
            )
        if d.eval_dir and not os.path.isdir(d.eval_dir):
            raise ConfigError(f"'data.eval_dir': the image folder {d.eval_dir!r} does not exist.")
