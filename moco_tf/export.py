"""Export of the trained (query) backbone for serving and for fine-tuning.

`export_dir/` holds two artifacts, both loadable with TensorFlow/Keras alone (no moco_tf):
  saved_model/    TF SavedModel for serving (TF Serving, TFLite, `tf.saved_model.load`);
                  `serving_default`: uint8 `[None, H, W, C]` -> {"features": float32 [None, D]}.
  backbone.keras  the Keras backbone made of plain Keras layers (`plain_keras`), for
                  fine-tuning: `keras.models.load_model` (or `load_backbone`).
"""
from __future__ import annotations

import os
from typing import Sequence

import keras
import tensorflow as tf

SAVED_MODEL_DIR = "saved_model"
KERAS_FILE = "backbone.keras"


def export_backbone(backbone: keras.Model, export_dir: str, *, image_shape: Sequence[int]) -> str:
    """Writes the SavedModel and the `.keras` file of `backbone` under `export_dir`.

    Args:
      backbone: Functional keras model, float32 images `[B, H, W, C]` in [0, 1] -> features `[B, D]`
        (it normalises internally). Pass the *query* backbone.
      export_dir: output folder (created).
      image_shape: `(H, W, C)` of the serving input.

    Returns:
      `export_dir`. Endpoints of the SavedModel:
        `serving_default(images: uint8 [None, H, W, C]) -> {"features": float32 [None, D]}`
        `features_from_float(images: float32 [None, H, W, C] in [0, 1]) -> {"features": ...}`
    """
    image_shape = tuple(int(d) for d in image_shape)
    if len(image_shape) != 3:
        raise ValueError(f"export_backbone: image_shape must be (H, W, C), got {image_shape}.")
    os.makedirs(export_dir, exist_ok=True)
    backbone = plain_keras(backbone)

    expected = f"a batch of images [N, {image_shape[0]}, {image_shape[1]}, {image_shape[2]}]"

    def checked(images):
        # A signature's input spec is not always enforced at run time: a wrong size would
        # silently give features, an unbatched image would abort the process. The check must
        # not use the rank, which TF folds from the spec: [N, H, W, C] padded to five entries
        # with zeros must read [N, H, W, C, 0].
        shape = tf.shape(images)
        padded = tf.concat([shape, tf.zeros([5], tf.int32)], 0)[:5]
        ok = tf.reduce_all(tf.equal(padded[1:], tf.constant([*image_shape, 0])))
        with tf.control_dependencies([tf.debugging.Assert(ok, [
                f"The export takes {expected} (resize the images; an unbatched image needs a "
                f"batch axis); got shape:", shape])]):
            return tf.identity(images)

    def features_from_float(images):
        # Inference mode: BN moving statistics; a float32 output even under mixed precision.
        return {"features": tf.cast(backbone(checked(images), training=False), tf.float32)}

    def serving_default(images):
        # Serving clients send raw bytes; scale exactly as the training pipeline does.
        return features_from_float(tf.cast(checked(images), tf.float32) / 255.0)

    archive = keras.export.ExportArchive()
    archive.track(backbone)
    # An explicit serving_default (TF Serving requires it); batch dimension left open.
    archive.add_endpoint(
        name="serving_default",
        fn=serving_default,
        input_signature=[tf.TensorSpec((None, *image_shape), tf.uint8, name="images")],
    )
    archive.add_endpoint(
        name="features_from_float",
        fn=features_from_float,
        input_signature=[tf.TensorSpec((None, *image_shape), tf.float32, name="images")],
    )
    archive.write_out(os.path.join(export_dir, SAVED_MODEL_DIR), verbose=False)

    backbone.save(os.path.join(export_dir, KERAS_FILE))
    return export_dir


def plain_keras(backbone: keras.Model) -> keras.Model:
    """The same backbone built from Keras' own layers only, with the same weights and the same
    inference outputs: `Standardize` becomes `Normalization(mean, variance=std**2)` and
    `SplitBatchNorm` a `BatchNormalization` (they differ only in training). Loadable where
    moco_tf is not installed."""
    from moco_tf.models.backbones import SplitBatchNorm, Standardize

    def clone(layer):
        if isinstance(layer, Standardize):
            channels = layer.input.shape[-1]
            mean = layer.mean * (channels // len(layer.mean))
            std = layer.std * (channels // len(layer.std))
            return keras.layers.Normalization(mean=mean, variance=[s * s for s in std],
                                              name=layer.name, dtype="float32")
        if isinstance(layer, SplitBatchNorm):
            config = layer.get_config()
            config.pop("num_splits")
            config["synchronized"] = False
            return keras.layers.BatchNormalization.from_config(config)
        return layer.__class__.from_config(layer.get_config())

    plain = keras.models.clone_model(backbone, clone_function=clone)
    for source, target in zip(backbone.layers, plain.layers):
        if source.weights:
            target.set_weights(source.get_weights())
    return plain


def load_backbone(path: str, trainable: bool = False) -> keras.Model:
    """Loads the `.keras` backbone from an export dir (or the `.keras` file itself).

    Usable as a layer of a new model: `trainable=False` freezes it (its BatchNormalization layers
    then also run in inference mode, as in linear evaluation); `trainable=True` fine-tunes it.
    """
    if os.path.isdir(path):
        path = os.path.join(path, KERAS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_backbone: no Keras backbone at {path}.")
    # Exports before 0.2 hold moco_tf's own layers: register them before deserialising.
    import moco_tf.models  # noqa: F401
    backbone = keras.saving.load_model(path, compile=False)
    backbone.trainable = trainable
    return backbone


def load_serving(export_dir: str):
    """Loads the SavedModel; returns a callable `uint8 images [B, H, W, C] -> features [B, D]`."""
    path = export_dir
    if not os.path.exists(os.path.join(path, "saved_model.pb")):
        path = os.path.join(export_dir, SAVED_MODEL_DIR)
    loaded = tf.saved_model.load(path)
    serve = loaded.signatures["serving_default"]

    def features(images):
        return serve(images=tf.convert_to_tensor(images, tf.uint8))["features"]

    # Keep the loaded object alive as long as the callable (the signature holds weak refs).
    features.saved_model = loaded
    return features
