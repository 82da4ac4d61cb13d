"""Fixed-step samplers for flow matching: Euler and Heun ODE, Euler-Maruyama SDE.

Time follows `flow.py` (SiT's convention): t = 0 is noise, t = 1 data, and every sampler runs
forward in t from the noise `x0` it is given. `velocity_fn(x, t)` takes a per-example time t
of shape (N,); `FlowMatching.velocity_fn` and `guided_velocity_fn` build it from a network, and
`FlowMatching.score_from_velocity` gives the SDE its score. Each sampler is one `lax.scan` over
a time grid fixed at trace time, so it jits with the step count static.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

VectorFn = Callable[[jax.Array, jax.Array], jax.Array]
LAST_STEPS = ("mean", "euler", None)


def time_grid(num_steps: int, t0: float = 0.0, t1: float = 1.0, shift: float = 1.0) -> np.ndarray:
    """num_steps + 1 float64 times: uniform on [t0, t1], then SD3's shift (see `flow.shift_time`).

    The shift keeps the end points 0 and 1 and, for shift > 1, spends more steps near noise.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 <= t0 < t1 <= 1.0:
        raise ValueError(f"need 0 <= t0 < t1 <= 1, got t0={t0}, t1={t1}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    t = np.linspace(t0, t1, num_steps + 1, dtype=np.float64)
    return t / (shift - (shift - 1.0) * t)


def _scan_steps(step, x0, ts: np.ndarray, keys=None):
    """Runs x <- step(x, t, t_next, key) over consecutive pairs of `ts` in one scan."""
    batch = x0.shape[0]
    t_cur = jnp.asarray(ts[:-1], jnp.float32)
    t_next = jnp.asarray(ts[1:], jnp.float32)

    def body(x, inputs):
        tc, tn, key = inputs
        full = lambda v: jnp.full((batch,), v, jnp.float32)  # noqa: E731
        return step(x, full(tc), full(tn), key), None

    if keys is None:
        keys = jnp.zeros((len(ts) - 1,), jnp.uint32)
    x, _ = jax.lax.scan(body, x0.astype(jnp.float32), (t_cur, t_next, keys))
    return x


def _dt(t, t_next, ndim):
    return (t_next - t).reshape((-1,) + (1,) * (ndim - 1))


def euler_sample(velocity_fn: VectorFn, x0, num_steps: int, *, t0: float = 0.0,
                 t1: float = 1.0, shift: float = 1.0):
    """Euler's method on dx/dt = v(x, t) over `time_grid(num_steps, t0, t1, shift)`.

    One velocity evaluation per step; global error O(1 / num_steps).
    """
    def step(x, t, t_next, _):
        return x + _dt(t, t_next, x.ndim) * velocity_fn(x, t)

    return _scan_steps(step, x0, time_grid(num_steps, t0, t1, shift))


def heun_sample(velocity_fn: VectorFn, x0, num_steps: int, *, t0: float = 0.0,
                t1: float = 1.0, shift: float = 1.0):
    """Heun's method (explicit trapezoid) on dx/dt = v(x, t); two evaluations per step.

    x' = x + h v(x, t);  x_next = x + h/2 (v(x, t) + v(x', t + h)). Global error O(1 / N^2).
    The velocity of flow matching is finite at t = 1, so unlike EDM's Heun for diffusion the
    last step keeps its correction.
    """
    def step(x, t, t_next, _):
        h = _dt(t, t_next, x.ndim)
        v = velocity_fn(x, t)
        v_next = velocity_fn(x + h * v, t_next)
        return x + 0.5 * h * (v + v_next)

    return _scan_steps(step, x0, time_grid(num_steps, t0, t1, shift))


def euler_maruyama_sample(key, velocity_fn: VectorFn, x0, num_steps: int, *,
                          score_from_velocity: Callable[[jax.Array, jax.Array, jax.Array],
                                                        jax.Array],
                          diffusion_fn: Callable[[jax.Array], jax.Array],
                          t0: float = 0.0, last_step: str | None = "mean",
                          last_step_size: float = 0.04, shift: float = 1.0):
    """Euler-Maruyama on SiT's SDE dx = [v + w_t s] dt + sqrt(2 w_t) dW, then a last step.

    v = velocity_fn(x, t); the score s = score_from_velocity(v, x, t) (e.g.
    `FlowMatching.score_from_velocity`), so each step costs one network evaluation;
    w_t = diffusion_fn(t), (N,) in and out (e.g. `FlowMatching.diffusion_coefficient`).
    The term w_t s in the drift and the noise sqrt(2 w_t) dW cancel in the Fokker-Planck
    equation, so every marginal p_t is that of the ODE and any w >= 0 reaches the data at t = 1.

    Following SiT's sampler: `num_steps` counts network evaluations. With a last step, the
    stochastic steps run over `time_grid(num_steps - 1, t0, 1 - last_step_size, shift)` and a
    deterministic last step of size `last_step_size` ends at t = 1, where the score is
    singular: "mean" adds the SDE drift (v + w s) h without noise (SiT's default; a denoising
    step), "euler" the ODE drift v h. With `last_step=None` all `num_steps` stochastic steps
    run over [t0, 1]; the last one evaluates at t < 1, so the score must stay finite there.
    """
    if last_step not in LAST_STEPS:
        raise ValueError(f"unknown last_step {last_step!r}; accepted: {LAST_STEPS}")
    if last_step is None:
        ts, stochastic = time_grid(num_steps, t0, 1.0, shift), num_steps
    else:
        if num_steps < 2:
            raise ValueError(f"num_steps must be >= 2 with a last step, got {num_steps}")
        if not 0.0 < last_step_size < 1.0 - t0:
            raise ValueError(f"last_step_size must lie in (0, 1 - t0), got {last_step_size}")
        ts, stochastic = time_grid(num_steps - 1, t0, 1.0 - last_step_size, shift), num_steps - 1

    def drift(x, t):
        w = jnp.broadcast_to(diffusion_fn(t), t.shape).reshape((-1,) + (1,) * (x.ndim - 1))
        v = velocity_fn(x, t)
        return v + w * score_from_velocity(v, x, t), w

    def step(x, t, t_next, step_key):
        h = _dt(t, t_next, x.ndim)
        f, w = drift(x, t)
        z = jax.random.normal(step_key, x.shape, jnp.float32)
        return x + f * h + jnp.sqrt(2.0 * w * h) * z

    x = _scan_steps(step, x0, ts, jax.random.split(key, stochastic))
    if last_step is None:
        return x
    t_last = jnp.full((x.shape[0],), ts[-1], jnp.float32)
    h = jnp.float32(1.0 - ts[-1])
    if last_step == "mean":
        return x + h * drift(x, t_last)[0]
    return x + h * velocity_fn(x, t_last)
