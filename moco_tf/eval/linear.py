"""Linear evaluation: a linear classifier trained on the frozen backbone's features.

The MoCo protocol (He et al. 2019, §4.1; the official `main_lincls.py`): the backbone is frozen
(BatchNormalization in inference mode), a fully connected layer is trained on its globally pooled
features with SGD, lr 30, momentum 0.9, no weight decay, batch 256, 100 epochs, lr x0.1 at 60%
and 80% of the epochs (epochs 60 and 80 of 100); the reported number is top-1 on the test split.

One deviation, for speed on a CPU: features are computed once, on un-augmented images (the
evaluation transform), and the classifier is trained on those. The official protocol feeds the
classifier random-resized crops and flips, which needs the backbone for every step; with the
backbone frozen and no augmentation the features never change, so computing them once is exact
for this variant and needs one backbone pass over the data instead of 100.

Feature scale: lr 30 was tuned for a ResNet-50's pooled post-ReLU features. `normalize` chooses
what the classifier sees:
  "l2" (default)    unit-norm rows;
  "none"            the features as they are: exactly the MoCo protocol;
  "standardize"     per-dimension zero mean / unit variance from the training features (BatchNorm
                    without affine in inference mode, as MAE's linear probe).
Measured on Fashion-MNIST with a ResNet-18 (width 16, pooled features of norm ~10), 100 epochs:
"l2" 78.7% vs "none" 76.9% top-1 (raw pixels: 84.0% vs 80.8%); at 10 epochs "standardize" was the
worst of the three (lr 30 is too large for unit-variance features). Hence "l2" by default; pass
"none" to reproduce the paper's protocol exactly.

Run:
  python -m moco_tf.eval.linear --export=runs/fashion_mnist/export \\
      --config=configs/fashion_mnist.py [--epochs=100] [--raw_pixels]
prints top-1 and writes `<export>/linear_eval.json`. `--raw_pixels` runs the same protocol on the
raw pixels too (the baseline the features have to beat).
"""
from __future__ import annotations

import json
import os
import time

if __name__ == "__main__":  # before TensorFlow is imported: without its C++ start-up lines
    from moco_tf import cli

    cli.import_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402

from moco_tf.eval import knn  # noqa: E402

NORMALIZATIONS = ("l2", "none", "standardize")


def linear_classifier(backbone: keras.Model, num_classes: int,
                      normalize: str = "l2") -> keras.Model:
    """Frozen `backbone` + a linear layer: images [B, H, W, C] -> logits [B, num_classes].

    For training end to end with augmentation. The backbone is frozen: Keras runs the
    BatchNormalization of a non-trainable layer in inference mode (moving statistics, not
    updated). Set `backbone.trainable = True` and recompile to fine-tune it all.

    Args:
      normalize: "l2" (default, as `train_linear`'s): unit-norm features before the linear
        layer, the scale the protocol's lr 30 suits; "none": the features as they are (the
        MoCo protocol, tuned for a ResNet-50's; lr 30 diverges on other scales).
        ("standardize" needs the training set's statistics: use `train_linear`.)
    """
    if normalize not in ("l2", "none"):
        raise ValueError(f"linear_classifier: normalize must be 'l2' or 'none', got "
                         f"{normalize!r} ('standardize' is for train_linear's features).")
    backbone.trainable = False
    images = keras.Input(backbone.input_shape[1:])
    features = backbone(images)  # no training=False: unfreezing later must train BN too
    if normalize == "l2":
        features = keras.layers.UnitNormalization(name="l2_normalize", dtype="float32")(features)
    logits = keras.layers.Dense(num_classes, name="linear", dtype="float32",  # as train_linear
                                kernel_initializer=keras.initializers.RandomNormal(stddev=0.01))(
        features)
    return keras.Model(images, logits, name="linear_classifier")


def extract_features(backbone, dataset) -> tuple[np.ndarray, np.ndarray]:
    """Backbone features in inference mode: `(features [N, D] float32, labels [N] int32)`.

    `dataset` yields `(images float32 [B, H, W, C] in [0, 1], labels [B])`; `backbone=None` gives
    the flattened raw pixels [N, H*W*C]. Not normalised: `train_linear` applies `normalize`.
    """
    source = backbone if backbone is not None else (lambda images: images)
    return knn.extract_features(source, dataset, normalize=False)


def _normalizer(train_features, kind):
    if kind not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {kind!r}.")
    if kind == "standardize":
        mean = train_features.mean(0)
        std = train_features.std(0) + 1e-6  # constant (e.g. dead-ReLU) dimensions stay 0
        return lambda f: (f - mean) / std
    if kind == "l2":
        return lambda f: f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-12)
    return lambda f: f


def train_linear(train_features, train_labels, test_features, test_labels, *, num_classes,
                 epochs=100, batch_size=256, learning_rate=30.0, momentum=0.9,
                 normalize="l2", seed=0, verbose=0) -> dict:
    """The linear protocol on precomputed features.

    Args:
      train_features, test_features: [N, D] float; train_labels, test_labels: [N] int.
      epochs: lr x0.1 after 60% and 80% of them.
    Returns:
      `{"top1": test accuracy, "train_top1": ..., "epochs", "learning_rate", "normalize",
      "train_examples", "test_examples", "feature_dim", "seconds"}`.
    """
    start = time.perf_counter()
    norm = _normalizer(np.asarray(train_features, np.float32), normalize)
    x_train = norm(np.asarray(train_features, np.float32)).astype(np.float32)
    x_test = norm(np.asarray(test_features, np.float32)).astype(np.float32)
    y_train = np.asarray(train_labels, np.int32)
    y_test = np.asarray(test_labels, np.int32)

    keras.utils.set_random_seed(seed)
    steps_per_epoch = int(np.ceil(len(x_train) / batch_size))
    boundaries = [int(0.6 * epochs) * steps_per_epoch, int(0.8 * epochs) * steps_per_epoch]
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries, [learning_rate, learning_rate * 0.1, learning_rate * 0.01]
    )
    classifier = keras.Sequential([
        keras.Input((x_train.shape[1],)),
        # Initialised as the official code: weights N(0, 0.01), bias 0.
        keras.layers.Dense(num_classes, dtype="float32",
                           kernel_initializer=keras.initializers.RandomNormal(stddev=0.01)),
    ])
    classifier.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=momentum),  # no weight decay
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    classifier.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, shuffle=True,
                   verbose=verbose)

    def accuracy(x, y):
        logits = classifier.predict(x, batch_size=1024, verbose=0)
        return float(np.mean(np.argmax(logits, 1) == y))

    return {
        "top1": accuracy(x_test, y_test),
        "train_top1": accuracy(x_train, y_train),
        "epochs": int(epochs),
        "learning_rate": float(learning_rate),
        "normalize": normalize,
        "train_examples": int(len(x_train)),
        "test_examples": int(len(x_test)),
        "feature_dim": int(x_train.shape[1]),
        "seconds": round(time.perf_counter() - start, 1),
    }


def _check_images_fit(backbone, dataset, export_dir):
    """The config's images must have the export's input shape (else Keras' error comes after a
    page of traceback, from inside the feature extraction)."""
    from moco_tf.config import ConfigError

    wanted = tuple(backbone.input_shape[1:])
    given = tuple(dataset.element_spec[0].shape[1:])
    if None not in wanted and wanted != given:
        raise ConfigError(
            f"the export {export_dir} takes images of shape {list(wanted)} but the config's data "
            f"gives {list(given)}: pass the config (and overrides) it was trained with, e.g. "
            f"--config.data.image_size={wanted[0]}.")


def evaluate(export_dir, config, *, epochs=100, raw_pixels=False, normalize="l2",
             learning_rate=30.0, batch_size=256, output=None, verbose=0) -> dict:
    """Linear evaluation of an exported backbone on `config.data`; writes the JSON result.

    Args:
      export_dir: a `moco_tf.export` directory (its `backbone.keras` is loaded frozen); may be
        None with `raw_pixels=True`.
      config: the training config (its `data` section: source, splits, image size).
      raw_pixels: also (or, without `export_dir`, only) evaluate raw pixels: key
        `top1_raw_pixels` / `raw_pixels`.
      output: the JSON path; default `<export_dir>/linear_eval.json`.
    Returns:
      the dict written: `top1` and the protocol's settings (see `train_linear`).
    """
    from moco_tf import data as data_lib  # the pipelines; import here to keep the module light
    from moco_tf import export as export_lib

    d = config.data
    train_ds = data_lib.eval_dataset(d, d.train_split, config.eval.batch_size)
    test_ds = data_lib.eval_dataset(d, d.eval_split, config.eval.batch_size)
    protocol = dict(num_classes=int(d.num_classes), epochs=epochs, batch_size=batch_size,
                    learning_rate=learning_rate, normalize=normalize, seed=config.seed,
                    verbose=verbose)
    results = {}
    if export_dir:
        backbone = export_lib.load_backbone(export_dir, trainable=False)
        _check_images_fit(backbone, train_ds, export_dir)
        results = train_linear(*extract_features(backbone, train_ds),
                               *extract_features(backbone, test_ds), **protocol)
        results["export_dir"] = export_dir
    if raw_pixels:
        raw = train_linear(*extract_features(None, train_ds), *extract_features(None, test_ds),
                           **protocol)
        results["top1_raw_pixels"] = raw["top1"]
        results["raw_pixels"] = raw
        results.setdefault("top1", None)
    if not results:
        raise ValueError("linear evaluation: give an export dir, raw_pixels=True, or both.")
    output = output or (os.path.join(export_dir, "linear_eval.json") if export_dir else None)
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            json.dump(results, f, indent=2)
        results["output"] = output
    return results


def main(argv):
    del argv
    from absl import flags

    from moco_tf import cli
    from moco_tf import config as config_lib

    f = flags.FLAGS
    if not f.export and not f.raw_pixels:
        raise flags.UsageError("--export is required (or --raw_pixels for the baseline alone).")
    if not f.export and not f.output:
        raise flags.UsageError("--raw_pixels without --export needs --output.")
    try:
        config_lib.validate(f.config)
        results = evaluate(
            f.export, f.config, epochs=f.epochs, raw_pixels=f.raw_pixels, normalize=f.normalize,
            learning_rate=f.learning_rate, batch_size=f.batch_size, output=f.output,
            verbose=f.verbose,
        )
    except config_lib.ConfigError as e:  # a bad value, or a config that does not fit the export
        cli.fail("Config error", e, 2)
    except config_lib.DataError as e:
        cli.fail("Data error", e, 2)
    except FileNotFoundError as e:  # no export there
        cli.fail("Error", e, 2)
    if results.get("top1") is not None:
        print(f"Linear top-1: {100 * results['top1']:.2f}% ({results['epochs']} epochs, "
              f"normalize={results['normalize']})")
    if "top1_raw_pixels" in results:
        print(f"Linear top-1 on raw pixels: {100 * results['top1_raw_pixels']:.2f}%")
    if "output" in results:
        print(f"Written: {results['output']}")


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "The training config (configs/*.py).")
    flags.DEFINE_string("export", None, "Export dir of the pre-trained backbone.")
    flags.DEFINE_integer("epochs", 100, "Epochs of the linear classifier (MoCo: 100).")
    flags.DEFINE_float("learning_rate", 30.0, "SGD lr (MoCo: 30), x0.1 at 60% and 80%.")
    flags.DEFINE_integer("batch_size", 256, "Batch size of the linear classifier.")
    flags.DEFINE_enum("normalize", "l2", list(NORMALIZATIONS),
                      "Feature normalisation before the linear layer (none = the MoCo protocol).")
    flags.DEFINE_bool("raw_pixels", False, "Also run the protocol on raw pixels (baseline).")
    flags.DEFINE_string("output", None, "JSON path; default <export>/linear_eval.json.")
    flags.DEFINE_integer("verbose", 0, "Keras progress output of the classifier's fit.")
    flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main, flags_parser=cli.parse_flags)
