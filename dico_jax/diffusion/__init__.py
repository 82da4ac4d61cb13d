"""Diffusion for DiCo: Gaussian (DDPM), flow-matching and few-step (MeanFlow, shortcut)
objectives, samplers and guidance."""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from dico_jax.diffusion.gaussian import (
    BETA_SCHEDULES,
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    named_beta_schedule,
    normal_kl,
)
from dico_jax.diffusion.flow import FlowMatching, model_time, path_coefficients, shift_time
from dico_jax.diffusion.flow_sampling import (
    euler_maruyama_sample,
    euler_sample,
    heun_sample,
    time_grid,
)
from dico_jax.diffusion.guidance import guided_model_fn
from dico_jax.diffusion.meanflow import MeanFlow, sample_average_velocity
from dico_jax.diffusion.shortcut import Shortcut
from dico_jax.diffusion.respace import respaced_betas, space_timesteps
from dico_jax.diffusion.sampling import ddim_sample_loop, p_sample_loop

__all__ = [
    "BETA_SCHEDULES",
    "FlowMatching",
    "GaussianDiffusion",
    "MeanFlow",
    "SAMPLERS",
    "Sampler",
    "Shortcut",
    "create_diffusion",
    "ddim_sample_loop",
    "discretized_gaussian_log_likelihood",
    "euler_maruyama_sample",
    "euler_sample",
    "guided_model_fn",
    "heun_sample",
    "model_time",
    "named_beta_schedule",
    "normal_kl",
    "p_sample_loop",
    "path_coefficients",
    "resolve_sampler",
    "respaced_betas",
    "sample_average_velocity",
    "shift_time",
    "space_timesteps",
    "time_grid",
]


def create_diffusion(
    timestep_respacing: str | int | Sequence[int] | None = "",
    noise_schedule: str = "linear",
    learn_sigma: bool = True,
    diffusion_steps: int = 1000,
) -> GaussianDiffusion:
    """The DiT/DiCo diffusion: `diffusion_steps` steps of `noise_schedule`, optionally respaced.

    "" or None keeps every step (training); "250" is the FID sampling setting; "ddimN" is for
    `ddim_sample_loop`.
    """
    betas = named_beta_schedule(noise_schedule, diffusion_steps)
    if timestep_respacing is None or timestep_respacing == "":
        kept = list(range(diffusion_steps))
    else:
        kept = space_timesteps(diffusion_steps, timestep_respacing)
    if len(kept) < 2:
        raise ValueError(
            f"timestep_respacing {timestep_respacing!r} keeps {len(kept)} step(s); need >= 2"
        )
    alphas_cumprod = np.cumprod(1.0 - betas)
    return GaussianDiffusion.from_betas(
        respaced_betas(alphas_cumprod, kept), np.asarray(kept), learn_sigma=learn_sigma
    )


def _ode_loop(solver):
    def loop(flow, velocity_fn, noise, rng, *, num_steps: int, shift: float = 1.0, **_):
        del rng  # deterministic
        t0, t1 = flow.ode_interval()
        return solver(velocity_fn, noise, num_steps, t0=t0, t1=t1, shift=shift)
    return loop


def _sde_loop(flow, velocity_fn, noise, rng, *, num_steps: int, shift: float = 1.0,
              diffusion_form: str = "sigma", diffusion_norm: float = 1.0,
              last_step: str | None = "mean", last_step_size: float = 0.04):
    return euler_maruyama_sample(
        rng, velocity_fn, noise, num_steps, score_from_velocity=flow.score_from_velocity,
        diffusion_fn=lambda t: flow.diffusion_coefficient(t, diffusion_form, diffusion_norm),
        t0=flow.sde_start(diffusion_form), last_step=last_step, last_step_size=last_step_size,
        shift=shift)


def _few_step_loop(objective, u_fn, noise, rng, *, num_steps: int):
    del rng  # deterministic
    return objective.sample(u_fn, noise, num_steps)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How to run one sampler, and for which objective (`config.diffusion.kind`).

    "ddpm" samplers: `loop(diffusion, model_fn, noise, rng) -> x_0`, with the prefix their
    respacing takes (DDIM strides the kept steps evenly: "ddim50"). "flow" samplers:
    `loop(flow, velocity_fn, noise, rng, *, num_steps, shift, **sde_options) -> x_1`.
    "meanflow" and "shortcut": `loop(objective, u_fn, noise, rng, *, num_steps) -> x_0` with
    u_fn(z, r, t) the network over the interval [r, t] (one evaluation per step).
    """

    loop: Callable
    respacing_prefix: str = ""
    objective: str = "ddpm"

    @property
    def takes_num_steps(self) -> bool:
        """Whether the sampler's length is `num_steps` (all but the DDPM ones, which take a
        respacing)."""
        return self.objective != "ddpm"


# Every sampler the sampling commands, the training grids and the benchmark accept, by name.
SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler(p_sample_loop),
    "ddim": Sampler(ddim_sample_loop, respacing_prefix="ddim"),
    "euler": Sampler(_ode_loop(euler_sample), objective="flow"),
    "heun": Sampler(_ode_loop(heun_sample), objective="flow"),
    "euler_maruyama": Sampler(_sde_loop, objective="flow"),
    "meanflow": Sampler(_few_step_loop, objective="meanflow"),
    "shortcut": Sampler(_few_step_loop, objective="shortcut"),
}


def resolve_sampler(sampler: str, respacing: str | int | None = None) -> tuple[str, str]:
    """(name in SAMPLERS, respacing for `create_diffusion`) from a sampler setting ("ddpm",
    "ddim" or "ddimN", the last fixing N steps) and a respacing ("250"; None: "250" or N).
    The other objectives' samplers take no respacing (their step count is separate): "" comes
    back.

    A respacing that disagrees with the steps of "ddimN" is an error rather than a silent
    choice of one of them.
    """
    name = str(sampler)
    for key, entry in SAMPLERS.items():
        prefix, steps = entry.respacing_prefix, name[len(entry.respacing_prefix):]
        if prefix and name.startswith(prefix) and steps.isdigit():
            if respacing is not None and str(respacing) not in (name, steps):
                raise ValueError(f"sampler {name} fixes the steps; it conflicts with respacing "
                                 f"{respacing}")
            return key, name
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: use one of {', '.join(sorted(SAMPLERS))}, "
                         "or ddimN for N DDIM steps")
    if SAMPLERS[name].takes_num_steps:
        return name, ""
    respacing = "250" if respacing is None else str(respacing)
    prefix = SAMPLERS[name].respacing_prefix
    if prefix and not respacing.startswith(prefix):
        respacing = prefix + respacing
    return name, respacing
