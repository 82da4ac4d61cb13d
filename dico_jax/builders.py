"""One way to build each object of a run from its config: the network, the diffusion and the
optimizer.

Every function takes the run's `ml_collections.ConfigDict` or the plain dict saved with a
checkpoint (`checkpoint.read_config`), so training, sampling, conversion and the tools build
the same objects from the same fields.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import optax

from dico_jax.diffusion import FlowMatching, GaussianDiffusion, create_diffusion
from dico_jax.diffusion.meanflow import MeanFlow
from dico_jax.diffusion.shortcut import Shortcut
from dico_jax.models import DiCo, get_model

# The training objectives `config.diffusion.kind` selects.
DIFFUSION_KINDS = ("ddpm", "flow", "meanflow", "shortcut")
# The few-step objectives: their network takes a second time input (the interval or step
# size) and samples in a few evaluations (`meanflow.sample_average_velocity`).
FEW_STEP_KINDS = ("meanflow", "shortcut")
Objective = GaussianDiffusion | FlowMatching | MeanFlow | Shortcut


def _section(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = config.get(name) if hasattr(config, "get") else None
    return section if section is not None else {}


def diffusion_kind(config: Mapping[str, Any]) -> str:
    """The training objective: "ddpm" (the official one, also for configs saved before the
    field existed), "flow" (flow matching), "meanflow" or "shortcut" (few-step)."""
    kind = _section(config, "diffusion").get("kind", "ddpm") or "ddpm"
    if kind not in DIFFUSION_KINDS:
        raise ValueError(f"config.diffusion.kind={kind!r}: use one of "
                         f"{', '.join(map(repr, DIFFUSION_KINDS))}")
    return kind


def learn_sigma(config: Mapping[str, Any]) -> bool:
    """Whether the network predicts the variance too (the DDPM objective's default; never
    with the other objectives, whose network outputs `in_channels`)."""
    if diffusion_kind(config) != "ddpm":
        return False
    return bool(_section(config, "diffusion").get("learn_sigma", True))


def build_flow(config: Mapping[str, Any]) -> FlowMatching:
    """The `FlowMatching` of `config.diffusion.flow` (for any kind: a DDPM run's guidance
    interval is mapped to its steps through this path, linear by default)."""
    f = _section(_section(config, "diffusion"), "flow")
    eps = {k: (None if f.get(k) is None else float(f[k])) for k in ("train_eps", "sample_eps")}
    return FlowMatching(path=f.get("path", "linear"), prediction=f.get("prediction", "velocity"),
                        time_sampling=f.get("time_sampling", "uniform"),
                        logit_mean=float(f.get("logit_mean", 0.0)),
                        logit_std=float(f.get("logit_std", 1.0)),
                        shift=float(f.get("shift", 1.0)),
                        sample_shift=(None if f.get("sample_shift") is None
                                      else float(f["sample_shift"])),
                        cosine_weight=float(f.get("cosine_weight", 0.0)), **eps)


def model_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """`get_model` overrides: the set fields of `config.model` (all but `name`), the compute
    dtype, rematerialization and whether the variance is learned."""
    fields = {k: v for k, v in _section(config, "model").items()
              if k != "name" and v is not None}
    if "depths" in fields:
        fields["depths"] = tuple(int(d) for d in fields["depths"])
    fields.update(dtype=config.get("dtype", "float32"), remat=config.get("remat", "none"),
                  learn_sigma=learn_sigma(config))
    if diffusion_kind(config) in FEW_STEP_KINDS:
        fields["second_time"] = True
    return fields


def build_model(config: Mapping[str, Any], **overrides) -> DiCo:
    """The DiCo module the config describes; `overrides` replace fields (e.g. dtype)."""
    fields = model_fields(config)
    fields.update(overrides)
    return get_model(_section(config, "model")["name"], **fields)


def build_meanflow(config: Mapping[str, Any]) -> MeanFlow:
    """The `MeanFlow` of `config.diffusion.meanflow` (fields left out keep the paper's)."""
    m = _section(_section(config, "diffusion"), "meanflow")
    fields = {f.name: float(m[f.name]) for f in dataclasses.fields(MeanFlow)
              if m.get(f.name) is not None}
    try:
        return MeanFlow(**fields)
    except ValueError as err:
        raise ValueError(f"config.diffusion.meanflow.{err}") from None


def build_shortcut(config: Mapping[str, Any]) -> Shortcut:
    """The `Shortcut` of `config.diffusion.shortcut` (fields left out keep the paper's)."""
    m = _section(_section(config, "diffusion"), "shortcut")
    kinds = {"denoise_steps": int, "bootstrap_every": int, "ema_teacher": bool}
    fields = {k: kind(m[k]) for k, kind in kinds.items() if m.get(k) is not None}
    try:
        return Shortcut(**fields)
    except ValueError as err:
        raise ValueError(f"config.diffusion.shortcut.{err}") from None


def build_diffusion(config: Mapping[str, Any], respacing: str = "") -> Objective:
    """The config's objective: for "ddpm" the diffusion with every step for training (""), or
    respaced for sampling; for the others their objective (`respacing` does not apply)."""
    d = _section(config, "diffusion")
    kind = diffusion_kind(config)
    if kind != "ddpm":
        model = _section(config, "model")
        out_ch, in_ch = model.get("out_channels"), model.get("in_channels")
        if d.get("learn_sigma", False):
            raise ValueError(f"config.diffusion.learn_sigma=True, but config.diffusion.kind="
                             f"{kind!r} learns no variance: set config.diffusion.learn_sigma=False")
        if out_ch is not None and in_ch is not None and int(out_ch) != int(in_ch):
            # The training loop fills out_channels from config.diffusion.learn_sigma.
            raise ValueError(
                f"config.diffusion.kind={kind!r} predicts in_channels={in_ch} channels, but "
                f"config.model.out_channels={out_ch}: set config.diffusion.learn_sigma=False "
                "(only the DDPM objective learns a variance)")
        if kind == "meanflow":
            return build_meanflow(config)
        if kind == "shortcut":
            return build_shortcut(config)
        return build_flow(config)
    return create_diffusion(respacing, noise_schedule=d.get("noise_schedule", "linear"),
                            learn_sigma=learn_sigma(config),
                            diffusion_steps=int(d.get("steps", 1000)))


def learning_rate_schedule(config: Mapping[str, Any]) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps`, then constant `learning_rate`."""
    lr = float(config["learning_rate"])
    warmup = int(config.get("warmup_steps", 0))
    if warmup <= 0:
        return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])


def build_optimizer(config: Mapping[str, Any]) -> tuple[optax.GradientTransformation,
                                                         optax.Schedule]:
    """(AdamW with the schedule above after optional global-norm clipping, the schedule)."""
    schedule = learning_rate_schedule(config)
    adamw = optax.adamw(schedule, b1=config["adam_b1"], b2=config["adam_b2"],
                        eps=config["adam_eps"], weight_decay=config["weight_decay"])
    clip = config.get("grad_clip_norm", 0.0)
    if clip and clip > 0:
        return optax.chain(optax.clip_by_global_norm(clip), adamw), schedule
    return adamw, schedule
