"""The one sampler of the project: the settings of a sampling run and the jitted function
that turns weights, labels and a key into images, for the `.npz` runs (`sampling.run`) and
the training grids (`sampling.grid`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from dico_jax import builders
from dico_jax.data import spec as data_spec
from dico_jax.errors import UserError
from dico_jax.diffusion import SAMPLERS, guided_model_fn, named_beta_schedule, resolve_sampler
from dico_jax.diffusion.meanflow import network_times

BATCH_AXIS = "batch"
DEFAULT_PER_DEVICE_BATCH = 32


# ---------------------------------------------------------------------------------------------
# Settings.


@dataclasses.dataclass(frozen=True)
class Settings:
    num_samples: int
    batch_size: int  # global, per step
    seed: int
    cfg_scale: float
    guidance_channels: int | None  # None: every channel
    sampler: str  # a name in diffusion.SAMPLERS
    respacing: str
    labels: tuple[int, ...] | None  # None: uniform random over the classes
    dtype: str = "float32"
    num_steps: int = 0  # flow samplers' steps (0 for the DDPM ones, which take `respacing`)
    guidance_interval: tuple[float, float] | None = None  # flow times; None: every step
    # Euler-Maruyama: (diffusion form, its norm, last step or None, last step size).
    sde: tuple[str, float, str | None, float] = ("sigma", 1.0, "mean", 0.04)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], num_devices: int = 1) -> "Settings":
        """The settings `config.sampling` (with `seed` and `dtype`) describes; a batch size of 0
        is the default (`default_batch_size`)."""
        s = config["sampling"]
        num_samples = int(s.get("num_samples", 50_000))
        if num_samples < 1:
            raise UserError(f"config.sampling.num_samples must be >= 1, got {num_samples}")
        sampler, respacing, num_steps = sampler_settings(config, "sampling")
        guidance = s.get("guidance_channels", 3)
        sde = dict(s.get("sde") or {})
        last_step = sde.get("last_step", "mean")
        sde = (str(sde.get("diffusion_form", "sigma")), float(sde.get("diffusion_norm", 1.0)),
               None if last_step in (None, "", "none") else str(last_step),
               float(sde.get("last_step_size", 0.04)))
        interval = parse_interval(s.get("guidance_interval"))
        if interval is not None and SAMPLERS[sampler].objective in builders.FEW_STEP_KINDS:
            raise UserError(f"config.sampling.guidance_interval={list(interval)}: the "
                            f"{sampler} sampler guides every one of its few steps; leave it "
                            "empty")
        labels = s.get("labels", "")
        if labels:  # checked only when given: a training config may not know its classes yet
            labels = parse_labels(labels, int(config["model"]["num_classes"]))
        return cls(
            num_samples=num_samples,
            batch_size=int(s.get("batch_size", 0) or 0) or default_batch_size(num_samples,
                                                                             num_devices),
            seed=int(config.get("seed", 0)), cfg_scale=float(s.get("cfg_scale", 1.0)),
            guidance_channels=None if guidance is None else int(guidance),
            sampler=sampler, respacing=respacing,
            labels=labels or None,
            dtype=str(config.get("dtype", "float32")), num_steps=num_steps,
            guidance_interval=interval,
            sde=sde if sampler == "euler_maruyama" else cls.sde)

    def record(self) -> dict:
        """What decides the content of each batch (checked when resuming)."""
        out = dataclasses.asdict(self)
        del out["num_samples"]  # batch b is the same whatever the total
        out["labels"] = list(self.labels) if self.labels is not None else "random"
        out["sde"] = list(self.sde)
        # Fields that do not apply are left out: records of runs before they existed match.
        if not SAMPLERS[self.sampler].takes_num_steps:
            del out["num_steps"]
        if self.sampler != "euler_maruyama":
            del out["sde"]
        if self.guidance_interval is None:
            del out["guidance_interval"]
        else:
            out["guidance_interval"] = list(self.guidance_interval)
        return out


def parse_interval(value) -> tuple[float, float] | None:
    """`config.sampling.guidance_interval`: empty/None for none, else (low, high) in [0, 1]."""
    if value is None or value == "" or len(value) == 0:
        return None
    if isinstance(value, str):
        value = [v for v in value.strip("()[] ").split(",") if v.strip()]
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"config.sampling.guidance_interval={value!r}: expected (low, high) "
                         "flow times") from None
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"config.sampling.guidance_interval=({low}, {high}): need "
                         "0 <= low <= high <= 1 (flow time: 0 noise, 1 data)")
    return low, high


# The sampler of a section whose `sampler` is empty: the objective's own (`config.diffusion.kind`),
# so a flow run samples and evaluates with an ODE solver without a second setting.
DEFAULT_SAMPLERS = {"ddpm": "ddpm", "flow": "heun", "meanflow": "meanflow",
                    "shortcut": "shortcut"}


def sampler_settings(config: Mapping[str, Any], section: str) -> tuple[str, str, int]:
    """(SAMPLERS name, respacing, solver steps) of `config.<section>` ("sampling" or
    "eval"): its `sampler`, or the objective's default when empty, checked against the run's
    objective; errors name the field to change."""
    s = config[section]
    try:
        kind = builders.diffusion_kind(config)
    except ValueError as err:
        raise UserError(str(err)) from None
    given = str(s.get("sampler") or DEFAULT_SAMPLERS[kind])
    try:
        sampler, respacing = resolve_sampler(given, s.get("respacing"))
    except ValueError as err:
        raise UserError(f"config.{section}.sampler={given!r}: {err}") from None
    check_sampler(config, sampler, given, field=f"config.{section}.sampler")
    if not SAMPLERS[sampler].takes_num_steps:
        return sampler, respacing, 0
    num_steps = int(s.get("num_steps", 50) or 0)
    if num_steps < 1:
        raise UserError(f"config.{section}.num_steps={num_steps}: the {sampler} sampler needs "
                        "a number of solver steps >= 1")
    if kind == "shortcut":
        try:
            builders.build_shortcut(config).check_num_steps(num_steps)
        except ValueError as err:
            raise UserError(f"config.{section}.{err}") from None
    return sampler, respacing, num_steps


def check_sampler(config: Mapping[str, Any], sampler: str, given: str | None = None,
                  field: str = "config.sampling.sampler") -> None:
    """Refuses a sampler (a SAMPLERS name; `given`: as the config wrote it, e.g. "ddim50")
    of the other objective than the run's `config.diffusion.kind`; the error names `field`."""
    kind = builders.diffusion_kind(config)
    objective = SAMPLERS[sampler].objective
    if objective != kind:
        fitting = ", ".join(k for k, v in SAMPLERS.items() if v.objective == kind)
        raise UserError(
            f"{field}={given or sampler!r} samples the {objective!r} objective, but this run "
            f"trains config.diffusion.kind={kind!r}: set {field} to one of {fitting} "
            f"(or leave it empty for {DEFAULT_SAMPLERS[kind]})")


def parse_labels(text: str | Sequence[int] | None, num_classes: int) -> tuple[int, ...] | None:
    """A comma list (or sequence) of class ids in [0, num_classes), or None for random labels."""
    if text is None or text == "" or text == "random":
        return None
    if isinstance(text, str):
        try:
            labels = tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise ValueError(
                f"sampling.labels {text!r}: expected a comma-separated list of class ids") from None
    else:
        labels = tuple(int(x) for x in text)
    if not labels:
        raise ValueError("sampling.labels is empty")
    bad = [x for x in labels if not 0 <= x < num_classes]
    if bad:
        raise ValueError(f"sampling.labels {bad} out of range: the model has {num_classes} classes "
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
# Building blocks.


def sampling_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh over all devices (of all processes): the batch is split, weights replicated."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), (BATCH_AXIS,), axis_types=(AxisType.Auto,),
                         devices=devices)


def sampling_model(config: Mapping[str, Any], dtype: str):
    """The run's network for sampling, computing in `dtype`.

    A run trained with the GPU-only Pallas norm kernels ("pallas") samples elsewhere with the
    XLA norm: the same function of the same weights, so the checkpoint stays usable off a GPU.
    """
    from dico_jax.models import check_norm_impl

    overrides: dict[str, Any] = {"dtype": dtype, "remat": "none"}
    try:
        check_norm_impl(config["model"].get("norm_impl", "xla"), jax.default_backend())
    except ValueError:
        overrides["norm_impl"] = "xla"
    return builders.build_model(config, **overrides)


def to_uint8(images):
    """[-1, 1] floats -> uint8: 127.5 x + 128 clipped to [0, 255] and truncated, as the
    DiT/ADM sampling scripts do. Works on NumPy arrays (on the host) and jax arrays (in a
    jitted function)."""
    if not isinstance(images, jax.Array):
        images = np.asarray(images, np.float32)
    return (images * 127.5 + 128.0).clip(0.0, 255.0).astype(np.uint8)


def decode(x: jax.Array, vae: Any = None, vae_params: Any = None,
           scale_factor: Any = 1.0) -> jax.Array:
    """Samples as images: VAE-decoded when `vae` is given, from latents / scale_factor, or
    from `scale_factor.to_vae_latents(x)` when it is a DataSpec (per-channel statistics)."""
    if vae is None:
        return x
    z = scale_factor.to_vae_latents(x) if hasattr(scale_factor, "to_vae_latents") else x / scale_factor
    return vae.apply({"params": vae_params}, z, method=vae.decode)


def to_uint8_images(x: jax.Array, vae: Any = None, vae_params: Any = None,
                    scale_factor: float = 1.0) -> jax.Array:
    """Samples -> uint8 pixels (`decode`, then `to_uint8`)."""
    return to_uint8(decode(x, vae, vae_params, scale_factor))


# ---------------------------------------------------------------------------------------------
# The sampler.


def make_sample_fn(model: Any, settings: Settings, latent_shape: Sequence[int], *,
                   config: Mapping[str, Any], noise_sharding: Any = None) -> Callable:
    """`sample(params, labels, key) -> float samples (len(labels), *latent_shape)`, unjitted.

    The one dispatch of `settings.sampler` (diffusion.SAMPLERS) for every caller. The noise
    comes from the first half of `key`, the sampler's own randomness from the second.
    Classifier-free guidance at `settings.cfg_scale` on the first `settings.guidance_channels`
    channels (all when None), limited to `settings.guidance_interval` (flow times) when set:
    the flow samplers guide at the flow times inside it, the DDPM/DDIM ones at the original
    steps of matching signal-to-noise ratio (`FlowMatching.ddpm_step_interval`).
    """
    check_sampler(config, settings.sampler)
    entry = SAMPLERS[settings.sampler]
    channels = int(latent_shape[-1])
    guidance = (None if settings.guidance_channels is None
                else min(settings.guidance_channels, channels))
    cfg_scale = float(settings.cfg_scale)
    flow = builders.build_flow(config)
    if entry.objective in builders.FEW_STEP_KINDS:
        objective = builders.build_diffusion(config)
        if settings.guidance_interval is not None:
            raise ValueError(f"the {settings.sampler} sampler guides every step: it takes no "
                             "guidance interval")
    elif entry.objective == "flow":
        options = {"num_steps": int(settings.num_steps), "shift": flow.sampling_shift}
        if settings.sampler == "euler_maruyama":
            form, norm, last_step, last_size = settings.sde
            options.update(diffusion_form=form, diffusion_norm=norm, last_step=last_step,
                           last_step_size=last_size)
        interval = settings.guidance_interval
    else:
        diffusion = builders.build_diffusion(config, settings.respacing)
        interval = settings.guidance_interval
        if interval is not None:
            interval = flow.ddpm_step_interval(*interval, _unrespaced_alphas_cumprod(config))

    def sample(params, labels, key):
        noise_key, loop_key = jax.random.split(key)
        noise = jax.random.normal(noise_key, (labels.shape[0], *latent_shape), jnp.float32)
        if noise_sharding is not None:
            noise = jax.lax.with_sharding_constraint(noise, noise_sharding)
        apply_fn = lambda x, t, y: model.apply({"params": params}, x, t, y)  # noqa: E731
        if entry.objective in builders.FEW_STEP_KINDS:
            # Guidance mixes the network's outputs with and without labels at each step, as
            # for the other objectives; the two time inputs travel as one (N, 2) array so
            # that the guided batch doubles them with the images.
            def apply_times(x, times, y):
                return model.apply({"params": params}, x, times[:, 0], y, h=times[:, 1])
            guided = guided_model_fn(apply_times, labels, cfg_scale,
                                     null_label=model.num_classes,
                                     guidance_channels=guidance)
            u_fn = lambda z, r, t: guided(z, jnp.stack(network_times(r, t), axis=1))  # noqa: E731
            return entry.loop(objective, u_fn, noise, loop_key, num_steps=settings.num_steps)
        if entry.objective == "flow":
            velocity_fn = flow.guided_velocity_fn(apply_fn, labels, cfg_scale,
                                                  null_label=model.num_classes,
                                                  guidance_channels=guidance, interval=interval)
            return entry.loop(flow, velocity_fn, noise, loop_key, **options)
        model_fn = guided_model_fn(apply_fn, labels, cfg_scale, null_label=model.num_classes,
                                   guidance_channels=guidance, interval=interval)
        return entry.loop(diffusion, model_fn, noise, loop_key)

    return sample


def _unrespaced_alphas_cumprod(config: Mapping[str, Any]) -> np.ndarray:
    """abar of every original DDPM step (the index a DDPM model_fn sees)."""
    d = config.get("diffusion") or {}
    betas = named_beta_schedule(d.get("noise_schedule", "linear"), int(d.get("steps", 1000)))
    return np.cumprod(1.0 - betas)


def batch_key(seed, batch_index) -> jax.Array:
    """The key of global batch `batch_index` of a run with `seed`."""
    return jax.random.fold_in(jax.random.key(seed), batch_index)


def make_sampler(model: Any, settings: Settings, space: data_spec.DataSpec,
                 mesh: jax.sharding.Mesh, *, config: Mapping[str, Any],
                 vae: Any = None) -> Callable:
    """`sample(params, vae_params, labels, seed, batch_index) -> (uint8 (B, H, W, C), finite
    (B,))`, jitted.

    Batch b is drawn with `batch_key(seed, b)`; the batch dim is split over `mesh`, weights
    are replicated. The VAE (when `space.vae`) decodes latents / scale_factor inside the same
    program. `finite` says which samples were finite before the cast to uint8, which would
    silently turn NaN into black pixels.
    """
    if space.vae and vae is None:
        raise ValueError("these are VAE latents: a VAE module is needed to decode them")
    batch = NamedSharding(mesh, P(BATCH_AXIS))
    replicated = NamedSharding(mesh, P())
    draw = make_sample_fn(model, settings, space.latent_shape, config=config,
                          noise_sharding=batch)

    def sample(params, vae_params, labels, seed, batch_index):
        x = draw(params, labels, batch_key(seed, batch_index))
        x = decode(x, vae if space.vae else None, vae_params, space)
        return to_uint8(x), jnp.isfinite(x).all(axis=tuple(range(1, x.ndim)))

    return jax.jit(sample, in_shardings=(replicated, replicated, batch, replicated, replicated),
                   out_shardings=(batch, batch))
