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


class TrainingGrid:
    """The class-conditional grid a run writes as it trains (`samples.png` and
    `samples_<step>.png` in the workdir), from pixels or from SD-VAE latents decoded with the
    VAE of `config.vae_weights`.

    Every process runs the same programs; the grid is gathered with `parts.to_host` and
    process 0 alone writes it.
    """

    def __init__(self, model: Any, config: Any, space: Any, mesh: jax.sharding.Mesh,
                 vae: tuple[Any, Any] | None = None):
        from dico_jax.sampling.sampler import decode

        self.config = config
        draw, self.shape = make_grid_sampler(model, config, space.latent_shape, mesh)
        replicated = NamedSharding(mesh, PartitionSpec())
        module, params = vae if space.vae else (None, None)
        if space.vae and module is None:
            raise ValueError("a grid of latents needs a VAE to decode them")
        self.vae_params = None if params is None else jax.device_put(params, replicated)
        scale = space  # decode undoes its normalisation and scale

        @functools.partial(jax.jit, out_shardings=replicated)
        def pixels(params, vae_params, key):
            return to_uint8(decode(draw(params, key), module, vae_params, scale))

        self._pixels = pixels

    @classmethod
    def from_config(cls, model: Any, config: Any, space: Any,
                    mesh: jax.sharding.Mesh) -> "TrainingGrid | None":
        """None when the config asks for no grid; a one-line error now when a latent run asks
        for grids without `config.vae_weights`."""
        if not (config.sample_every_steps or config.sample_at_end):
            return None
        check_grid_config(config, space)
        vae = None
        if space.vae:
            from dico_jax.sampling.vae import load_vae

            vae = load_vae(config.vae_weights, str(config.get("dtype", "float32")), space.vae_kind)
        return cls(model, config, space, mesh, vae)

    def write(self, params: Any, workdir: str, step: int) -> str:
        import os

        from dico_jax.sampling import parts

        key = jax.random.fold_in(jax.random.key(self.config.seed), 0x5A3F1E)  # same noise
        images = parts.to_host(self._pixels(params, self.vae_params, key))
        grid = image_grid(images, rows=self.shape[0])
        path = os.path.join(workdir, "samples.png")
        if jax.process_index() == 0:
            write_png(grid, path)
            write_png(grid, os.path.join(workdir, f"samples_{step:08d}.png"))
        return path


def check_grid_config(config: Any, space: Any) -> None:
    """A one-line error, before training, for a latent run that asks for grids without a VAE."""
    import os

    from dico_jax.errors import MissingFile, UserError

    if not space.vae or not (config.sample_every_steps or config.sample_at_end):
        return
    path = config.get("vae_weights", "")
    if not path:
        raise UserError(
            "config.vae_weights is empty: a latent run decodes its sample grids "
            "(config.sample_every_steps / sample_at_end) with it; set it to the diffusers "
            "AutoencoderKL weights, or set sample_every_steps=0 and sample_at_end=False")
    if not os.path.exists(path):
        raise MissingFile(f"config.vae_weights={path}: no such file or folder")
