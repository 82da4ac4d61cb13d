"""Sample grids as PNG files: the class-conditional grids drawn during training (one row per
class, its class beside it) and the preview of an `.npz` run (each image's class drawn with
it)."""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dico_jax import storage
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
    draw = make_sample_fn(model, settings, latent_shape, config=config,
                          noise_sharding=_split_over(mesh, classes * per_class))

    @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, PartitionSpec()))
    def sample(params, key):
        return draw(params, labels, key)

    return sample, (classes, per_class)


def _split_over(mesh: jax.sharding.Mesh, n: int) -> NamedSharding | None:
    """The grid's samples split over the mesh axes whose devices divide them evenly (all
    axes if they can): left replicated, every device would draw the whole grid, a cost that
    grows with the device count where devices share the host's cores (CPU)."""
    sizes = dict(mesh.shape)
    for axes in [tuple(sizes), *[(a,) for a in sorted(sizes, key=sizes.get, reverse=True)]]:
        size = int(np.prod([sizes[a] for a in axes]))
        if size > 1 and n % size == 0:
            return NamedSharding(mesh, PartitionSpec(axes))
    return None


def image_grid(images: np.ndarray, rows: int, *, pad: int = 1, min_cell: int = 32,
               row_labels: Sequence[Any] | None = None, col_labels: Sequence[Any] | None = None,
               cell_labels: Sequence[Any] | None = None) -> np.ndarray:
    """Tiles (rows * cols, H, W, C) uint8 images into one (.., .., C) array, row-major.

    Tiny images are enlarged by an integer factor (nearest) to at least `min_cell` pixels.
    Labels are drawn in PIL's default font: `row_labels` left of each row, `col_labels` above
    each column, `cell_labels` under each image (a grid of mixed classes).
    """
    n, h, w, c = images.shape
    if n % rows:
        raise ValueError(f"{n} images do not fill {rows} rows")
    cols = n // rows
    for name, labels, count in (("row_labels", row_labels, rows), ("col_labels", col_labels, cols),
                                ("cell_labels", cell_labels, n)):
        if labels is not None and len(labels) != count:
            raise ValueError(f"{name}: {len(labels)} labels for {count} {name[:-7]}s")
    zoom = max(1, -(-min_cell // max(h, w)))
    images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)
    h, w = h * zoom, w * zoom
    text_h = _text_size("0")[1] + 2 * pad
    left = 0 if row_labels is None else max(_text_size(str(x))[0] for x in row_labels) + 3 * pad
    top = 0 if col_labels is None else text_h
    below = 0 if cell_labels is None else text_h  # under each row of images
    cell_h = h + below
    grid = np.full((top + rows * (cell_h + pad) + pad, left + cols * (w + pad) + pad, c), 255,
                   np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        y0, x0 = top + pad + r * (cell_h + pad), left + pad + col * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = image
    texts = []  # (x, y, text, width of its place): centred there
    if row_labels is not None:
        texts += [(pad, top + pad + r * (cell_h + pad) + (h - text_h) // 2, str(x), left - 2 * pad)
                  for r, x in enumerate(row_labels)]
    if col_labels is not None:
        texts += [(left + pad + col * (w + pad), 0, str(x), w) for col, x in enumerate(col_labels)]
    if cell_labels is not None:
        texts += [(left + pad + (i % cols) * (w + pad), top + pad + (i // cols) * (cell_h + pad) + h,
                   str(x), w) for i, x in enumerate(cell_labels)]
    return _draw_texts(grid, texts) if texts else grid


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _text_size(text: str) -> tuple[int, int]:
    x0, y0, x1, y1 = _font().getbbox(text)
    return x1 - x0, y1


def _draw_texts(grid: np.ndarray, texts) -> np.ndarray:
    """Black text on the white margins of `grid` (any channel count)."""
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(np.full(grid.shape[:2], 255, np.uint8))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for x, y, text, width in texts:
        draw.text((x + max(0, (width - _text_size(text)[0]) // 2), y), text, fill=0, font=font)
    ink = np.asarray(canvas) < 255
    out = grid.copy()
    out[ink] = np.asarray(canvas)[ink][:, None]
    return out


def write_png(grid: np.ndarray, path: str) -> None:
    from PIL import Image

    if grid.shape[-1] not in (1, 3):
        raise ValueError(f"a PNG grid needs 1 or 3 channels, got shape {grid.shape}")
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    storage.atomic_write(path, lambda f: image.save(f, format="PNG"))


def write_grid(images: np.ndarray, path: str, max_images: int = 100,
               cols: int | None = None, labels: np.ndarray | None = None,
               class_per_column: bool = False) -> None:
    """A PNG grid of the first images, `cols` wide (default: near-square), each labelled by
    its class: above its column when each column holds one class, else under each image."""
    n = min(len(images), max_images)
    cols = min(cols or math.ceil(math.sqrt(n)), n)
    rows = max(1, n // cols)
    kept = rows * cols
    by_column = labels is not None and class_per_column
    write_png(image_grid(images[:kept], rows=rows,
                         col_labels=None if not by_column else list(labels[:cols]),
                         cell_labels=None if labels is None or by_column else list(labels[:kept])),
              path)


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
            from dico_jax.convert.vae import load_vae

            vae = load_vae(config.vae_weights, str(config.get("dtype", "float32")), space.vae_kind)
        return cls(model, config, space, mesh, vae)

    def write(self, params: Any, workdir: str, step: int) -> str:
        import os

        from dico_jax.sampling import parts

        key = jax.random.fold_in(jax.random.key(self.config.seed), 0x5A3F1E)  # same noise
        images = parts.to_host(self._pixels(params, self.vae_params, key))
        grid = image_grid(images, rows=self.shape[0], row_labels=range(self.shape[0]))
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
