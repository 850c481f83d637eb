"""Export of the trained (query) backbone for serving and for fine-tuning.

`export_dir/` holds two artifacts, both loadable with TensorFlow/Keras alone (no moco_tf):
  saved_model/    TF SavedModel for serving (TF Serving, TFLite, `tf.saved_model.load`);
                  `serving_default`: uint8 `[None, H, W, C]` -> {"features": float32 [None, D]}.
  backbone.keras  the Keras backbone made of plain Keras layers (`plain_keras`), for
                  fine-tuning: `keras.models.load_model` (or `load_backbone`). It takes float
                  images in [0, 1], as in training: Keras casts any other input to float32
                  before the first layer, so uint8 images must be divided by 255 first (given
                  as they are, they are computed on as values 0..255, without an error).
"""
from __future__ import annotations

import os
from typing import Sequence

import keras
import numpy as np
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
      An empty batch [0, H, W, C] gives features [0, D]. `backbone.keras` takes float32 images
      in [0, 1] only: a uint8 batch must be divided by 255 first (Keras would silently cast it
      to float 0..255).
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

    dim = int(backbone.output_shape[-1])

    def features(images):
        # Inference mode: BN moving statistics; a float32 output even under mixed precision.
        return tf.cast(backbone(images, training=False), tf.float32)

    def features_from_float(images):
        images = checked(images)
        # An empty batch (a batching client may send one) gives empty features; the backbone's
        # kernels would fail on it with a shape error naming a BN layer.
        return {"features": tf.cond(tf.shape(images)[0] > 0, lambda: features(images),
                                    lambda: tf.zeros([0, dim], tf.float32))}

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
    inference outputs: `Standardize` becomes `Normalization(mean, variance=std**2)`,
    `SplitBatchNorm` a `BatchNormalization` (they differ only in training), the ViT's `Attention`
    a `MultiHeadAttention` and its `ClassTokenAndPosition` a small graph of Keras layers.
    Loadable where moco_tf is not installed."""
    from moco_tf.models.backbones import SplitBatchNorm, Standardize
    from moco_tf.models.vit import Attention, ClassTokenAndPosition

    rebuilt = {}  # layer name -> its replacement, built with its weights already set

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
        if isinstance(layer, Attention):
            rebuilt[layer.name] = _plain_attention(layer)
            return rebuilt[layer.name]
        if isinstance(layer, ClassTokenAndPosition):
            rebuilt[layer.name] = _plain_class_token_and_position(layer)
            return rebuilt[layer.name]
        return layer.__class__.from_config(layer.get_config())

    plain = keras.models.clone_model(backbone, clone_function=clone)
    for source, target in zip(backbone.layers, plain.layers):
        if source.weights and source.name not in rebuilt:
            target.set_weights(source.get_weights())
    return plain


def _plain_attention(layer) -> keras.Model:
    """timm's `Attention` (one fused qkv kernel [D, 3D], columns ordered (q|k|v, head, d)) as
    Keras' `MultiHeadAttention` (query = key = value), named `mha` inside a model of the
    layer's name."""
    dim, heads = layer.input.shape[-1], layer.num_heads
    inputs = keras.Input(layer.input.shape[1:])
    mha = keras.layers.MultiHeadAttention(heads, dim // heads, name="mha",
                                          dtype=layer.dtype_policy)
    plain = keras.Model(inputs, mha(inputs, inputs), name=layer.name)
    qkv = np.asarray(layer.qkv_kernel).reshape(dim, 3, heads, dim // heads)
    qkv_bias = np.asarray(layer.qkv_bias).reshape(3, heads, dim // heads)
    mha.set_weights([qkv[:, 0], qkv_bias[0], qkv[:, 1], qkv_bias[1], qkv[:, 2], qkv_bias[2],
                     np.asarray(layer.proj_kernel).reshape(heads, dim // heads, dim),
                     np.asarray(layer.proj_bias)])
    return plain


def _plain_class_token_and_position(layer) -> keras.Model:
    """`ClassTokenAndPosition` from Keras layers. Keras has no layer that only holds a weight, so
    the class token is the bias of a Dense (`cls_token`, trainable) and the fixed position
    embedding the bias [1 + N, D] of an EinsumDense (`pos_embed`, frozen), both applied to zeros
    that frozen zero-kernel Dense layers make from the tokens: exact, and the class token
    fine-tunes while the position embedding stays fixed, as in the original layer."""
    tokens, dim = layer.input.shape[1:]
    policy = layer.dtype_policy

    def zeros(x, name):
        return keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros", trainable=False,
                                  name=name, dtype=policy)(x)

    inputs = keras.Input((tokens, dim))
    first = keras.layers.Cropping1D((0, tokens - 1), name="first_token", dtype=policy)(inputs)
    cls_layer = keras.layers.Dense(dim, kernel_initializer="zeros", name="cls_token", dtype=policy)
    x = keras.layers.Concatenate(axis=1, name="prepend", dtype=policy)(
        [cls_layer(zeros(first, "zeros_1")), inputs])
    pos_layer = keras.layers.EinsumDense("bti,ie->bte", output_shape=(tokens + 1, dim),
                                         bias_axes="te", kernel_initializer="zeros",
                                         trainable=False, name="pos_embed", dtype=policy)
    x = keras.layers.Add(name="add", dtype=policy)([x, pos_layer(zeros(x, "zeros_n"))])
    plain = keras.Model(inputs, x, name=layer.name)
    cls_layer.bias.assign(np.asarray(layer.cls_token).reshape(dim))
    pos_layer.bias.assign(np.asarray(layer.pos_embed)[0])
    return plain


def replaced_variables(layer) -> list | None:
    """The inverse of `_plain_attention` and `_plain_class_token_and_position`: the
    `(variable name, value)` pairs of the layer that the plain-Keras `layer` replaces, in that
    layer's layout (`qkv_kernel`, ... / `cls_token`, `pos_embed`); None for any other layer."""
    parts = {sub.name: sub for sub in getattr(layer, "layers", [])}
    if "mha" in parts:
        qk, qb, kk, kb, vk, vb, ok, ob = (np.asarray(w) for w in parts["mha"].weights)
        dim = qk.shape[0]
        return [("qkv_kernel", np.concatenate([w.reshape(dim, dim) for w in (qk, kk, vk)], 1)),
                ("qkv_bias", np.concatenate([qb.ravel(), kb.ravel(), vb.ravel()])),
                ("proj_kernel", ok.reshape(dim, dim)), ("proj_bias", ob)]
    if "cls_token" in parts and "pos_embed" in parts:
        return [("cls_token", np.asarray(parts["cls_token"].bias)[None, None]),
                ("pos_embed", np.asarray(parts["pos_embed"].bias)[None])]
    return None


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
