"""The KL autoencoders (the Stable Diffusion VAE, LightningDiT's VA-VAE) from local weights,
for decoding samples and for encoding a dataset (`dico_jax.data.extract`).

Weights are read in three forms: diffusers' files (a .safetensors / .bin or a model folder),
an LDM/VA-VAE PyTorch checkpoint (.pt / .ckpt), or a folder written by
`python -m dico_jax.convert vae-from-torch` (Flax params plus `vae.json`).
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from dico_jax.errors import UserError

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
    import jax.numpy as jnp

    from dico_jax.convert.vae import load_vae_weights, vae_torch_to_flax
    from dico_jax.models.vae import vae_for_kind

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
