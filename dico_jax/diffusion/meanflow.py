"""MeanFlow (Geng et al. 2025, arXiv 2505.13447): the average-velocity objective, as pure JAX.

Conventions are the paper's, not `flow.py`'s: time t runs from 0 (data) to 1 (noise),
z_t = (1 - t) x + t eps (Eq. 1), the instantaneous velocity is v_t = eps - x, and the network
predicts the average velocity over [r, t] (Eq. 3)

    u(z_t, r, t) = 1 / (t - r) * integral_r^t v(z_s, s) ds,

so that one step from noise is z_0 = z_1 - u(z_1, 0, 1) and, generally, z_r = z_t - (t - r)
u(z_t, r, t) (Eq. 12). The network's first time input is t and its second t - r, embedded
by a second timestep embedder whose output is added to the first (the paper's (t, t - r)
conditioning). Unlike `flow.model_time`, the times are not scaled by 1000: the JVP
differentiates the sinusoidal embedding in t, and a 1000-fold time scale multiplies that
derivative by up to 1000; on the digits the target's (t - r) du/dt term then grew without
bound (the squared error rose from 4 to 2e4 in 1,300 steps). The authors' JAX code feeds
t and t - r unscaled, as SiT feeds t.

Training regresses u_theta(z_t, r, t) on the target of the MeanFlow identity (Eq. 6, 10)

    u_tgt = v_t - (t - r) (v_t d_z u_theta + d_t u_theta),

the total derivative d/dt u along the trajectory (Eq. 8), which is one JVP of the network
with tangents (v_t, 0, 1) for (z, r, t); the target is held constant (stop-gradient, Eq. 9).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

# u_fn(z, r, t) -> average velocity, with r and t of shape (N,) in the paper's time.
AverageVelocityFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

# The network's time inputs are the times themselves (see the module's doc for why not
# 1000 x, as for the flow objective).
MODEL_TIME_SCALE = 1.0


def network_times(r: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(first, second) time inputs of a `second_time` DiCo for the interval [r, t]: t and
    t - r. Shortcut models use the same pair, with t - r their step size d."""
    t = jnp.asarray(t, jnp.float32)
    return MODEL_TIME_SCALE * t, MODEL_TIME_SCALE * (t - jnp.asarray(r, jnp.float32))


def sample_average_velocity(u_fn: AverageVelocityFn, noise: jax.Array, num_steps: int
                            ) -> jax.Array:
    """num_steps network evaluations from z_1 = noise to z_0 over an even grid of t:
    z_r = z_t - (t - r) u(z_t, r, t) (Eq. 12), as one `lax.scan` (one compiled step for any
    count). A shortcut model's step z_{t-d} = z_t - d s(z_t, t, d) is the same update."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    n = noise.shape[0]
    grid = jnp.linspace(1.0, 0.0, num_steps + 1)

    def step(z, interval):
        t, r = jnp.full((n,), interval[0]), jnp.full((n,), interval[1])
        return z - _bcast(t - r, z.ndim) * u_fn(z, r, t).astype(jnp.float32), None

    z, _ = jax.lax.scan(step, noise.astype(jnp.float32), (grid[:-1], grid[1:]))
    return z


def _bcast(a: jax.Array, ndim: int) -> jax.Array:
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))


@dataclasses.dataclass(frozen=True)
class MeanFlow:
    """The MeanFlow objective. Defaults are the paper's ImageNet 256 settings (Table 1 and
    its Appendix A): (r, t) from a logit-normal lognorm(-0.4, 1.0), r != t for 25% of the
    examples, adaptive weighting with p = 1 and c = 1e-3. `cfg_omega` (omega, Eq. 13-16) and
    `cfg_kappa` (kappa, Eq. 19-21) fold classifier-free guidance into the target; omega = 1,
    kappa = 0 is the unguided objective."""

    logit_mean: float = -0.4
    logit_std: float = 1.0
    ratio_r_neq_t: float = 0.25
    adaptive_p: float = 1.0
    adaptive_c: float = 1e-3
    cfg_omega: float = 1.0
    cfg_kappa: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.ratio_r_neq_t <= 1.0:
            raise ValueError(f"ratio_r_neq_t must lie in [0, 1], got {self.ratio_r_neq_t}")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")
        if not self.adaptive_c > 0:
            raise ValueError(f"adaptive_c must be > 0, got {self.adaptive_c}")
        if self.cfg_omega + self.cfg_kappa <= 0 or not 0.0 <= self.cfg_kappa < 1.0:
            raise ValueError(f"cfg_omega={self.cfg_omega}, cfg_kappa={self.cfg_kappa}: need "
                             "0 <= kappa < 1 and omega + kappa > 0")

    def sample_times(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
        """(r, t), each (N,), r <= t: two logit-normal draws sorted, then r set to t for all
        but a `ratio_r_neq_t` share of the examples (those train plain flow matching, since
        u(z, t, t) = v(z, t))."""
        k_pair, k_equal = jax.random.split(key)
        pair = jax.nn.sigmoid(self.logit_mean
                              + self.logit_std * jax.random.normal(k_pair, (n, 2), jnp.float32))
        r, t = jnp.min(pair, axis=1), jnp.max(pair, axis=1)
        equal = jax.random.uniform(k_equal, (n,)) >= self.ratio_r_neq_t
        return jnp.where(equal, t, r), t

    def guided_velocity(self, v: jax.Array, u_cond: Callable[[], jax.Array],
                        u_uncond: Callable[[], jax.Array], dropped: jax.Array | None
                        ) -> jax.Array:
        """The velocity the target is built from. Without guidance v_t itself. With it
        (Eq. 21): v~ = omega v_t + kappa u(z_t, t, t | c) + (1 - omega - kappa) u(z_t, t, t),
        the u's at r = t from the network without gradient, for examples that keep their
        label; an example whose label was dropped (the null class) keeps v~ = v_t."""
        if self.cfg_omega == 1.0 and self.cfg_kappa == 0.0:
            return v
        mixed = self.cfg_omega * v
        if self.cfg_kappa:
            mixed = mixed + self.cfg_kappa * jax.lax.stop_gradient(u_cond())
        rest = 1.0 - self.cfg_omega - self.cfg_kappa
        if rest:
            mixed = mixed + rest * jax.lax.stop_gradient(u_uncond())
        if dropped is None:
            return mixed
        return jnp.where(_bcast(dropped, v.ndim), v, mixed)

    def training_losses(self, u_fn: AverageVelocityFn, x_start: jax.Array, r: jax.Array,
                        t: jax.Array, noise: jax.Array, *,
                        u_cond: AverageVelocityFn | None = None,
                        u_uncond: AverageVelocityFn | None = None,
                        dropped: jax.Array | None = None) -> dict[str, jax.Array]:
        """{"loss", "mse"}, each (N,). u_fn(z, r, t) is the network with the example's labels
        (dropped ones already replaced by the null class); `u_cond`/`u_uncond` are the
        network with the labels and with the null label (default: u_fn), called at r = t only
        with guidance.

        The error Delta = u_theta - sg(u_tgt) (Eq. 9-10) is weighted adaptively
        (Sec. 4.3): loss = sg(w) ||Delta||^2 with w = 1 / (||Delta||^2 + c)^p, the squared
        norm over all of an example's elements. "mse" is ||Delta||^2 per element.
        """
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {noise.shape} != x_start shape {x_start.shape}")
        x = x_start.astype(jnp.float32)
        eps = noise.astype(jnp.float32)
        tb = _bcast(t, x.ndim)
        z = (1.0 - tb) * x + tb * eps  # Eq. 1
        v = eps - x
        u_cond, u_uncond = u_cond or u_fn, u_uncond or u_fn
        v_tilde = self.guided_velocity(v, lambda: u_cond(z, t, t), lambda: u_uncond(z, t, t),
                                       dropped)
        # d/dt u(z_t, r, t) = v d_z u + d_t u: tangents (v~, 0, 1) for (z, r, t) (Eq. 8).
        u, dudt = jax.jvp(u_fn, (z, r, t), (v_tilde, jnp.zeros_like(r), jnp.ones_like(t)))
        u = u.astype(jnp.float32)
        u_tgt = jax.lax.stop_gradient(v_tilde - _bcast(t - r, x.ndim) * dudt)  # Eq. 10
        sq = jnp.sum(jnp.square(u - u_tgt), axis=tuple(range(1, x.ndim)))
        weight = jax.lax.stop_gradient(1.0 / (sq + self.adaptive_c) ** self.adaptive_p)
        return {"loss": weight * sq, "mse": sq / x[0].size}

    def sample(self, u_fn: AverageVelocityFn, noise: jax.Array, num_steps: int) -> jax.Array:
        """`sample_average_velocity`: num_steps network evaluations (Eq. 12)."""
        return sample_average_velocity(u_fn, noise, num_steps)
