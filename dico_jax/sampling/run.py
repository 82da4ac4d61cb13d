"""A sampling run: `settings.num_samples` images of a checkpoint into an ADM-style `.npz`.

The global batch is split over every device of every host; batch b draws its noise from
(seed, b) and its labels from (seed, b), so the samples depend on the seed and the batch size
only, not on the number of devices or processes. Each finished batch is kept under
`OUT.parts/` (`sampling.parts`) until OUT is whole, so a stopped run resumes.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from dico_jax.checkpoint import resolve_workdir
from dico_jax.errors import UserError
from dico_jax.progress import Progress
from dico_jax.sampling import parts
from dico_jax.sampling.grid import write_grid
from dico_jax.sampling.sampler import (BATCH_AXIS, Settings, batch_labels, make_sampler,
                                       parse_labels, sampling_mesh, sampling_model)
from dico_jax.sampling.source import Source, image_space
from dico_jax.convert.vae import load_vae


def describe(settings: Settings) -> str:
    """The sampler and its steps, e.g. "ddpm 250" or "heun 25 steps"."""
    return f"{settings.sampler} {settings.respacing or f'{settings.num_steps} steps'}"


@dataclasses.dataclass(frozen=True)
class SampleReport:
    out: str  # the .npz, or the parts folder when the run stopped early
    complete: bool
    num_samples: int
    batch_size: int
    image_shape: tuple[int, int, int]
    batches_computed: tuple[int, ...]
    batches_reused: tuple[int, ...]
    compile_secs: float
    sample_secs: float  # wall time of the computed batches, compile excluded

    @property
    def images_computed(self) -> int:
        """Samples in the computed batches (the padding of a last, partial batch not counted)."""
        return sum(min(self.batch_size, self.num_samples - b * self.batch_size)
                   for b in self.batches_computed)

    @property
    def images_per_sec(self) -> float:
        n = self.images_computed
        return n / self.sample_secs if n and self.sample_secs else float("nan")


def generate(source: Source, settings: Settings, out: str, *, vae_weights: str | None = None,
             grid: str | None = None, devices: Sequence[jax.Device] | None = None,
             max_batches: int | None = None, progress: bool = True,
             on_batch: Callable[[int], None] | None = None) -> SampleReport:
    """Samples `settings.num_samples` images into `out` (.npz with `arr_0` and `label`).

    Batches already in `out.parts/` are reused. `max_batches` stops after computing that many
    new batches (the run is then resumed by calling again); `on_batch(b)` is told of each
    batch as it is computed.
    """
    config = source.config
    num_classes = int(config["model"]["num_classes"])
    space = image_space(config, source.workdir)
    if vae_weights and not space.vae:
        raise ValueError(
            f"--vae_weights {vae_weights}: this run's network generates pixels "
            f"({space.latent_shape}), not VAE latents, so it uses no VAE; drop --vae_weights")
    if space.vae and not vae_weights:
        raise ValueError(
            f"the run's data are {space.vae_kind} latents ({space.latent_shape}); pass "
            "--vae_weights with that VAE's weights (the sd-vae-ft-ema folder or its "
            "diffusion_pytorch_model.safetensors; for va-vae a vae-from-torch folder or the "
            ".pt release)")
    if settings.num_samples < 1:
        raise ValueError(f"sampling.num_samples must be positive, got "
                         f"{settings.num_samples}")
    mesh = sampling_mesh(devices)
    if settings.batch_size < 1 or settings.batch_size % mesh.size:
        raise ValueError(f"sampling.batch_size {settings.batch_size} must be a positive multiple of the "
                         f"{mesh.size} devices")
    if settings.labels is not None:
        parse_labels(settings.labels, num_classes)  # range check

    model = sampling_model(config, settings.dtype)
    vae_module, vae_params = None, {}
    if space.vae:
        vae_module, vae_params = load_vae(vae_weights, kind=space.vae_kind)
        if vae_module.latent_channels != space.latent_shape[-1]:
            raise ValueError(f"--vae_weights {vae_weights} has {vae_module.latent_channels} latent "
                             f"channels; the model makes {space.latent_shape}")
    sampler = make_sampler(model, settings, space, mesh, config=config, vae=vae_module)

    h, w, c = space.latent_shape
    f = vae_module.downsample_factor if space.vae else 1
    image_shape = (h * f, w * f, vae_module.out_channels if space.vae else c)
    num_batches = -(-settings.num_samples // settings.batch_size)
    chief = jax.process_index() == 0
    directory = parts.parts_dir(out)
    record = {**settings.record(), "checkpoint": source.directory, "step": source.step,
              "weights": source.weights, "image_shape": list(image_shape),
              "vae_weights": os.path.abspath(vae_weights) if space.vae else None}
    done = []
    if chief:
        parts.check_or_write_record(directory, record)
        done = parts.finished_batches(directory, num_batches)
    done = parts.agree(done, num_batches)
    todo = [b for b in range(num_batches) if b not in done]
    if max_batches is not None:
        todo = todo[:max_batches]

    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(BATCH_AXIS))
    compile_secs = sample_secs = 0.0
    if progress and chief:
        logging.info("sampling %d images (%s, cfg %s, seed %d, batch %d): %d batches, %d done "
                     "before, %d now", settings.num_samples, describe(settings),
                     settings.cfg_scale, settings.seed, settings.batch_size, num_batches,
                     len(done), len(todo))
    if todo:
        params = jax.device_put(source.params, replicated)
        vae_params = jax.device_put(vae_params, replicated)
        # Scalars as replicated global arrays: valid jit inputs on every process of a pod.
        seed = jax.device_put(np.uint32(settings.seed), replicated)
        t0 = time.perf_counter()
        compiled = sampler.lower(
            params, vae_params,
            jax.ShapeDtypeStruct((settings.batch_size,), jnp.int32, sharding=batch_sharding),
            seed, jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)).compile()
        compile_secs = time.perf_counter() - t0
        if progress and chief:
            logging.info("sampler compiled in %.1f s", compile_secs)

        def run_batch(b: int, labels: np.ndarray) -> jax.Array:
            global_labels = jax.make_array_from_callback(
                labels.shape, batch_sharding, lambda idx: labels[idx])
            index = jax.device_put(np.int32(b), replicated)
            return compiled(params, vae_params, global_labels, seed, index)

        sample_secs = _run_batches(run_batch, todo, done, settings, num_classes, directory,
                                   progress and chief, on_batch)

    finished = len(done) + len(todo) == num_batches
    if finished and chief:
        _assemble(directory, out, num_batches, settings, num_classes, image_shape, grid)
    parts.barrier("samples written")
    return SampleReport(resolve_workdir(out) if finished else directory, finished,
                        settings.num_samples, settings.batch_size, image_shape, tuple(todo),
                        tuple(done), compile_secs, sample_secs)


def _batch_count(settings: Settings, b: int) -> int:
    """Samples of batch b that are kept (the last batch may be padded)."""
    return min(settings.batch_size, settings.num_samples - b * settings.batch_size)


def _run_batches(run_batch, todo, done, settings: Settings, num_classes: int, directory: str,
                 progress: bool, on_batch) -> float:
    """Runs the batches `todo`, saving each to `directory`; returns the wall time."""
    chief = jax.process_index() == 0
    bar = Progress("sampling", settings.num_samples,
                   done=sum(_batch_count(settings, b) for b in done), enabled=progress)
    t0 = time.perf_counter()
    pending = None  # dispatch batch b before saving batch b - 1, so the devices never wait
    for b in todo + [None]:
        result = None
        if b is not None:
            labels = batch_labels(settings, num_classes, b)
            result = (b, labels, run_batch(b, labels))
        if pending is not None:
            pb, plabels, (images, finite) = pending
            images, finite = parts.to_host(images), parts.to_host(finite)
            if not finite.all():
                raise UserError(
                    f"batch {pb} (seed {settings.seed}): {int((~finite).sum())} of {len(finite)} "
                    "samples are NaN or infinite, so nothing more is written; check the "
                    "checkpoint (a diverged run?) and the sampling settings "
                    f"(cfg_scale {settings.cfg_scale}, dtype {settings.dtype})")
            if chief:
                parts.write_part(directory, pb, images, plabels)
            if on_batch is not None:
                on_batch(pb)
            bar.update(_batch_count(settings, pb))
        pending = result
    bar.close()
    return time.perf_counter() - t0


def _assemble(directory: str, out: str, num_batches: int, settings: Settings, num_classes: int,
              image_shape: tuple, grid: str | None) -> None:
    images, labels = [], []
    for b in range(num_batches):
        expected = batch_labels(settings, num_classes, b)
        images.append(parts.read_part(directory, b, expected, image_shape))
        labels.append(expected)
    images = np.concatenate(images)[:settings.num_samples]
    labels = np.concatenate(labels)[:settings.num_samples]
    out = resolve_workdir(out)
    parts.atomic_savez(out, arr_0=images, label=labels)
    if grid:
        # With a short list of labels (cycled), one column per list entry: a class per column.
        given = settings.labels
        by_column = bool(given) and len(given) <= 32
        write_grid(images, grid, cols=len(given) if by_column else None, labels=labels,
                   class_per_column=by_column)
    # Only now that OUT is whole are the parts given up.
    parts.remove_parts(directory, num_batches)
