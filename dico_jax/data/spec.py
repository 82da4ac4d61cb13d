"""What a config trains on, known before any data is read: the shape of one latent, the
classes, and whether latents are pixels or latents of which VAE (with their normalisation).

A dataset directory with a manifest says it exactly; otherwise the config does: the built-in
digits are 8x8x1 pixels in 10 classes, anything else is ImageNet through `config.vae`: the SD
VAE (4 x resolution/8 squared) or the VA-VAE (32 x resolution/16 squared), 1,000 classes. Training checks the real manifest against the
config (`train.check_data_matches_config`); planning and sampling read this.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from etils import epath

from dico_jax.data import digits, records
from dico_jax.errors import UserError

# Downsampling factor and latent channels of each VAE kind.
VAE_GEOMETRY = {"sd-vae": (8, 4), "va-vae": (16, 32)}


@dataclasses.dataclass(frozen=True)
class DataSpec:
    latent_shape: tuple[int, int, int]  # (H, W, C) the network denoises
    num_classes: int
    vae: bool  # True: VAE latents to decode; False: pixels in [-1, 1]
    scale_factor: float  # latents were multiplied by this before training
    vae_kind: str = "sd-vae"  # which VAE decodes them (when `vae`)
    # Per-channel statistics the latents were normalised with, (z - mean) / std, after the
    # scale; None: no normalisation.
    latent_mean: tuple[float, ...] | None = None
    latent_std: tuple[float, ...] | None = None

    def to_vae_latents(self, x):
        """The network's latents -> the VAE's: undoes the normalisation, then the scale."""
        if self.latent_mean is not None:
            import numpy as np

            x = x * np.asarray(self.latent_std, np.float32) + np.asarray(self.latent_mean, np.float32)
        return x / self.scale_factor


def from_manifest(manifest: records.Manifest) -> DataSpec:
    vae = not manifest.pixels
    return DataSpec(tuple(manifest.latent_shape), int(manifest.num_classes), vae,
                    manifest.scale_factor if vae else 1.0, manifest.kind or "sd-vae",
                    manifest.latent_mean, manifest.latent_std)


def check_vae_kind(config: Mapping[str, Any], manifest: records.Manifest, where: str) -> None:
    """One clear error when the latents in `where` are not of the VAE `config.vae` names."""
    want = config.get("vae") or "sd-vae"
    if want not in VAE_GEOMETRY:
        raise UserError(f"config.vae={want!r}: unknown; valid: {', '.join(VAE_GEOMETRY)}")
    if not manifest.pixels and manifest.kind != want:
        raise UserError(f"config.vae={want!r} but {where} holds {manifest.kind} latents (manifest "
                        f"field 'vae_kind'): set --config.vae={manifest.kind} or point "
                        "config.data.dir at latents of that VAE")
    if manifest.kind == "va-vae" and manifest.latent_mean is None:
        raise UserError(f"{where} holds va-vae latents without the per-channel statistics "
                        "(manifest fields 'latent_mean', 'latent_std'): extract them again with "
                        "`python -m dico_jax.data.extract --vae va-vae`")


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
        manifest = records.read_manifest(data_dir)
        check_vae_kind(config, manifest, data_dir)
        return from_manifest(manifest)
    builtin = data.get("builtin") or ""
    if builtin == "digits":
        return DataSpec(digits.LATENT_SHAPE, digits.NUM_CLASSES, False, 1.0)
    if builtin:
        raise ValueError(f"config.data.builtin={builtin!r}: unknown; valid: 'digits'")
    kind = config.get("vae") or "sd-vae"
    if kind not in VAE_GEOMETRY:
        raise UserError(f"config.vae={kind!r}: unknown; valid: {', '.join(VAE_GEOMETRY)}")
    downsample, channels = VAE_GEOMETRY[kind]
    side = int(config["resolution"]) // downsample
    return DataSpec((side, side, int(model.get("in_channels") or channels)),
                    int(model.get("num_classes") or 1000), True,
                    SD_VAE_SCALING_FACTOR if kind == "sd-vae" else 1.0, kind, *saved_stats(config))


def saved_stats(config: Mapping[str, Any]) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """The latent statistics a run saved in its config (`train.resolve_config`), else Nones."""
    data = config.get("data") or {}
    mean, std = data.get("latent_mean"), data.get("latent_std")
    if mean is None or std is None:
        return None, None
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
