"""Sampling: the one sampler (`sampler`), runs into resumable `.npz` files (`run`, `parts`),
PNG grids for training and previews (`grid`) and the checkpoint to sample from (`source`);
latents are decoded with `dico_jax.convert.vae.load_vae`. `python -m dico_jax.sample` is the command line."""
from dico_jax.sampling.grid import image_grid, make_grid_sampler, write_grid, write_png
from dico_jax.sampling.parts import parts_dir
from dico_jax.sampling.run import SampleReport, generate
from dico_jax.sampling.sampler import (Settings, batch_key, batch_labels, default_batch_size,
                                       make_sample_fn, make_sampler, parse_labels,
                                       sampling_mesh, sampling_model, to_uint8, to_uint8_images)
from dico_jax.sampling.source import (Source, apply_overrides, check_overrides, image_space,
                                     load_source)

__all__ = [
    "SampleReport", "Settings", "Source", "apply_overrides", "batch_key", "check_overrides",
    "batch_labels", "default_batch_size",
    "generate", "image_grid", "image_space", "load_source", "make_grid_sampler",
    "make_sample_fn", "make_sampler", "parse_labels", "parts_dir", "sampling_mesh",
    "sampling_model", "to_uint8", "to_uint8_images", "write_grid",
    "write_png",
]
