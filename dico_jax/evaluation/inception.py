"""Inception-v3 of the TensorFlow FID graph (``inception-2015-12-05``) in Flax.

The layer structure is pytorch-fid's FID Inception (torchvision Inception-v3 with average
pools that ignore padding and a max pool in the last block), whose weights file
``pt_inception-2015-12-05-6726825d.pth`` is a port of the TF graph the ADM evaluator runs.
Input handling reproduces that graph: uint8-range pixels, TF1 bilinear resize to 299
(no half-pixel centres), then (x - 128) / 128.

Outputs, named after the ADM evaluator's tensors:
  pool    (N, 2048)  ``pool_3``, for FID and precision/recall;
  spatial (N, 2023)  ``mixed_6/conv`` (Mixed_6d's 1x1 branch, 17x17), first 7 channels,
                     flattened in (H, W, C) order, for sFID;
  logits  (N, 1008)  ``pool_3 @ softmax/weights`` without the bias, as ADM feeds its softmax.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dico_jax.convert.report import mismatch_message

INPUT_SIZE = 299
NUM_LOGITS = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
BN_EPSILON = 1e-3


def tf1_resize_bilinear(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """Bilinear resize of NHWC images like TF1's ``ResizeBilinear`` (align_corners=False, legacy centres).

    Source coordinate = destination index * (in / out), in float32, as the TF kernel computes it.
    """
    images = images.astype(jnp.float32)

    def axis_weights(in_size: int):
        scale = np.float32(in_size) / np.float32(size)
        src = np.arange(size, dtype=np.float32) * scale
        lower = np.floor(src)
        lerp = (src - lower).astype(np.float32)
        lo = np.clip(lower.astype(np.int64), 0, in_size - 1)
        hi = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
        return lo, hi, lerp

    y_lo, y_hi, y_lerp = axis_weights(images.shape[1])
    x_lo, x_hi, x_lerp = axis_weights(images.shape[2])
    top, bottom = images[:, y_lo], images[:, y_hi]
    x_lerp = jnp.asarray(x_lerp)[None, None, :, None]
    top = top[:, :, x_lo] + (top[:, :, x_hi] - top[:, :, x_lo]) * x_lerp
    bottom = bottom[:, :, x_lo] + (bottom[:, :, x_hi] - bottom[:, :, x_lo]) * x_lerp
    return top + (bottom - top) * jnp.asarray(y_lerp)[None, :, None, None]


def preprocess(images: jax.Array) -> jax.Array:
    """(N, H, W, 3) pixels in [0, 255] (any dtype) -> (N, 299, 299, 3) network input in [-1, 1]."""
    x = images.astype(jnp.float32)
    if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        x = tf1_resize_bilinear(x, INPUT_SIZE)
    return (x - 128.0) / 128.0


class ConvBN(nn.Module):
    """Conv (no bias) + inference batch norm (eps 1e-3) + ReLU: torchvision's BasicConv2d."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=self.strides,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=self.precision,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
        return nn.relu(x)


def _avg_pool_same(x):
    """3x3/1 average pool that, like TF's, excludes padding from the count."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nn.Module):
    pool_features: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        def cb(f, k, p, name):
            return ConvBN(f, k, padding=p, precision=self.precision, name=name)

        b1 = cb(64, (1, 1), (0, 0), "branch1x1")(x)
        b5 = cb(48, (1, 1), (0, 0), "branch5x5_1")(x)
        b5 = cb(64, (5, 5), (2, 2), "branch5x5_2")(b5)
        b3 = cb(64, (1, 1), (0, 0), "branch3x3dbl_1")(x)
        b3 = cb(96, (3, 3), (1, 1), "branch3x3dbl_2")(b3)
        b3 = cb(96, (3, 3), (1, 1), "branch3x3dbl_3")(b3)
        bp = cb(self.pool_features, (1, 1), (0, 0), "branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        b3 = ConvBN(384, (3, 3), strides=2, precision=self.precision, name="branch3x3")(x)
        bd = ConvBN(64, (1, 1), precision=self.precision, name="branch3x3dbl_1")(x)
        bd = ConvBN(96, (3, 3), padding=(1, 1), precision=self.precision, name="branch3x3dbl_2")(bd)
        bd = ConvBN(96, (3, 3), strides=2, precision=self.precision, name="branch3x3dbl_3")(bd)
        bp = nn.max_pool(x, (3, 3), strides=(2, 2))
        return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
    """Returns (block output, its 1x1 branch); the branch of Mixed_6d is ADM's ``mixed_6/conv``."""

    channels_7x7: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7

        def cb(f, k, p, name):
            return ConvBN(f, k, padding=p, precision=self.precision, name=name)

        b1 = cb(192, (1, 1), (0, 0), "branch1x1")(x)
        b7 = cb(c7, (1, 1), (0, 0), "branch7x7_1")(x)
        b7 = cb(c7, (1, 7), (0, 3), "branch7x7_2")(b7)
        b7 = cb(192, (7, 1), (3, 0), "branch7x7_3")(b7)
        bd = cb(c7, (1, 1), (0, 0), "branch7x7dbl_1")(x)
        bd = cb(c7, (7, 1), (3, 0), "branch7x7dbl_2")(bd)
        bd = cb(c7, (1, 7), (0, 3), "branch7x7dbl_3")(bd)
        bd = cb(c7, (7, 1), (3, 0), "branch7x7dbl_4")(bd)
        bd = cb(192, (1, 7), (0, 3), "branch7x7dbl_5")(bd)
        bp = cb(192, (1, 1), (0, 0), "branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        def cb(f, k, p, s, name):
            return ConvBN(f, k, strides=s, padding=p, precision=self.precision, name=name)

        b3 = cb(192, (1, 1), (0, 0), 1, "branch3x3_1")(x)
        b3 = cb(320, (3, 3), (0, 0), 2, "branch3x3_2")(b3)
        b7 = cb(192, (1, 1), (0, 0), 1, "branch7x7x3_1")(x)
        b7 = cb(192, (1, 7), (0, 3), 1, "branch7x7x3_2")(b7)
        b7 = cb(192, (7, 1), (3, 0), 1, "branch7x7x3_3")(b7)
        b7 = cb(192, (3, 3), (0, 0), 2, "branch7x7x3_4")(b7)
        bp = nn.max_pool(x, (3, 3), strides=(2, 2))
        return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
    """The last two blocks; the final one (FID graph quirk) pools with max instead of average."""

    max_pool_branch: bool
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        def cb(f, k, p, name):
            return ConvBN(f, k, padding=p, precision=self.precision, name=name)

        b1 = cb(320, (1, 1), (0, 0), "branch1x1")(x)
        b3 = cb(384, (1, 1), (0, 0), "branch3x3_1")(x)
        b3 = jnp.concatenate(
            [cb(384, (1, 3), (0, 1), "branch3x3_2a")(b3), cb(384, (3, 1), (1, 0), "branch3x3_2b")(b3)],
            axis=-1,
        )
        bd = cb(448, (1, 1), (0, 0), "branch3x3dbl_1")(x)
        bd = cb(384, (3, 3), (1, 1), "branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [cb(384, (1, 3), (0, 1), "branch3x3dbl_3a")(bd), cb(384, (3, 1), (1, 0), "branch3x3dbl_3b")(bd)],
            axis=-1,
        )
        if self.max_pool_branch:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_same(x)
        bp = cb(192, (1, 1), (0, 0), "branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """Feature network of the ADM evaluator. Call on (N, H, W, 3) pixels in [0, 255]."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, images) -> dict[str, jax.Array]:
        p = self.precision
        x = preprocess(images)
        x = ConvBN(32, (3, 3), strides=2, precision=p, name="Conv2d_1a_3x3")(x)
        x = ConvBN(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)
        x = ConvBN(64, (3, 3), padding=(1, 1), precision=p, name="Conv2d_2b_3x3")(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
        x = ConvBN(80, (1, 1), precision=p, name="Conv2d_3b_1x1")(x)
        x = ConvBN(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
        x = InceptionA(32, precision=p, name="Mixed_5b")(x)
        x = InceptionA(64, precision=p, name="Mixed_5c")(x)
        x = InceptionA(64, precision=p, name="Mixed_5d")(x)
        x = InceptionB(precision=p, name="Mixed_6a")(x)
        x, _ = InceptionC(128, precision=p, name="Mixed_6b")(x)
        x, _ = InceptionC(160, precision=p, name="Mixed_6c")(x)
        x, mixed_6_conv = InceptionC(160, precision=p, name="Mixed_6d")(x)
        x, _ = InceptionC(192, precision=p, name="Mixed_6e")(x)
        x = InceptionD(precision=p, name="Mixed_7a")(x)
        x = InceptionE(max_pool_branch=False, precision=p, name="Mixed_7b")(x)
        x = InceptionE(max_pool_branch=True, precision=p, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(NUM_LOGITS, use_bias=False, precision=p, name="fc")(pool)
        spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(mixed_6_conv.shape[0], -1)
        return {"pool": pool, "spatial": spatial, "logits": logits}


# --- weights ---------------------------------------------------------------------------------

# Entries of the PyTorch file that the ADM feature graph does not use: ADM's softmax multiplies
# by the weights only, and BatchNorm's step counter carries no weight.
_UNUSED_TORCH_SUFFIXES = ("num_batches_tracked",)
_UNUSED_TORCH_KEYS = ("fc.bias",)


def _variable_shapes(model: FIDInceptionV3) -> dict[str, Any]:
    dummy = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), dummy)


def _torch_name(collection: str, path: Sequence[str]) -> str:
    *modules, leaf = path
    prefix = ".".join(modules)
    if collection == "batch_stats":
        return f"{prefix}.running_{leaf}"  # mean -> running_mean, var -> running_var
    torch_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
    return f"{prefix}.{torch_leaf}"


def _to_flax_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 4:  # conv (O, I, kh, kw) -> (kh, kw, I, O)
        return np.transpose(array, (2, 3, 1, 0))
    if leaf == "kernel" and array.ndim == 2:  # linear (out, in) -> (in, out)
        return array.T
    return array


def convert_torch_state_dict(state_dict: Mapping[str, Any], source: str = "state dict") -> dict[str, Any]:
    """pytorch-fid FID Inception state dict (tensors or arrays) -> Flax variables for FIDInceptionV3."""
    arrays = {
        name: np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, np.float32)
        for name, value in state_dict.items()
        if not name.endswith(_UNUSED_TORCH_SUFFIXES) and name not in _UNUSED_TORCH_KEYS
    }
    shapes = _variable_shapes(FIDInceptionV3())
    used, missing, wrong = set(), [], []

    def fill(path, spec):
        collection, *rest = [k.key for k in path]
        name = _torch_name(collection, rest)
        if name not in arrays:
            missing.append(name)
            return None
        value = _to_flax_layout(arrays[name], rest[-1])
        used.add(name)
        if value.shape != spec.shape:
            wrong.append(f"{name}: expected {spec.shape} (Flax layout), found {value.shape}")
            return None
        return jnp.asarray(value)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    unexpected = sorted(set(arrays) - used)
    message = mismatch_message(f"{source} is not pytorch-fid's FID Inception-v3 state dict", [
        ("missing keys", missing),
        ("keys of the wrong shape", wrong),
        ("unexpected keys", unexpected),
    ])
    if message:
        raise ValueError(message)
    return variables


def load_pytorch_fid_weights(path: str) -> dict[str, Any]:
    """Reads ``pt_inception-2015-12-05-6726825d.pth`` (or a compatible file) into Flax variables."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights file not found: {path}")
    import torch  # only the weight conversion needs PyTorch

    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for non-checkpoint files
        raise ValueError(f"{path} is not a PyTorch state dict file: {err}") from err
    if isinstance(state_dict, Mapping) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    return convert_torch_state_dict(state_dict, source=path)
