"""What to sample from: a checkpoint's weights and saved config, and the space its network
generates in."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

from etils import epath

from dico_jax import checkpoint as ckpt_lib
from dico_jax.data import spec as data_spec
from dico_jax.diffusion import SAMPLERS
from dico_jax.errors import UserError


def image_space(config: Mapping[str, Any], workdir: str | None = None) -> data_spec.DataSpec:
    """What the run's network generates: from its dataset manifest when that is readable,
    else from the workdir's config.json (the latent shape training recorded), else from the
    config alone (`dico_jax.data.spec`)."""
    run_record = os.path.join(workdir, "config.json") if workdir else ""
    if not data_spec.manifest_dir(config) and run_record and epath.Path(run_record).is_file():
        shape = json.loads(epath.Path(run_record).read_text()).get("latent_shape")
        if shape:
            from dico_jax.models.vae import SD_VAE_SCALING_FACTOR

            # Training checks that the latents are a fixed fraction of the resolution (VAE)
            # or equal (pixels).
            vae = int(shape[0]) != int(config["resolution"])
            kind = config.get("vae") or "sd-vae"
            scale = (SD_VAE_SCALING_FACTOR if kind == "sd-vae" else 1.0) if vae else 1.0
            return data_spec.DataSpec(tuple(int(d) for d in shape),
                                      int(config["model"]["num_classes"]), vae, scale, kind,
                                      *data_spec.saved_stats(config))
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
    if (workdir is None) == (checkpoint is None):
        raise ValueError("give exactly one of --workdir and --checkpoint")
    if workdir is not None:
        if not epath.Path(workdir).is_dir():
            raise FileNotFoundError(f"no training workdir {workdir}")
        directory = ckpt_lib.checkpoint_dir(workdir)
        if not epath.Path(directory).is_dir():
            raise FileNotFoundError(f"{workdir} has no checkpoints/ folder: not a training workdir "
                                    "or no checkpoint saved yet")
    else:
        directory, step = ckpt_lib.resolve_checkpoint_path(checkpoint, step)
        if os.path.basename(directory) == "checkpoints":
            workdir = os.path.dirname(directory)
    weights = "ema_params" if use_ema else "params"
    try:
        state, step = ckpt_lib.restore_to_host(directory, step, items=(weights,))
    except KeyError as err:
        hint = " (use --nouse_ema to sample from the raw weights)" if use_ema else ""
        raise KeyError(f"{err.args[0]}{hint}") from None
    try:
        config = ckpt_lib.read_config(directory, step)
    except Exception as err:  # noqa: BLE001 - Orbax raises several types for a missing item
        raise FileNotFoundError(f"checkpoint {directory}/{step} has no readable config: {err}") from err
    return Source(directory, step, state[weights], config, weights, workdir)


# What may be overridden: the sampling settings, not the network the checkpoint holds.
_OVERRIDABLE = ("sampling.", "seed", "dtype")
# Override values that must be at least this (counts and sizes).
_AT_LEAST = {"num_samples": 1, "num_steps": 1, "batch_size": 0, "grid_per_class": 0,
             "grid_classes": 0, "every_steps": 0}


def check_overrides(overrides: Mapping[str, Any], overridable: tuple[str, ...] = _OVERRIDABLE,
                    what: str = "sampling") -> None:
    """The `--config.*` overrides a command applies onto a checkpoint's config: only the
    fields of `overridable` (a trailing "." admits a section), finite numbers, no zero or
    negative counts. Checked on the command line, before any start-up work."""
    for path, value in overrides.items():
        if not any(path.startswith(p) if p.endswith(".") else path == p for p in overridable):
            named = ", ".join(f"--config.{p}*" if p.endswith(".") else f"--config.{p}"
                              for p in overridable)
            raise UserError(f"--config.{path}: only {named} apply to {what}; the network is the "
                            "checkpoint's")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--config.{path}={value}: must be a finite number")
        low = _AT_LEAST.get(path.rsplit(".", 1)[-1])
        if low is not None and isinstance(value, int) and value < low:
            raise UserError(f"--config.{path}={value}: must be >= {low}")


def apply_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
    """The saved `config` with the flattened `overrides` ({"sampling.cfg_scale": 2.0, ...}).

    A "ddimN" sampler given without a respacing brings its own steps, not the saved respacing.
    """
    check_overrides(overrides)
    config = {**config, "sampling": dict(config.get("sampling") or {})}
    for path, value in overrides.items():
        if isinstance(value, tuple):
            value = list(value)
        if path.startswith("sampling."):
            *parents, leaf = path.split(".")[1:]
            node = config["sampling"]
            for name in parents:  # a nested section (sampling.sde.*), copied before it changes
                node[name] = dict(node.get(name) or {})
                node = node[name]
            node[leaf] = value
        else:
            config[path] = value
    sampler = overrides.get("sampling.sampler")
    if sampler and sampler not in SAMPLERS and "sampling.respacing" not in overrides:
        config["sampling"]["respacing"] = None
    return config
