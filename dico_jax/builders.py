"""One way to build each object of a run from its config: the network, the diffusion and the
optimizer.

Every function takes the run's `ml_collections.ConfigDict` or the plain dict saved with a
checkpoint (`checkpoint.read_config`), so training, sampling, conversion and the tools build
the same objects from the same fields.
"""
from __future__ import annotations

from typing import Any, Mapping

import optax

from dico_jax.diffusion import FlowMatching, GaussianDiffusion, create_diffusion
from dico_jax.models import DiCo, get_model

# The training objectives `config.diffusion.kind` selects.
DIFFUSION_KINDS = ("ddpm", "flow")


def _section(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = config.get(name) if hasattr(config, "get") else None
    return section if section is not None else {}


def diffusion_kind(config: Mapping[str, Any]) -> str:
    """The training objective: "ddpm" (the official one, also for configs saved before the
    field existed) or "flow" (flow matching)."""
    kind = _section(config, "diffusion").get("kind", "ddpm") or "ddpm"
    if kind not in DIFFUSION_KINDS:
        raise ValueError(f"config.diffusion.kind={kind!r}: use one of "
                         f"{', '.join(map(repr, DIFFUSION_KINDS))}")
    return kind


def learn_sigma(config: Mapping[str, Any]) -> bool:
    """Whether the network predicts the variance too (the DDPM objective's default; never
    with flow matching, whose network outputs `in_channels`)."""
    if diffusion_kind(config) == "flow":
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
    return fields


def build_model(config: Mapping[str, Any], **overrides) -> DiCo:
    """The DiCo module the config describes; `overrides` replace fields (e.g. dtype)."""
    fields = model_fields(config)
    fields.update(overrides)
    return get_model(_section(config, "model")["name"], **fields)


def build_diffusion(config: Mapping[str, Any], respacing: str = ""
                    ) -> GaussianDiffusion | FlowMatching:
    """The config's objective: for "ddpm" the diffusion with every step for training (""), or
    respaced for sampling; for "flow" the `FlowMatching` (`respacing` does not apply)."""
    d = _section(config, "diffusion")
    if diffusion_kind(config) == "flow":
        model = _section(config, "model")
        out_ch, in_ch = model.get("out_channels"), model.get("in_channels")
        if out_ch is not None and in_ch is not None and int(out_ch) != int(in_ch):
            # The training loop fills out_channels from config.diffusion.learn_sigma.
            raise ValueError(
                f"config.diffusion.kind='flow' predicts in_channels={in_ch} channels, but "
                f"config.model.out_channels={out_ch}: set config.diffusion.learn_sigma=False "
                "(flow matching learns no variance)")
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
