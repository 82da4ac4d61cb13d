"""What a config trains on, known before any data is read: the shape of one latent, the
classes, and whether latents are SD-VAE latents or pixels.

A dataset directory with a manifest says it exactly; otherwise the config does: the built-in
digits are 8x8x1 pixels in 10 classes, anything else is ImageNet through the SD VAE
(4 x resolution/8 squared, 1,000 classes). Training checks the real manifest against the
config (`train.check_data_matches_config`); planning and sampling read this.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from etils import epath

from dico_jax.data import digits, records

SD_VAE_DOWNSAMPLE = 8


@dataclasses.dataclass(frozen=True)
class DataSpec:
    latent_shape: tuple[int, int, int]  # (H, W, C) the network denoises
    num_classes: int
    vae: bool  # True: SD-VAE latents to decode; False: pixels in [-1, 1]
    scale_factor: float  # latents were multiplied by this before training


def from_manifest(manifest: records.Manifest) -> DataSpec:
    vae = not manifest.pixels
    return DataSpec(tuple(manifest.latent_shape), int(manifest.num_classes), vae,
                    manifest.scale_factor if vae else 1.0)


def manifest_dir(config: Mapping[str, Any]) -> str:
    """config.data.dir when it holds a dataset manifest, else ''."""
    data_dir = (config.get("data") or {}).get("dir") or ""
    has_manifest = data_dir and epath.Path(data_dir, records.MANIFEST_NAME).is_file()
    return data_dir if has_manifest else ""


def from_config(config: Mapping[str, Any]) -> DataSpec:
    """From config.data.dir's manifest when there is one, else from the config alone."""
    from dico_jax.models.vae import SD_VAE_SCALING_FACTOR

    data, model = config.get("data") or {}, config.get("model") or {}
    data_dir = manifest_dir(config)
    if data_dir:
        return from_manifest(records.read_manifest(data_dir))
    builtin = data.get("builtin") or ""
    if builtin == "digits":
        return DataSpec(digits.LATENT_SHAPE, digits.NUM_CLASSES, False, 1.0)
    if builtin:
        raise ValueError(f"config.data.builtin={builtin!r}: unknown; valid: 'digits'")
    side = int(config["resolution"]) // SD_VAE_DOWNSAMPLE
    return DataSpec((side, side, int(model.get("in_channels") or 4)),
                    int(model.get("num_classes") or 1000), True, SD_VAE_SCALING_FACTOR)
