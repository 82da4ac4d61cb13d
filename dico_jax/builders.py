"""One way to build each object of a run from its config: the network, the diffusion and the
optimizer.

Every function takes the run's `ml_collections.ConfigDict` or the plain dict saved with a
checkpoint (`checkpoint.read_config`), so training, sampling, conversion and the tools build
the same objects from the same fields.
"""
from __future__ import annotations

from typing import Any, Mapping

import optax

from dico_jax.diffusion import GaussianDiffusion, create_diffusion
from dico_jax.models import DiCo, get_model


def _section(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = config.get(name) if hasattr(config, "get") else None
    return section if section is not None else {}


def learn_sigma(config: Mapping[str, Any]) -> bool:
    """Whether the network predicts the variance too (the DDPM objective's default)."""
    return bool(_section(config, "diffusion").get("learn_sigma", True))


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


def build_diffusion(config: Mapping[str, Any], respacing: str = "") -> GaussianDiffusion:
    """The config's diffusion: every step for training (""), or respaced for sampling."""
    d = _section(config, "diffusion")
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
