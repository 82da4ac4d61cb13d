"""diffusers AutoencoderKL weights (PyTorch) -> params of `dico_jax.models.vae.AutoencoderKL`,
and `load_vae`, the one way to get the VAE that decodes samples (sampling, evaluation) and
encodes a dataset (`dico_jax.data.extract`) from its weights.

Reads the `diffusion_pytorch_model.safetensors` / `.bin` of `stabilityai/sd-vae-ft-ema` or
`sd-vae-ft-mse` from a local path; nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dico_jax.convert.report import mismatch_message
from dico_jax.models.vae import AutoencoderKL

WEIGHT_FILENAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# Older diffusers checkpoints (including the original sd-vae-ft-* uploads) name the attention
# projections differently; both namings hold the same tensors.
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out"}

Path = tuple[str, ...]


def load_vae_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a diffusers AutoencoderKL state dict from a .safetensors/.bin file or a model folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        candidates = [os.path.join(d, f) for d in (path, os.path.join(path, "vae")) for f in WEIGHT_FILENAMES]
        found = [c for c in candidates if os.path.isfile(c)]
        if not found:
            raise FileNotFoundError(f"no VAE weights in folder {path}: looked for {', '.join(candidates)}")
        path = found[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VAE weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        state_dict = {}
        try:
            # The torch framework reads every dtype (bf16/fp16 included); numpy lacks bf16.
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    state_dict[key] = f.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"cannot read safetensors file {path}: {e}") from e
    elif path.endswith((".bin", ".pt", ".pth", ".ckpt")):
        import torch

        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot read PyTorch weights file {path}: {e}") from e
    else:
        raise ValueError(f"unknown VAE weights format {path}: expected .safetensors or .bin")
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, expected a state dict of tensors")
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        raise ValueError(
            f"{path} is a training checkpoint (it has a 'state_dict' entry); "
            "use the diffusers-format diffusion_pytorch_model file of the VAE"
        )
    return {key: _to_numpy(value) for key, value in state_dict.items()}


def vae_torch_to_flax(
    state_dict: Mapping[str, Any], config: AutoencoderKL | Mapping[str, Any] | None = None
) -> dict:
    """Convert a diffusers AutoencoderKL state dict into a Flax params tree (float32).

    ``config`` is the target `AutoencoderKL` module or a mapping of its fields (default: the
    Stable Diffusion configuration). Raises ValueError listing every missing, unexpected or
    mis-shaped key with its expected and found shape.
    """
    module = _as_module(config)
    expected = _expected_shapes(module)
    by_name = {_torch_name(path): path for path in expected}

    converted: dict[Path, np.ndarray] = {}
    source_of: dict[Path, str] = {}
    unexpected, misshaped, duplicated = [], [], []
    for key, value in state_dict.items():
        value = _to_numpy(value)
        path = by_name.get(_canonical_torch_name(key))
        if path is None:
            unexpected.append(f"{key} {tuple(value.shape)}")
            continue
        if path in source_of:
            duplicated.append(f"{key} and {source_of[path]}")
            continue
        source_of[path] = key
        want = expected[path]
        flax_value = _to_flax_layout(value, path[-1], len(want))
        if flax_value is None or flax_value.shape != want:
            misshaped.append(
                f"{key}: expected {_torch_shape(want, path[-1])}, found {tuple(value.shape)}"
            )
            continue
        converted[path] = flax_value
    missing = [
        f"{_torch_name(path)} {_torch_shape(shape, path[-1])}"
        for path, shape in expected.items()
        if path not in source_of
    ]

    message = mismatch_message(
        f"state dict does not match AutoencoderKL(block_out_channels={tuple(module.block_out_channels)}, "
        f"layers_per_block={module.layers_per_block}, latent_channels={module.latent_channels}, "
        f"in_channels={module.in_channels}, out_channels={module.out_channels})", [
            ("missing keys (expected shape)", missing),
            ("unexpected keys (found shape)", unexpected),
            ("mis-shaped keys", misshaped),
            ("keys given under both the old and the new attention names", duplicated),
        ])
    if message:
        if any(k.startswith(("first_stage_model.", "encoder.down.")) for k in state_dict):
            message += ("\n(this looks like an original CompVis/LDM checkpoint; use the "
                        "diffusers-format VAE file)")
        raise ValueError(message)

    params: dict = {}
    for path, value in converted.items():
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jnp.asarray(value, jnp.float32)
    return params


def _as_module(config) -> AutoencoderKL:
    if config is None:
        return AutoencoderKL()
    if isinstance(config, AutoencoderKL):
        return config
    if isinstance(config, Mapping):
        return AutoencoderKL(**dict(config))
    raise TypeError(f"config must be an AutoencoderKL, a mapping of its fields or None, got {type(config)}")


def _expected_shapes(module: AutoencoderKL) -> dict[Path, tuple[int, ...]]:
    size = 2 * module.downsample_factor
    images = jax.ShapeDtypeStruct((1, size, size, module.in_channels), jnp.float32)
    variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), images)
    flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    return {tuple(k.key for k in keys): tuple(leaf.shape) for keys, leaf in flat}


def _canonical_torch_name(key: str) -> str:
    """Rename old attention projections (query/key/value/proj_attn) to today's diffusers names."""
    parts = key.split(".")
    if len(parts) >= 3 and parts[-2] in _OLD_ATTENTION_NAMES and "attentions" in parts:
        new = _OLD_ATTENTION_NAMES[parts[-2]]
        parts[-2:-1] = [new, "0"] if new == "to_out" else [new]
    return ".".join(parts)


def _torch_name(path: Path) -> str:
    """Flax path -> diffusers key: ('encoder', 'down_blocks_0', 'conv1', 'kernel') -> encoder.down_blocks.0.conv1.weight."""
    parts = [re.sub(r"_(\d+)$", r".\1", p) for p in path[:-1]]
    parts = [p + ".0" if p == "to_out" else p for p in parts]
    leaf = "bias" if path[-1] == "bias" else "weight"
    return ".".join(parts + [leaf])


def _to_flax_layout(value: np.ndarray, leaf: str, want_ndim: int) -> np.ndarray | None:
    """Torch layout -> Flax layout, or None when the rank cannot match."""
    if leaf == "kernel" and want_ndim == 4 and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)
    if leaf == "kernel" and want_ndim == 2:
        if value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]  # attention projections saved as 1x1 convs
        return value.T if value.ndim == 2 else None  # (O, I) -> (I, O)
    return value if value.ndim == want_ndim else None


def _torch_shape(flax_shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    if leaf == "kernel" and len(flax_shape) == 4:
        kh, kw, i, o = flax_shape
        return (o, i, kh, kw)
    if leaf == "kernel" and len(flax_shape) == 2:
        return tuple(reversed(flax_shape))
    return tuple(flax_shape)


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor; numpy has no bfloat16, so widen first
        return value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# The VAE from its weights.


_VAE_FIELDS = ("in_channels", "out_channels", "latent_channels", "block_out_channels",
               "layers_per_block", "norm_num_groups")


def vae_architecture(path: str) -> dict:
    """AutoencoderKL fields from the diffusers `config.json` beside the weights, if any
    (the Stable Diffusion VAE's otherwise)."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    for candidate in (os.path.join(folder, "config.json"), os.path.join(folder, "vae", "config.json")):
        if os.path.isfile(candidate):
            with open(candidate) as f:
                raw = json.load(f)
            fields = {k: raw[k] for k in _VAE_FIELDS if k in raw}
            if "block_out_channels" in fields:
                fields["block_out_channels"] = tuple(fields["block_out_channels"])
            return fields
    return {}


def load_vae(path: str, dtype: str = "float32"):
    """(AutoencoderKL module computing in `dtype`, numpy params) from diffusers weights
    (a .safetensors / .bin file or a model folder)."""
    module = AutoencoderKL(**vae_architecture(path), dtype=jnp.dtype(dtype))
    try:
        params = vae_torch_to_flax(load_vae_weights(path), module)
    except ValueError as err:
        raise ValueError(f"--vae_weights {path}: {err}") from err
    return module, jax.tree.map(np.asarray, params)
