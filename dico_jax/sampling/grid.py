"""Sample grids as PNG files: the class-conditional grids drawn during training (one row per
class) and the preview of an `.npz` run."""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from dico_jax.sampling.sampler import Settings, make_sample_fn, to_uint8

__all__ = ["image_grid", "make_grid_sampler", "to_uint8", "write_grid", "write_png"]


def make_grid_sampler(model: Any, config: Any, latent_shape: tuple[int, int, int],
                      mesh: jax.sharding.Mesh):
    """A jitted `sample(params, key) -> (classes * per_class, H, W, C)` under `config.sampling`.

    Row r of the result holds `per_class` samples of class r (rows = `grid_classes` first
    classes), drawn with classifier-free guidance by the configured sampler. The result is
    replicated on `mesh`, so every process can read it.
    """
    s = config.sampling
    classes = min(int(s.grid_classes), model.num_classes)
    per_class = int(s.grid_per_class)
    settings = Settings.from_config(config)
    labels = jnp.repeat(jnp.arange(classes, dtype=jnp.int32), per_class)
    draw = make_sample_fn(model, settings, latent_shape, config=config)

    @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, PartitionSpec()))
    def sample(params, key):
        return draw(params, labels, key)

    return sample, (classes, per_class)


def image_grid(images: np.ndarray, rows: int, *, pad: int = 1, min_cell: int = 32) -> np.ndarray:
    """Tiles (rows * cols, H, W, C) uint8 images into one (.., .., C) array, row-major.

    Tiny images are enlarged by an integer factor (nearest) to at least `min_cell` pixels.
    """
    n, h, w, c = images.shape
    if n % rows:
        raise ValueError(f"{n} images do not fill {rows} rows")
    cols = n // rows
    zoom = max(1, -(-min_cell // max(h, w)))
    images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)
    h, w = h * zoom, w * zoom
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = image
    return grid


def write_png(grid: np.ndarray, path: str) -> None:
    from PIL import Image

    if grid.shape[-1] not in (1, 3):
        raise ValueError(f"a PNG grid needs 1 or 3 channels, got shape {grid.shape}")
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    tmp = epath.Path(f"{path}.tmp")
    with tmp.open("wb") as f:  # write then rename: a reader never sees half a file
        image.save(f, format="PNG")
    tmp.replace(path)


def write_grid(images: np.ndarray, path: str, max_images: int = 100,
               cols: int | None = None) -> None:
    """A PNG grid of the first images, `cols` wide (default: near-square)."""
    n = min(len(images), max_images)
    cols = min(cols or math.ceil(math.sqrt(n)), n)
    rows = max(1, n // cols)
    write_png(image_grid(images[:rows * cols], rows=rows), path)
