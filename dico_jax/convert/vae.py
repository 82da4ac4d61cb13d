"""KL autoencoder weights (PyTorch) <-> params of `dico_jax.models.vae.AutoencoderKL`, and
`load_vae`, the one way to get the VAE (the Stable Diffusion VAE or LightningDiT's VA-VAE) that
decodes samples (sampling, evaluation) and encodes a dataset (`dico_jax.data.extract`) from
its weights.

Two namings of the same tensors are read: diffusers' (the
`diffusion_pytorch_model.safetensors` / `.bin` of `stabilityai/sd-vae-ft-ema` or
`sd-vae-ft-mse`) and LDM's (CompVis `encoder.down.0.block.1.conv1.weight`, as in the VA-VAE
release `vavae-imagenet256-f16d32-dinov2.pt` of hustvl/LightningDiT, whose training-only
entries, the loss networks and the DINOv2 alignment, are left out). Both are read from a
local path; nothing is downloaded. `vae_flax_to_torch` writes either naming back.
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
from dico_jax.errors import UserError
from dico_jax.models.vae import AutoencoderKL, vae_for_kind

WEIGHT_FILENAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# Older diffusers checkpoints (including the original sd-vae-ft-* uploads) name the attention
# projections differently; both namings hold the same tensors.
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out"}

# Entries of an LDM training checkpoint that inference does not use: the LPIPS and
# discriminator losses, the vision foundation model the VA-VAE is aligned with and the
# projection onto its features (vavae/ldm/models/autoencoder.py in hustvl/LightningDiT).
LDM_TRAINING_ONLY = ("loss.", "foundation_model.", "linear_proj.", "model_ema.")
NAMINGS = ("diffusers", "ldm")

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
        if detect_naming(state_dict["state_dict"]) == "ldm":  # an LDM/VA-VAE training checkpoint
            state_dict = state_dict["state_dict"]
            return {k: _to_numpy(v) for k, v in state_dict.items() if not k.startswith(LDM_TRAINING_ONLY)}
        raise ValueError(
            f"{path} is a training checkpoint (it has a 'state_dict' entry); "
            "use the diffusers-format diffusion_pytorch_model file of the VAE"
        )
    return {key: _to_numpy(value) for key, value in state_dict.items()}


def detect_naming(state_dict: Mapping[str, Any]) -> str:
    """"ldm" when the keys are CompVis/LDM module names (encoder.down.0...), else "diffusers"."""
    ldm = any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.", "decoder.mid."))
              for k in state_dict)
    return "ldm" if ldm else "diffusers"


def vae_torch_to_flax(
    state_dict: Mapping[str, Any], config: AutoencoderKL | Mapping[str, Any] | None = None
) -> dict:
    """Convert an AutoencoderKL state dict (diffusers' or LDM's names, told apart by the keys)
    into a Flax params tree (float32).

    ``config`` is the target `AutoencoderKL` module or a mapping of its fields (default: the
    Stable Diffusion configuration). LDM training-only entries (`LDM_TRAINING_ONLY`) are
    skipped. Raises ValueError listing every missing, unexpected or mis-shaped key with its
    expected and found shape.
    """
    module = _as_module(config)
    expected = _expected_shapes(module)
    naming = detect_naming(state_dict)
    if naming == "ldm":
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(LDM_TRAINING_ONLY)}
    levels = len(module.block_out_channels)
    by_name = {torch_name(path, naming, levels): path for path in expected}

    converted: dict[Path, np.ndarray] = {}
    source_of: dict[Path, str] = {}
    unexpected, misshaped, duplicated = [], [], []
    for key, value in state_dict.items():
        value = _to_numpy(value)
        path = by_name.get(_canonical_torch_name(key) if naming == "diffusers" else key)
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
                f"{key}: expected {_torch_shape(want, path, naming)}, found {tuple(value.shape)}"
            )
            continue
        converted[path] = flax_value
    missing = [
        f"{torch_name(path, naming, levels)} {_torch_shape(shape, path, naming)}"
        for path, shape in expected.items()
        if path not in source_of
    ]

    message = mismatch_message(
        f"state dict does not match AutoencoderKL(block_out_channels={tuple(module.block_out_channels)}, "
        f"layers_per_block={module.layers_per_block}, latent_channels={module.latent_channels}, "
        f"in_channels={module.in_channels}, out_channels={module.out_channels}, "
        f"attention_levels={tuple(module.attention_levels)}) under {naming} names", [
            ("missing keys (expected shape)", missing),
            ("unexpected keys (found shape)", unexpected),
            ("mis-shaped keys", misshaped),
            ("keys given under both the old and the new attention names", duplicated),
        ])
    if message:
        if any(k.startswith("first_stage_model.") for k in state_dict):
            message += ("\n(this is a whole latent diffusion checkpoint; give the VAE's own "
                        "weights)")
        raise ValueError(message)

    params: dict = {}
    for path, value in converted.items():
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jnp.asarray(value, jnp.float32)
    return params


def vae_flax_to_torch(params: Mapping[str, Any], naming: str = "ldm") -> dict[str, np.ndarray]:
    """The reverse of `vae_torch_to_flax`: a state dict of float32 numpy arrays in PyTorch
    layout under ``naming`` ("ldm": the VA-VAE release's names; "diffusers")."""
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {NAMINGS}, got {naming!r}")
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = {tuple(k.key for k in keys): np.asarray(leaf, np.float32) for keys, leaf in flat}
    levels = 1 + max(int(p[1].rsplit("_", 1)[1]) for p in paths if p[1].startswith("down_blocks_"))
    out = {}
    for path, value in paths.items():
        if path[-1] == "kernel" and value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)  # (kh, kw, I, O) -> (O, I, kh, kw)
        elif path[-1] == "kernel":
            value = value.T
            if naming == "ldm":  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        out[torch_name(path, naming, levels)] = np.ascontiguousarray(value)
    return out


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


def torch_name(path: Path, naming: str = "diffusers", levels: int = 4) -> str:
    """Flax path -> PyTorch key under ``naming``; ``levels`` is the number of resolutions
    (LDM numbers decoder blocks by resolution, diffusers in the order they run):
    ('encoder', 'down_blocks_0', 'resnets_1', 'conv1', 'kernel') -> diffusers
    encoder.down_blocks.0.resnets.1.conv1.weight, LDM encoder.down.0.block.1.conv1.weight."""
    leaf = "bias" if path[-1] == "bias" else "weight"
    if naming == "ldm":
        return ".".join(_ldm_parts(path[:-1], levels) + [leaf])
    parts = [re.sub(r"_(\d+)$", r".\1", p) for p in path[:-1]]
    parts = [p + ".0" if p == "to_out" else p for p in parts]
    return ".".join(parts + [leaf])


_LDM_LAYERS = {"conv_shortcut": "nin_shortcut", "group_norm": "norm", "to_q": "q", "to_k": "k",
               "to_v": "v", "to_out": "proj_out", "conv_norm_out": "norm_out",
               "downsamplers_0": "downsample", "upsamplers_0": "upsample"}
_LDM_MID = {"resnets_0": "block_1", "resnets_1": "block_2", "attentions_0": "attn_1"}


def _ldm_parts(parts: Path, levels: int) -> list[str]:
    out, i = [], 0
    while i < len(parts):
        part = parts[i]
        block = re.fullmatch(r"(down|up)_blocks_(\d+)", part)
        if block:
            kind, index = block.groups()
            # LDM's decoder.up[k] works at encoder level k; diffusers' up_blocks run lowest first.
            out += [kind, str(index if kind == "down" else levels - 1 - int(index))]
        elif part == "mid_block":
            out.append("mid")
            i += 1
            out.append(_LDM_MID[parts[i]])
        elif re.fullmatch(r"(resnets|attentions)_\d+", part):
            name, index = part.rsplit("_", 1)
            out += ["block" if name == "resnets" else "attn", index]
        else:
            out.append(_LDM_LAYERS.get(part, part))
        i += 1
    return out


def _to_flax_layout(value: np.ndarray, leaf: str, want_ndim: int) -> np.ndarray | None:
    """Torch layout -> Flax layout, or None when the rank cannot match."""
    if leaf == "kernel" and want_ndim == 4 and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)
    if leaf == "kernel" and want_ndim == 2:
        if value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]  # attention projections saved as 1x1 convs
        return value.T if value.ndim == 2 else None  # (O, I) -> (I, O)
    return value if value.ndim == want_ndim else None


def _torch_shape(flax_shape: tuple[int, ...], path: Path, naming: str) -> tuple[int, ...]:
    if path[-1] == "kernel" and len(flax_shape) == 4:
        kh, kw, i, o = flax_shape
        return (o, i, kh, kw)
    if path[-1] == "kernel" and len(flax_shape) == 2:
        return tuple(reversed(flax_shape)) + ((1, 1) if naming == "ldm" else ())
    return tuple(flax_shape)


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor; numpy has no bfloat16, so widen first
        return value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# The VAE from its weights.
#
# Weights are read in three forms: diffusers' files (a .safetensors / .bin or a model folder),
# an LDM/VA-VAE PyTorch checkpoint (.pt / .ckpt), or a folder written by
# `python -m dico_jax.convert vae-from-torch` (Flax params plus `vae.json`).


_VAE_FIELDS = ("in_channels", "out_channels", "latent_channels", "block_out_channels",
               "layers_per_block", "norm_num_groups")
# A converted VAE folder: its Flax params and what they are.
PARAMS_NAME = "params.safetensors"
INFO_NAME = "vae.json"


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


def is_converted(path: str) -> bool:
    return os.path.isfile(os.path.join(path, INFO_NAME)) and os.path.isfile(os.path.join(path, PARAMS_NAME))


def save_converted(out_dir: str, params, kind: str, architecture: dict) -> None:
    """Writes Flax `params` of a VAE of `kind` as OUT/params.safetensors + OUT/vae.json."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    tensors = {"/".join(k.key for k in keys): np.ascontiguousarray(np.asarray(v, np.float32))
               for keys, v in flat}
    save_file(tensors, os.path.join(out_dir, PARAMS_NAME) + ".tmp")
    os.replace(os.path.join(out_dir, PARAMS_NAME) + ".tmp", os.path.join(out_dir, PARAMS_NAME))
    info = {"kind": kind, "architecture": {k: list(v) if isinstance(v, tuple) else v
                                           for k, v in architecture.items()}}
    with open(os.path.join(out_dir, INFO_NAME), "w") as f:
        json.dump(info, f, indent=1)


def load_converted(path: str) -> tuple[str, dict, dict]:
    """(kind, architecture fields, params) of a `vae-from-torch` folder."""
    from safetensors.numpy import load_file

    with open(os.path.join(path, INFO_NAME)) as f:
        info = json.load(f)
    architecture = {k: tuple(v) if isinstance(v, list) else v for k, v in info["architecture"].items()}
    params: dict = {}
    for name, value in load_file(os.path.join(path, PARAMS_NAME)).items():
        node = params
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return info["kind"], architecture, params


def load_vae(path: str, dtype: str = "float32", kind: str = "sd-vae"):
    """(AutoencoderKL module computing in `dtype`, numpy params) of a VAE of `kind`
    ("sd-vae" or "va-vae") from its weights in any of the forms this module reads."""
    if os.path.isdir(path) and is_converted(path):
        saved_kind, architecture, params = load_converted(path)
        if saved_kind != kind:
            raise UserError(f"--vae_weights {path} holds a {saved_kind} but the data are {kind} "
                            "latents: give the VAE that made them")
        module = vae_for_kind(kind, **architecture, dtype=jnp.dtype(dtype))
        return module, params
    module = vae_for_kind(kind, **vae_architecture(path), dtype=jnp.dtype(dtype))
    try:
        params = vae_torch_to_flax(load_vae_weights(path), module)
    except ValueError as err:
        raise ValueError(f"--vae_weights {path} (read as a {kind}): {err}") from err
    return module, jax.tree.map(np.asarray, params)


# The AutoencoderKL fields a converted folder records.
ARCHITECTURE_FIELDS = ("in_channels", "out_channels", "latent_channels", "block_out_channels",
                       "layers_per_block", "norm_num_groups", "attention_levels", "scaling_factor")


def import_vae(src: str, out: str, kind: str) -> str:
    """PyTorch weights of a VAE of `kind` -> OUT/params.safetensors + OUT/vae.json, which
    `--vae_weights OUT` reads; returns a one-line summary."""
    module, params = load_vae(src, "float32", kind)
    architecture = {f: getattr(module, f) for f in ARCHITECTURE_FIELDS}
    save_converted(out, params, kind, architecture)
    count = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))
    return f"wrote {kind} ({count:,} parameters, {module.latent_channels} latent channels) to {out}"


def export_vae(src: str, out: str, naming: str) -> str:
    """A `vae-from-torch` folder -> a PyTorch state dict file (.pt, or .safetensors by its
    name) under `naming`; returns a one-line summary."""
    if not (os.path.isdir(src) and is_converted(src)):
        raise FileNotFoundError(f"{src} is not a converted VAE folder (no {INFO_NAME} "
                                f"and {PARAMS_NAME}); write one with vae-from-torch")
    kind, _, params = load_converted(src)
    state = vae_flax_to_torch(params, naming)
    import torch

    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if out.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(tensors, out + ".tmp")
    else:
        torch.save(tensors, out + ".tmp")
    os.replace(out + ".tmp", out)
    return f"wrote {kind} as {len(state)} {naming}-named tensors to {out}"
