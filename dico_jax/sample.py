"""Class-conditional samples for evaluation, written as an ADM-style `.npz`.

    python -m dico_jax.sample --workdir WORKDIR --out samples.npz [--grid grid.png]
    python -m dico_jax.sample --checkpoint CKPT_DIR --vae-weights sd-vae-ft-ema/ --out samples.npz

Settings not given come from the run's saved config (`config.sampling`). The global batch is
split over every device of every host; batch b draws its noise from (seed, b) and its labels
from (seed, b), so the samples depend on the seed and the batch size only, not on the number
of devices or processes. Each finished batch is saved under `OUT.parts/`; rerunning the
same command skips them, and the parts are removed once OUT is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from dico_jax import runtime
from dico_jax.convert.checkpoints import model_kwargs, resolve_checkpoint_path
from dico_jax.data import spec as data_spec
from dico_jax.diffusion import create_diffusion, guided_model_fn

BATCH_AXIS = "batch"
DEFAULT_PER_DEVICE_BATCH = 32
_PART = "batch_{:05d}.npz"


# ---------------------------------------------------------------------------------------------
# What to sample from.


def image_space(config: Mapping[str, Any], workdir: str | None = None) -> data_spec.DataSpec:
    """What the run's network generates: from its dataset manifest when that is readable,
    else from the workdir's config.json (the latent shape training recorded), else from the
    config alone (`dico_jax.data.spec`)."""
    run_record = os.path.join(workdir, "config.json") if workdir else ""
    if not data_spec.manifest_dir(config) and run_record and os.path.isfile(run_record):
        with open(run_record) as f:
            shape = json.load(f).get("latent_shape")
        if shape:
            from dico_jax.models.vae import SD_VAE_SCALING_FACTOR

            # Training checks that the latents are 1/8 of the resolution (VAE) or equal (pixels).
            vae = int(shape[0]) != int(config["resolution"])
            return data_spec.DataSpec(tuple(int(d) for d in shape),
                                      int(config["model"]["num_classes"]), vae,
                                      SD_VAE_SCALING_FACTOR if vae else 1.0)
    return data_spec.from_config(config)


@dataclasses.dataclass
class Source:
    """Weights, config and provenance of the checkpoint to sample from."""

    directory: str
    step: int
    params: Any  # numpy tree
    config: dict
    weights: str  # "ema_params" or "params"
    workdir: str | None = None


def load_source(*, workdir: str | None = None, checkpoint: str | None = None,
                step: int | None = None, use_ema: bool = True) -> Source:
    """Restores one weight set (EMA by default) to host memory, with the saved config."""
    from dico_jax import checkpoint as ckpt_lib

    if (workdir is None) == (checkpoint is None):
        raise ValueError("give exactly one of --workdir and --checkpoint")
    if workdir is not None:
        if not os.path.isdir(workdir):
            raise FileNotFoundError(f"no training workdir {workdir}")
        directory = ckpt_lib.checkpoint_dir(workdir)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{workdir} has no checkpoints/ folder: not a training workdir "
                                    "or no checkpoint saved yet")
    else:
        directory, step = resolve_checkpoint_path(checkpoint, step)
        if os.path.basename(directory) == "checkpoints":
            workdir = os.path.dirname(directory)
    weights = "ema_params" if use_ema else "params"
    try:
        state, step = ckpt_lib.restore_to_host(directory, step, items=(weights,))
    except KeyError as err:
        hint = " (use --no-ema to sample from the raw weights)" if use_ema else ""
        raise KeyError(f"{err.args[0]}{hint}") from None
    try:
        config = ckpt_lib.read_config(directory, step)
    except Exception as err:  # noqa: BLE001 - Orbax raises several types for a missing item
        raise FileNotFoundError(f"checkpoint {directory}/{step} has no readable config: {err}") from err
    return Source(directory, step, state[weights], config, weights, workdir)


# ---------------------------------------------------------------------------------------------
# Settings.


@dataclasses.dataclass(frozen=True)
class Settings:
    num_samples: int
    batch_size: int  # global, per step
    seed: int
    cfg_scale: float
    guidance_channels: int | None  # None: every channel
    sampler: str  # "ddpm" or "ddim"
    respacing: str
    labels: tuple[int, ...] | None  # None: uniform random over the classes
    dtype: str = "float32"

    def record(self) -> dict:
        """What decides the content of each batch (checked when resuming)."""
        out = dataclasses.asdict(self)
        del out["num_samples"]  # batch b is the same whatever the total
        out["labels"] = list(self.labels) if self.labels is not None else "random"
        return out


def resolve_sampler(sampler: str | None, respacing: str | None,
                    defaults: Mapping[str, Any]) -> tuple[str, str]:
    """("ddpm" | "ddim", respacing) from --sampler (ddpm, ddim, ddimN) and --respacing."""
    sampler = str(sampler if sampler is not None else defaults.get("sampler", "ddpm"))
    if sampler.startswith("ddim") and sampler[4:].isdigit():
        if respacing is not None and str(respacing) not in (sampler, sampler[4:]):
            raise ValueError(f"--sampler {sampler} fixes the steps; it conflicts with "
                             f"--respacing {respacing}")
        return "ddim", sampler
    if respacing is None:
        respacing = defaults.get("respacing", "250")
    respacing = str(respacing)
    if sampler == "ddim":
        return "ddim", respacing if respacing.startswith("ddim") else f"ddim{respacing}"
    if sampler == "ddpm":
        return "ddpm", respacing
    raise ValueError(f"unknown sampler {sampler!r}: use ddpm (with --respacing N), ddim or ddimN")


def parse_labels(text: str | Sequence[int] | None, num_classes: int) -> tuple[int, ...] | None:
    """A comma list (or sequence) of class ids in [0, num_classes), or None for random labels."""
    if text is None or text == "" or text == "random":
        return None
    if isinstance(text, str):
        try:
            labels = tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise ValueError(
                f"--labels {text!r}: expected a comma-separated list of class ids") from None
    else:
        labels = tuple(int(x) for x in text)
    if not labels:
        raise ValueError("--labels is empty")
    bad = [x for x in labels if not 0 <= x < num_classes]
    if bad:
        raise ValueError(f"--labels {bad} out of range: the model has {num_classes} classes "
                         f"(0..{num_classes - 1})")
    return labels


def batch_labels(settings: Settings, num_classes: int, batch_index: int) -> np.ndarray:
    """Labels of global batch `batch_index`: random from (seed, batch), or the given list cycled."""
    n = settings.batch_size
    if settings.labels is None:
        rng = np.random.default_rng([settings.seed, batch_index])
        return rng.integers(0, num_classes, size=n).astype(np.int32)
    given = np.asarray(settings.labels, np.int32)
    return given[(batch_index * n + np.arange(n)) % len(given)]


def default_batch_size(num_samples: int, num_devices: int) -> int:
    """32 per device, but not (much) more than the samples asked for."""
    wanted = min(DEFAULT_PER_DEVICE_BATCH * num_devices, num_samples)
    return max(num_devices, -(-wanted // num_devices) * num_devices)


# ---------------------------------------------------------------------------------------------
# The sampler.


def sampling_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh over all devices (of all processes): the batch is split, weights replicated."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), (BATCH_AXIS,), axis_types=(AxisType.Auto,),
                         devices=devices)


def to_uint8_images(x: jax.Array, vae: Any = None, vae_params: Any = None,
                    scale_factor: float = 1.0) -> jax.Array:
    """Samples -> uint8 pixels: VAE-decode latents / scale_factor (when `vae` is given), clamp
    to [-1, 1], then 127.5 x + 128 truncated, as the DiT/ADM sampling scripts do."""
    if vae is not None:
        x = vae.apply({"params": vae_params}, x / scale_factor, method=vae.decode)
    x = jnp.clip(x, -1.0, 1.0)
    return jnp.clip(127.5 * x + 128.0, 0.0, 255.0).astype(jnp.uint8)


def make_sampler(model: Any, space: data_spec.DataSpec, settings: Settings, mesh: jax.sharding.Mesh,
                 *, diffusion_config: Mapping[str, Any], vae: Any = None) -> Callable:
    """`sample(params, vae_params, labels, seed, batch_index) -> uint8 (B, H, W, C)`, jitted.

    Noise and the sampler's keys come from fold_in(key(seed), batch_index); the batch dim is
    split over `mesh`, weights are replicated. The VAE (when `space.vae`) decodes
    latents / scale_factor inside the same program.
    """
    kind, respacing = settings.sampler, settings.respacing
    diffusion = create_diffusion(respacing,
                                 noise_schedule=diffusion_config.get("noise_schedule", "linear"),
                                 learn_sigma=diffusion_config.get("learn_sigma", True),
                                 diffusion_steps=diffusion_config.get("steps", 1000))
    if space.vae and vae is None:
        raise ValueError("these are VAE latents: a VAE module is needed to decode them")
    batch = NamedSharding(mesh, P(BATCH_AXIS))
    replicated = NamedSharding(mesh, P())
    shape = (settings.batch_size, *space.latent_shape)
    channels = space.latent_shape[-1]
    guidance = (None if settings.guidance_channels is None
                else min(settings.guidance_channels, channels))
    cfg_scale = float(settings.cfg_scale)
    loop = diffusion.ddim_sample_loop if kind == "ddim" else diffusion.p_sample_loop

    def sample(params, vae_params, labels, seed, batch_index):
        key = jax.random.fold_in(jax.random.key(seed), batch_index)
        noise_key, loop_key = jax.random.split(key)
        noise = jax.lax.with_sharding_constraint(
            jax.random.normal(noise_key, shape, jnp.float32), batch)
        apply_fn = lambda x, t, y: model.apply({"params": params}, x, t, y)  # noqa: E731
        model_fn = guided_model_fn(apply_fn, labels, cfg_scale, null_label=model.num_classes,
                                   guidance_channels=guidance)
        x = loop(model_fn, noise, loop_key)
        return to_uint8_images(x, vae if space.vae else None, vae_params, space.scale_factor)

    return jax.jit(sample, in_shardings=(replicated, replicated, batch, replicated, replicated),
                   out_shardings=batch)


# ---------------------------------------------------------------------------------------------
# Parts on disk.


def parts_dir(out: str) -> str:
    return f"{os.path.abspath(out)}.parts"


def _atomic_savez(path: str, **arrays) -> None:
    tmp = f"{path}.tmp.npz"  # np.savez appends .npz to other names
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _check_or_write_record(directory: str, record: dict) -> None:
    path = os.path.join(directory, "settings.json")
    if os.path.isfile(path):
        with open(path) as f:
            previous = json.load(f)
        if previous != record:
            diff = {k: (previous.get(k), record.get(k)) for k in set(previous) | set(record)
                    if previous.get(k) != record.get(k)}
            raise ValueError(
                f"{directory} holds batches made with other settings ({diff}, as (then, now)); "
                "rerun with the same settings, or delete that folder to start over")
        return
    os.makedirs(directory, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def _finished_batches(directory: str, num_batches: int) -> list[int]:
    return [b for b in range(num_batches)
            if os.path.isfile(os.path.join(directory, _PART.format(b)))]


def _read_part(directory: str, b: int, labels: np.ndarray, image_shape: tuple) -> np.ndarray:
    path = os.path.join(directory, _PART.format(b))
    with np.load(path) as part:
        images, saved_labels = part["arr_0"], part["label"]
    if images.shape != (len(labels), *image_shape) or images.dtype != np.uint8:
        raise ValueError(f"{path} holds {images.dtype} {images.shape}, expected uint8 "
                         f"{(len(labels), *image_shape)}; delete it to recompute that batch")
    if not np.array_equal(saved_labels, labels):
        raise ValueError(f"{path} was sampled for other labels; delete {directory} to start over")
    return images


# ---------------------------------------------------------------------------------------------
# The run.


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
                   for b in self.batches_computed)  # padding of a last batch not counted

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
    from dico_jax.models import get_model

    config = source.config
    num_classes = int(config["model"]["num_classes"])
    space = image_space(config, source.workdir)
    if space.vae and not vae_weights:
        raise ValueError(
            f"the run's data are VAE latents ({space.latent_shape}); pass --vae-weights with the "
            "diffusers AutoencoderKL weights (e.g. the sd-vae-ft-ema folder or its "
            "diffusion_pytorch_model.safetensors)")
    if settings.num_samples < 1:
        raise ValueError(f"--num-samples must be positive, got {settings.num_samples}")
    mesh = sampling_mesh(devices)
    if settings.batch_size < 1 or settings.batch_size % mesh.size:
        raise ValueError(f"--batch-size {settings.batch_size} must be a positive multiple of the "
                         f"{mesh.size} devices")
    if settings.labels is not None:
        parse_labels(settings.labels, num_classes)  # range check

    kwargs = model_kwargs(config)
    kwargs["dtype"] = settings.dtype
    model = get_model(config["model"]["name"], **kwargs)
    vae_module, vae_params = None, {}
    if space.vae:
        vae_module, vae_params = load_vae(vae_weights)
        if vae_module.latent_channels != space.latent_shape[-1]:
            raise ValueError(f"--vae-weights {vae_weights} has {vae_module.latent_channels} latent "
                             f"channels; the model makes {space.latent_shape}")
    sampler = make_sampler(model, space, settings, mesh, diffusion_config=config.get("diffusion", {}),
                           vae=vae_module)

    h, w, c = space.latent_shape
    f = vae_module.downsample_factor if space.vae else 1
    image_shape = (h * f, w * f, vae_module.out_channels if space.vae else c)
    num_batches = -(-settings.num_samples // settings.batch_size)
    chief = jax.process_index() == 0
    directory = parts_dir(out)
    record = {**settings.record(), "checkpoint": source.directory, "step": source.step,
              "weights": source.weights, "image_shape": list(image_shape),
              "vae_weights": os.path.abspath(vae_weights) if space.vae else None}
    if chief:
        _check_or_write_record(directory, record)
        done = _finished_batches(directory, num_batches)
    else:
        done = []
    done = _agree(done, num_batches)
    todo = [b for b in range(num_batches) if b not in done]
    if max_batches is not None:
        todo = todo[:max_batches]

    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(BATCH_AXIS))
    compile_secs = sample_secs = 0.0
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

        sample_secs = _run_batches(compiled, params, vae_params, seed, todo, done, settings,
                                   num_classes, mesh, directory, progress and chief, on_batch)

    finished = len(done) + len(todo) == num_batches
    if finished and chief:
        _assemble(directory, out, num_batches, settings, num_classes, image_shape, grid)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("samples written")
    return SampleReport(os.path.abspath(out) if finished else directory, finished,
                        settings.num_samples, settings.batch_size, image_shape, tuple(todo),
                        tuple(done), compile_secs, sample_secs)


def _batch_count(settings: Settings, b: int) -> int:
    """Samples of batch b that are kept (the last batch may be padded)."""
    return min(settings.batch_size, settings.num_samples - b * settings.batch_size)


def _run_batches(compiled, params, vae_params, seed, todo, done, settings: Settings,
                 num_classes: int, mesh, directory: str, progress: bool, on_batch) -> float:
    """Runs the batches `todo`, saving each to `directory`; returns the wall time."""
    chief = jax.process_index() == 0
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(BATCH_AXIS))
    bar = _progress_bar(settings.num_samples, sum(_batch_count(settings, b) for b in done),
                        enabled=progress)
    t0 = time.perf_counter()
    pending = None  # dispatch batch b before saving batch b - 1, so the devices never wait
    for b in todo + [None]:
        result = None
        if b is not None:
            labels = batch_labels(settings, num_classes, b)
            global_labels = jax.make_array_from_callback(
                labels.shape, batch_sharding, lambda idx, lab=labels: lab[idx])
            index = jax.device_put(np.int32(b), replicated)
            result = (b, labels, compiled(params, vae_params, global_labels, seed, index))
        if pending is not None:
            pb, plabels, images = pending
            images = _to_host(images)
            if chief:
                _atomic_savez(os.path.join(directory, _PART.format(pb)), arr_0=images,
                              label=plabels)
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
        images.append(_read_part(directory, b, expected, image_shape))
        labels.append(expected)
    images = np.concatenate(images)[:settings.num_samples]
    labels = np.concatenate(labels)[:settings.num_samples]
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    _atomic_savez(out, arr_0=images, label=labels)
    if grid:
        # With a short list of labels (cycled), one column per list entry: a class per column.
        given = settings.labels
        write_grid(images, grid, cols=len(given) if given and len(given) <= 32 else None)
    # Only now that OUT is whole are the parts given up.
    for b in range(num_batches):
        os.remove(os.path.join(directory, _PART.format(b)))
    os.remove(os.path.join(directory, "settings.json"))
    os.rmdir(directory)


def write_grid(images: np.ndarray, path: str, max_images: int = 100,
               cols: int | None = None) -> None:
    """A PNG grid of the first images, `cols` wide (default: near-square)."""
    from dico_jax import sampling_grid

    n = min(len(images), max_images)
    cols = min(cols or math.ceil(math.sqrt(n)), n)
    rows = max(1, n // cols)
    sampling_grid.write_png(sampling_grid.image_grid(images[:rows * cols], rows=rows), path)


def _agree(done: list[int], num_batches: int) -> list[int]:
    """Every process takes the chief's list of finished batches (it alone reads the disk)."""
    if jax.process_count() == 1:
        return done
    from jax.experimental import multihost_utils

    mask = np.zeros((num_batches,), np.int32)
    mask[done] = 1
    mask = np.asarray(multihost_utils.broadcast_one_to_all(mask))
    return [int(b) for b in np.flatnonzero(mask)]


def _to_host(images: jax.Array) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(images)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(images, tiled=True))


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


def load_vae(path: str):
    """(AutoencoderKL module, numpy params) from diffusers weights (a file or a model folder)."""
    from dico_jax.convert.vae import load_vae_weights, vae_torch_to_flax
    from dico_jax.models.vae import AutoencoderKL

    module = AutoencoderKL(**vae_architecture(path))
    try:
        params = vae_torch_to_flax(load_vae_weights(path), module)
    except ValueError as err:
        raise ValueError(f"--vae-weights {path}: {err}") from err
    return module, jax.tree.map(np.asarray, params)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=min(initial, total), unit="img", dynamic_ncols=True,
                desc="sampling")


# ---------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dico_jax.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--workdir", help="training workdir (its latest checkpoint and config)")
    where.add_argument("--checkpoint", help="Orbax checkpoint directory (e.g. from dico_jax.convert)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--no-ema", dest="use_ema", action="store_false",
                        help="sample from the raw weights instead of the EMA")
    parser.add_argument("--out", required=True, help="output .npz (arr_0 uint8 NHWC, label)")
    parser.add_argument("--grid", help="also write a PNG grid of the first (up to 100) samples; "
                                       "with --labels, one column per listed label")
    parser.add_argument("--num-samples", type=int, help="default: config.sampling.num_samples")
    parser.add_argument("--batch-size", type=int,
                        help=f"global batch per step, a multiple of the device count "
                             f"(default: {DEFAULT_PER_DEVICE_BATCH} per device)")
    parser.add_argument("--cfg-scale", type=float, help="default: config.sampling.cfg_scale")
    parser.add_argument("--guidance-channels", help="eps channels guided, an int or 'all' "
                                                    "(default: config.sampling.guidance_channels)")
    parser.add_argument("--sampler", help="ddpm, ddim or ddimN (default: config.sampling.sampler)")
    parser.add_argument("--respacing", help="kept steps, e.g. 250 (default: config.sampling.respacing)")
    parser.add_argument("--seed", type=int, help="default: config.seed")
    parser.add_argument("--labels", help="comma list of class ids, cycled (default: random)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype "
                                                                         "(default: config.dtype)")
    parser.add_argument("--vae-weights", help="diffusers AutoencoderKL weights (file or folder), "
                                              "needed for latent-space runs")
    parser.add_argument("--max-batches", type=int,
                        help="stop after this many new batches (rerun to continue)")
    return parser


def settings_from_args(args: argparse.Namespace, config: Mapping[str, Any],
                       num_devices: int) -> Settings:
    s = config.get("sampling", {})
    num_samples = (args.num_samples if args.num_samples is not None
                   else int(s.get("num_samples", 50_000)))
    sampler, respacing = resolve_sampler(args.sampler, args.respacing, s)
    gc = args.guidance_channels if args.guidance_channels is not None else s.get("guidance_channels", 3)
    if gc in (None, "all"):
        gc = None
    else:
        try:
            gc = int(gc)
        except ValueError:
            raise ValueError(f"--guidance-channels {gc!r}: expected an int or 'all'") from None
    return Settings(
        num_samples=num_samples,
        batch_size=args.batch_size or default_batch_size(num_samples, num_devices),
        seed=args.seed if args.seed is not None else int(config.get("seed", 0)),
        cfg_scale=args.cfg_scale if args.cfg_scale is not None else float(s.get("cfg_scale", 1.0)),
        guidance_channels=gc, sampler=sampler, respacing=respacing,
        labels=parse_labels(args.labels, int(config["model"]["num_classes"])),
        dtype=args.dtype or config.get("dtype", "float32"))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runtime.start(orbax_level=logging.ERROR)
    try:
        source = load_source(workdir=args.workdir, checkpoint=args.checkpoint, step=args.step,
                             use_ema=args.use_ema)
        settings = settings_from_args(args, source.config, jax.device_count())
        report = generate(source, settings, args.out, vae_weights=args.vae_weights, grid=args.grid,
                          max_batches=args.max_batches)
    except (OSError, ValueError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        print(f"{source.config['model']['name']} step {source.step} ({source.weights}), "
              f"{settings.sampler} {settings.respacing}, cfg {settings.cfg_scale}: "
              f"{len(report.batches_computed)} batches computed, {len(report.batches_reused)} "
              f"reused; compile {report.compile_secs:.1f} s, {report.images_per_sec:.2f} images/s")
        print(f"wrote {report.out}" if report.complete
              else f"stopped early; the finished batches are in {report.out} (rerun to continue)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
