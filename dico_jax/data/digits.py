"""The built-in dataset: scikit-learn's bundled 8x8 handwritten digits as 1-channel "latents".

It needs no download, so the whole training path runs on a fresh machine. Pixels (0..16) are
scaled to [-1, 1]; the flip view is stored for a uniform format, but digits are not
flip-symmetric, so configs training on them turn random flips off.
"""
from __future__ import annotations

import os

import numpy as np
from etils import epath

from dico_jax.data import records

NUM_CLASSES = 10
NUM_EXAMPLES = 1797
LATENT_SHAPE = (8, 8, 1)


def default_digits_dir(workdir: str | None = None) -> str:
    """``workdir/digits`` when given, else ``$XDG_CACHE_HOME`` (or ~/.cache) ``/dico_jax/digits``."""
    if workdir:
        return os.path.join(workdir, "digits")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "dico_jax", "digits")


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Returns (images (1797, 8, 8, 1) float32 in [-1, 1], labels (1797,) int)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    return images, bunch.target.astype(np.int64)


def build_digits_dataset(out_dir: str | None = None, shard_size: int = 512) -> records.Manifest:
    """Writes the digits dataset to ``out_dir`` unless a valid one is already there."""
    out_dir = out_dir or default_digits_dir()
    if epath.Path(out_dir, records.MANIFEST_NAME).exists():
        try:
            manifest = records.validate_dataset(out_dir)
            if manifest.count == NUM_EXAMPLES and manifest.latent_shape == LATENT_SHAPE:
                return manifest
        except (records.DataFormatError, OSError):
            pass  # damaged or foreign: rewrite it below
    images, labels = digits_arrays()
    views = np.stack([images, images[:, :, ::-1]], axis=1)[:, :, None]  # (N, views, parts=1, 8, 8, 1)
    return records.write_dataset(
        out_dir,
        np.ascontiguousarray(views),
        labels,
        num_classes=NUM_CLASSES,
        storage="sample",
        scale_factor=1.0,
        vae="none",
        image_size=8,
        shard_size=shard_size,
        source="sklearn.datasets.load_digits",
    )
