"""Ancestral (DDPM) and DDIM samplers, each compiled as a single `lax.scan` over the kept steps.

`diffusion` is a `GaussianDiffusion`; `model_fn(x_t, t_original)` returns the model output.
Both samplers run from the noisiest kept step down to step 0. Intermediate states can be
recorded for progress display: `record_at` lists loop iterations (0 = the first, noisiest
step; num_timesteps - 1 = the last) and the result is then `(samples, {"x", "pred_xstart"})`
with arrays of shape (len(record_at), *noise.shape): x after that iteration and the x_0
prediction made in it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

StepFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def _record_slots(num_steps: int, record_at: Sequence[int]) -> np.ndarray:
    """Per-iteration slot in the record buffer, -1 where nothing is recorded."""
    slots = np.full((num_steps,), -1, dtype=np.int32)
    for slot, it in enumerate(record_at):
        it = int(it)
        if not 0 <= it < num_steps:
            raise ValueError(f"record_at entry {it} is outside the {num_steps} sampling iterations")
        slots[it] = slot
    return slots


def _run_reverse_loop(diffusion, noise, rng, step_fn: StepFn, record_at):
    """Scans `step_fn(x, t, key) -> (x_prev, pred_xstart)` over t = T-1, ..., 0."""
    num_steps = diffusion.num_timesteps
    batch = noise.shape[0]
    record_at = tuple(record_at)
    slots = jnp.asarray(_record_slots(num_steps, record_at))
    keys = jax.random.split(rng, num_steps)
    iterations = jnp.arange(num_steps, dtype=jnp.int32)
    x0 = noise.astype(jnp.float32)

    def body(carry, inputs):
        x, records = carry
        it, key = inputs
        t = jnp.full((batch,), num_steps - 1 - it, dtype=jnp.int32)
        x_prev, pred_xstart = step_fn(x, t, key)
        if records is not None:
            slot = slots[it]
            keep = slot >= 0
            idx = jnp.maximum(slot, 0)
            records = {
                "x": records["x"].at[idx].set(jnp.where(keep, x_prev, records["x"][idx])),
                "pred_xstart": records["pred_xstart"].at[idx].set(
                    jnp.where(keep, pred_xstart, records["pred_xstart"][idx])),
            }
        return (x_prev, records), None

    records = None
    if record_at:
        buf = jnp.zeros((len(record_at), *x0.shape), jnp.float32)
        records = {"x": buf, "pred_xstart": buf}
    (x, records), _ = jax.lax.scan(body, (x0, records), (iterations, keys))
    return (x, records) if record_at else x


def p_sample_loop(diffusion, model_fn, noise, rng, *, clip_denoised: bool = False,
                  record_at: Sequence[int] = ()):
    """Ancestral sampling: x_{t-1} = mean + sigma_t z (no noise at t = 0).

    The DiT/DiCo FID setting is a "250"-respaced diffusion with clip_denoised=False.
    """
    def step(x, t, key):
        out = diffusion.p_mean_variance(model_fn(x, diffusion.timestep_map[t]), x, t,
                                        clip_denoised=clip_denoised)
        z = jax.random.normal(key, x.shape, jnp.float32)
        nonzero = (t != 0).astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
        return out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * z, out["pred_xstart"]

    return _run_reverse_loop(diffusion, noise, rng, step, record_at)


def ddim_sample_loop(diffusion, model_fn, noise, rng, *, eta: float = 0.0,
                     clip_denoised: bool = False, record_at: Sequence[int] = ()):
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
            return mean, pred_xstart
        z = jax.random.normal(key, x.shape, jnp.float32)
        nonzero = (t != 0).astype(jnp.float32).reshape(shape)
        return mean + nonzero * sigma * z, pred_xstart

    return _run_reverse_loop(diffusion, noise, rng, step, record_at)
