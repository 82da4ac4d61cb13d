"""The Stable Diffusion AutoencoderKL from local diffusers weights, for decoding samples and
for encoding a dataset (`dico_jax.data.extract`)."""
from __future__ import annotations

import json
import os

import jax
import numpy as np

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
    import jax.numpy as jnp

    from dico_jax.convert.vae import load_vae_weights, vae_torch_to_flax
    from dico_jax.models.vae import AutoencoderKL

    module = AutoencoderKL(**vae_architecture(path), dtype=jnp.dtype(dtype))
    try:
        params = vae_torch_to_flax(load_vae_weights(path), module)
    except ValueError as err:
        raise ValueError(f"--vae_weights {path}: {err}") from err
    return module, jax.tree.map(np.asarray, params)
