"""Ancestral (DDPM) and DDIM samplers, each compiled as a single `lax.scan` over the kept steps.

`diffusion` is a `GaussianDiffusion`; `model_fn(x_t, t_original)` returns the model output.
Both samplers run from the noisiest kept step down to step 0.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

StepFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _run_reverse_loop(diffusion, noise, rng, step_fn: StepFn):
    """Scans `step_fn(x, t, key) -> x_prev` over t = T-1, ..., 0."""
    num_steps = diffusion.num_timesteps
    batch = noise.shape[0]
    keys = jax.random.split(rng, num_steps)
    iterations = jnp.arange(num_steps, dtype=jnp.int32)

    def body(x, inputs):
        it, key = inputs
        t = jnp.full((batch,), num_steps - 1 - it, dtype=jnp.int32)
        return step_fn(x, t, key), None

    x, _ = jax.lax.scan(body, noise.astype(jnp.float32), (iterations, keys))
    return x


def p_sample_loop(diffusion, model_fn, noise, rng, *, clip_denoised: bool = False):
    """Ancestral sampling: x_{t-1} = mean + sigma_t z (no noise at t = 0).

    The DiT/DiCo FID setting is a "250"-respaced diffusion with clip_denoised=False.
    """
    def step(x, t, key):
        out = diffusion.p_mean_variance(model_fn(x, diffusion.timestep_map[t]), x, t,
                                        clip_denoised=clip_denoised)
        z = jax.random.normal(key, x.shape, jnp.float32)
        nonzero = (t != 0).astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
        return out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * z

    return _run_reverse_loop(diffusion, noise, rng, step)


def ddim_sample_loop(diffusion, model_fn, noise, rng, *, eta: float = 0.0,
                     clip_denoised: bool = False):
    """DDIM (Song et al., eq. 12): deterministic for eta = 0, ancestral-like for eta = 1."""
    def step(x, t, key):
        out = diffusion.p_mean_variance(model_fn(x, diffusion.timestep_map[t]), x, t,
                                        clip_denoised=clip_denoised)
        pred_xstart = out["pred_xstart"]
        eps = diffusion.predict_eps_from_xstart(x, t, pred_xstart)
        shape = (-1,) + (1,) * (x.ndim - 1)
        abar = diffusion.alphas_cumprod[t].reshape(shape)
        abar_prev = diffusion.alphas_cumprod_prev[t].reshape(shape)
        sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar)) * jnp.sqrt(1.0 - abar / abar_prev)
        mean = pred_xstart * jnp.sqrt(abar_prev) + jnp.sqrt(1.0 - abar_prev - sigma**2) * eps
        if isinstance(eta, (int, float)) and eta == 0.0:
            return mean
        z = jax.random.normal(key, x.shape, jnp.float32)
        nonzero = (t != 0).astype(jnp.float32).reshape(shape)
        return mean + nonzero * sigma * z

    return _run_reverse_loop(diffusion, noise, rng, step)
