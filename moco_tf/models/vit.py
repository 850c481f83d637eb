"""Vision Transformers as MoCo v3 trains them (facebookresearch/moco-v3 `vits.py`, on timm's
`VisionTransformer`): ViT-S/16, ViT-B/16, and a tiny one for tests.

`build_vit(name, input_shape)` returns a functional `keras.Model`: float32 images `[B, H, W, C]`
in [0, 1] -> the class token's features after the final LayerNorm `[B, D]` (timm's
`forward_features(x)[:, 0]`, what moco-v3 feeds its projector). Layer and weight names follow
timm's `state_dict`, so official checkpoints map mechanically (`convert/torch_moco.py`):

    patch_embed.proj (Conv2d, stride = patch), embed {cls_token, pos_embed},
    blocks.<i>.norm1, blocks.<i>.attn {qkv, proj}, blocks.<i>.norm2,
    blocks.<i>.mlp.fc1, blocks.<i>.mlp.fc2, norm                    (LayerNorm eps 1e-6)

MoCo v3's choices: a fixed 2-D sin-cos position embedding (not trained), the patch projection
frozen at its random init (`stop_grad_conv1`: "random patch projection" stabilises training),
exact GELU, qkv with bias, moco-v3's initialisation (xavier-uniform; qkv as three matrices).

Why not keras-hub's ViT: its weight layout (separate q/k/v kernels, its own names) does not map
one-to-one onto timm's fused `qkv`, and its position embedding is learned; moco-v3's fixed
sin-cos embedding and frozen patch projection would both need patching. Writing the ~100 lines
keeps the layout the official checkpoints have.
"""
import math

import keras
import numpy as np
from keras import ops

from moco_tf.models.backbones import Standardize

VITS = {  # name -> (embed_dim, depth, num_heads)
    "vit_tiny": (64, 2, 4),  # tests and smoke runs
    "vit_small": (384, 12, 12),
    "vit_base": (768, 12, 12),
}
LN_EPSILON = 1e-6  # timm: partial(nn.LayerNorm, eps=1e-6)


def sincos_position_embedding(grid_h, grid_w, dim, temperature=10000.0):
    """moco-v3's fixed 2-D sin-cos embedding [1 + grid_h * grid_w, dim]; row 0 (the class token)
    is zeros. Transcribed from `build_2d_sincos_position_embedding`, quirk included: its
    `torch.meshgrid(grid_w, grid_h)` flattens w-major, while patches are numbered row-major."""
    if dim % 4:
        raise ValueError(
            f"embed_dim must be divisible by 4 for the 2-D sin-cos embedding, got {dim}")
    gw, gh = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32),
                         indexing="ij")
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (np.arange(pos_dim, dtype=np.float32) / pos_dim)
    out_w = gw.reshape(-1)[:, None] * omega[None]
    out_h = gh.reshape(-1)[:, None] * omega[None]
    emb = np.concatenate([np.sin(out_w), np.cos(out_w), np.sin(out_h), np.cos(out_h)], axis=1)
    return np.concatenate([np.zeros((1, dim), np.float32), emb], axis=0).astype(np.float32)


@keras.saving.register_keras_serializable(package="moco_tf")
class ClassTokenAndPosition(keras.layers.Layer):
    """Prepends the class token and adds the (fixed) position embedding: [B, N, D] -> [B, 1+N, D].

    Weights: `cls_token` [1, 1, D] (trained, init N(0, 1e-6)) and `pos_embed` [1, 1+N, D]
    (moco-v3's fixed 2-D sin-cos, not trained)."""

    def __init__(self, grid, **kwargs):
        super().__init__(**kwargs)
        self.grid = tuple(int(g) for g in grid)

    def build(self, input_shape):
        dim = input_shape[-1]
        self.cls_token = self.add_weight(
            shape=(1, 1, dim), initializer=keras.initializers.RandomNormal(stddev=1e-6),
            name="cls_token")
        table = sincos_position_embedding(*self.grid, dim)[None]
        self.pos_embed = self.add_weight(
            shape=table.shape, initializer=keras.initializers.Constant(table), trainable=False,
            name="pos_embed")

    def call(self, x):
        cls = ops.broadcast_to(ops.cast(self.cls_token, x.dtype), (ops.shape(x)[0], 1, x.shape[-1]))
        return ops.concatenate([cls, x], axis=1) + ops.cast(self.pos_embed, x.dtype)

    def get_config(self):
        return {**super().get_config(), "grid": self.grid}


@keras.saving.register_keras_serializable(package="moco_tf")
class Attention(keras.layers.Layer):
    """timm's `Attention`: one `qkv` projection [D -> 3D] (bias), softmax(q k^T / sqrt(d)) v per
    head, then `proj` [D -> D]. Kernels are [in, out] (torch's transposed)."""

    def __init__(self, num_heads, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)

    def build(self, input_shape):
        dim = input_shape[-1]
        # moco-v3: uniform(+-sqrt(6 / (D + D))) — qkv treated as three D x D matrices.
        limit = math.sqrt(6.0 / (dim + dim))
        uniform = keras.initializers.RandomUniform(-limit, limit)
        self.qkv_kernel = self.add_weight(shape=(dim, 3 * dim), initializer=uniform,
                                          name="qkv_kernel")
        self.qkv_bias = self.add_weight(shape=(3 * dim,), initializer="zeros", name="qkv_bias")
        self.proj_kernel = self.add_weight(shape=(dim, dim), initializer="glorot_uniform",
                                           name="proj_kernel")
        self.proj_bias = self.add_weight(shape=(dim,), initializer="zeros", name="proj_bias")

    def call(self, x):
        batch, tokens, dim = ops.shape(x)[0], ops.shape(x)[1], x.shape[-1]
        heads, head_dim = self.num_heads, x.shape[-1] // self.num_heads
        qkv = ops.matmul(x, ops.cast(self.qkv_kernel, x.dtype)) + ops.cast(self.qkv_bias, x.dtype)
        qkv = ops.transpose(ops.reshape(qkv, (batch, tokens, 3, heads, head_dim)), (2, 0, 3, 1, 4))
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, heads, N, head_dim]
        attn = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * (head_dim ** -0.5)
        attn = ops.cast(ops.softmax(ops.cast(attn, "float32"), axis=-1), x.dtype)
        out = ops.reshape(ops.transpose(ops.matmul(attn, v), (0, 2, 1, 3)), (batch, tokens, dim))
        return ops.matmul(out, ops.cast(self.proj_kernel, x.dtype)) + ops.cast(self.proj_bias,
                                                                                x.dtype)

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads}


def build_vit(name, input_shape, *, patch_size=16, mean=None, std=None, stop_grad_conv1=True,
              mlp_ratio=4):
    """A ViT backbone `keras.Model`: images `[B, H, W, C]` in [0, 1] -> class-token features
    `[B, D]` (D: 384 vit_small, 768 vit_base, 64 vit_tiny).

    Args:
      name: a key of `VITS`.
      input_shape: `(H, W, C)`, H and W multiples of `patch_size`.
      stop_grad_conv1: keep the random patch projection fixed (moco-v3's ViT recipe).
    """
    if name not in VITS:
        raise ValueError(f"Unknown ViT {name!r}; choose from {sorted(VITS)}.")
    dim, depth, heads = VITS[name]
    h, w, _ = input_shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"{name}: image size {h}x{w} is not a multiple of the patch size "
                         f"{patch_size}.")
    inputs = keras.Input(shape=tuple(input_shape), name="images")
    x = Standardize(0.0 if mean is None else mean, 1.0 if std is None else std,
                    name="normalize")(inputs)
    # moco-v3: xavier-uniform over fan_in = C * p * p, fan_out = D.
    fan = input_shape[-1] * patch_size * patch_size + dim
    limit = math.sqrt(6.0 / fan)
    proj = keras.layers.Conv2D(dim, patch_size, strides=patch_size, name="patch_embed.proj",
                               kernel_initializer=keras.initializers.RandomUniform(-limit, limit))
    x = proj(x)
    proj.trainable = not stop_grad_conv1
    x = keras.layers.Reshape((-1, dim), name="patch_embed.flatten")(x)
    x = ClassTokenAndPosition((h // patch_size, w // patch_size), name="embed")(x)
    dense = dict(kernel_initializer="glorot_uniform", bias_initializer="zeros")
    for i in range(depth):
        prefix = f"blocks.{i}"
        y = keras.layers.LayerNormalization(epsilon=LN_EPSILON, name=f"{prefix}.norm1")(x)
        x = keras.layers.Add(name=f"{prefix}.add1")([x, Attention(heads, name=f"{prefix}.attn")(y)])
        y = keras.layers.LayerNormalization(epsilon=LN_EPSILON, name=f"{prefix}.norm2")(x)
        y = keras.layers.Dense(dim * mlp_ratio, name=f"{prefix}.mlp.fc1", **dense)(y)
        y = keras.layers.Activation("gelu", name=f"{prefix}.mlp.act")(y)  # exact, as nn.GELU
        y = keras.layers.Dense(dim, name=f"{prefix}.mlp.fc2", **dense)(y)
        x = keras.layers.Add(name=f"{prefix}.add2")([x, y])
    x = keras.layers.LayerNormalization(epsilon=LN_EPSILON, name="norm", dtype="float32")(x)
    tokens = (h // patch_size) * (w // patch_size)
    x = keras.layers.Cropping1D((0, tokens), name="cls", dtype="float32")(x)  # the class token
    features = keras.layers.Flatten(name="features", dtype="float32")(x)
    return keras.Model(inputs, features, name=name)
