"""Class-conditional sample grids during training: one row per class, written as a PNG."""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from dico_jax.diffusion import create_diffusion, guided_model_fn


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
    if s.sampler not in ("ddpm", "ddim"):
        raise ValueError(f"config.sampling.sampler must be 'ddpm' or 'ddim', got {s.sampler!r}")
    respacing = s.respacing
    if s.sampler == "ddim" and not str(respacing).startswith("ddim"):
        respacing = f"ddim{respacing}"
    diffusion = create_diffusion(respacing, noise_schedule=config.diffusion.noise_schedule,
                                 learn_sigma=config.diffusion.learn_sigma,
                                 diffusion_steps=config.diffusion.steps)
    labels = jnp.repeat(jnp.arange(classes, dtype=jnp.int32), per_class)
    cfg_scale = float(s.cfg_scale)
    guidance_channels = min(int(s.guidance_channels), latent_shape[-1])

    @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, PartitionSpec()))
    def sample(params, key):
        noise_key, loop_key = jax.random.split(key)
        noise = jax.random.normal(noise_key, (labels.shape[0], *latent_shape), jnp.float32)
        apply_fn = lambda x, t, y: model.apply({"params": params}, x, t, y)  # noqa: E731
        model_fn = guided_model_fn(apply_fn, labels, cfg_scale, null_label=model.num_classes,
                                   guidance_channels=guidance_channels)
        if s.sampler == "ddim":
            return diffusion.ddim_sample_loop(model_fn, noise, loop_key)
        return diffusion.p_sample_loop(model_fn, noise, loop_key)

    return sample, (classes, per_class)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 (127.5 x + 128, clipped, as the DiT sampling script)."""
    return np.clip(np.asarray(images, np.float32) * 127.5 + 128.0, 0, 255).astype(np.uint8)


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
