"""Shortcut models (Frans et al. 2024, arXiv 2410.12557): step-size-conditioned flow matching
with self-consistency targets, as pure JAX.

Times follow `meanflow.py` (not the paper's, whose t = 1 is data): t runs from 0 (data) to 1
(noise), z_t = (1 - t) x + t eps, and the flow velocity is v = eps - x. The network
s(z_t, t, d) predicts the direction of a step of size d towards the data,
z_{t-d} = z_t - d s(z_t, t, d) (the paper's Eq. 4 in this time), and is called as MeanFlow's
u(z, r, t) with r = t - d: the same two time inputs (t, d), the same sampler.

Each batch mixes two kinds of targets (Sec. 3.2):

* flow matching, s(z_t, t, d_min) -> v (Eq. 5, first term), on the finest step
  d_min = 1 / `denoise_steps`, with t on the grid {1/M, ..., 1}. The paper writes this term
  at d = 0; its authors' code trains it at the finest step, as here, so that the finest
  self-consistency step below is anchored to it;
* self-consistency, s(z_t, t, 2d) -> sg((s(z_t, t, d) + s(z_{t-d}, t - d, d)) / 2) with
  z_{t-d} = z_t - d s(z_t, t, d) (Eq. 5, second term), for 2d drawn uniformly from
  {1, 1/2, ..., 2/M} and t on the multiples of 2d (the paper's discrete time sampling).
  The two smaller steps (the "teacher") run without gradient, with the EMA weights in the
  authors' code (`ema_teacher`).

One row in `bootstrap_every` of the batch (rows 0, k, 2k, ...) takes the self-consistency
target, the paper's 1/4 of each batch by default; those rows keep their labels (the authors
drop labels only from the flow-matching rows).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from dico_jax.diffusion.meanflow import AverageVelocityFn, sample_average_velocity

# s_fn(z, t, d) -> step direction; shapes (N, ...), (N,), (N,).
StepFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _bcast(a: jax.Array, ndim: int) -> jax.Array:
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))


@dataclasses.dataclass(frozen=True)
class Shortcut:
    """The shortcut objective: M = `denoise_steps` (a power of two; the paper's 128) sets the
    finest step 1/M and the log2(M) levels of self-consistency steps."""

    denoise_steps: int = 128
    bootstrap_every: int = 4
    ema_teacher: bool = True

    def __post_init__(self):
        m = self.denoise_steps
        if m < 2 or m & (m - 1):
            raise ValueError(f"denoise_steps must be a power of two >= 2, got {m}")
        if self.bootstrap_every < 2:
            raise ValueError(f"bootstrap_every must be >= 2, got {self.bootstrap_every}")

    @property
    def levels(self) -> int:
        return int(math.log2(self.denoise_steps))

    def check_num_steps(self, num_steps: int) -> None:
        """Few-step sampling takes steps the network was trained on: 1/num_steps must be one
        of 1, 1/2, ..., 1/M."""
        if num_steps < 1 or num_steps & (num_steps - 1) or num_steps > self.denoise_steps:
            raise ValueError(f"num_steps={num_steps}: a shortcut model samples with a power of "
                             f"two of steps up to denoise_steps={self.denoise_steps}")

    def sample_times(self, key: jax.Array, n: int) -> dict[str, jax.Array]:
        """Every row's draws for either role, (N,) each: "t_flow" on {1/M, ..., 1}; "t_boot"
        and "d_boot" (the doubled step 2d) for self-consistency. Drawn for every row so that
        a row's draws depend on its position only."""
        k_flow, k_level, k_pos = jax.random.split(key, 3)
        m = self.denoise_steps
        t_flow = (jax.random.randint(k_flow, (n,), 0, m) + 1).astype(jnp.float32) / m
        level = jax.random.randint(k_level, (n,), 0, self.levels)  # 2d = 2^-level
        sections = jnp.left_shift(1, level)
        # t = (j + 1) 2d, j uniform in [0, 2^level): the multiples of 2d in (0, 1].
        j = jnp.floor(jax.random.uniform(k_pos, (n,)) * sections).astype(jnp.int32)
        d_boot = 1.0 / sections.astype(jnp.float32)
        return {"t_flow": t_flow, "t_boot": (j + 1).astype(jnp.float32) * d_boot,
                "d_boot": d_boot}

    def bootstrap_rows(self, n: int) -> jax.Array:
        """(N,) bool: the rows that take a self-consistency target (0, k, 2k, ...)."""
        return jnp.arange(n) % self.bootstrap_every == 0

    def training_losses(self, s_fn: StepFn, teacher_fn: StepFn, x_start: jax.Array,
                        times: dict[str, jax.Array], noise: jax.Array
                        ) -> dict[str, jax.Array]:
        """{"loss", "mse"}, each (N,): the squared error of s_fn against each row's target,
        averaged over its elements. `teacher_fn` (no gradient flows through it) builds the
        self-consistency targets from the rows `bootstrap_rows` picks, evaluated on those
        rows only (two passes over 1 / bootstrap_every of the batch)."""
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {noise.shape} != x_start shape {x_start.shape}")
        x = x_start.astype(jnp.float32)
        eps = noise.astype(jnp.float32)
        n, k = x.shape[0], self.bootstrap_every
        boot = self.bootstrap_rows(n)
        t = jnp.where(boot, times["t_boot"], times["t_flow"])
        d = jnp.where(boot, times["d_boot"], 1.0 / self.denoise_steps)
        z = (1.0 - _bcast(t, x.ndim)) * x + _bcast(t, x.ndim) * eps
        target = eps - x  # flow-matching target v

        # Self-consistency on rows 0, k, 2k, ...: two steps of d = d_boot / 2 (Eq. 5).
        zb, tb, half = z[::k], t[::k], 0.5 * d[::k]
        s1 = teacher_fn(zb, tb, half).astype(jnp.float32)
        z2 = zb - _bcast(half, x.ndim) * s1
        s2 = teacher_fn(z2, tb - half, half).astype(jnp.float32)
        target = target.at[::k].set(0.5 * (s1 + s2))
        target = jax.lax.stop_gradient(target)

        s = s_fn(z, t, d).astype(jnp.float32)
        mse = jnp.mean(jnp.square(s - target), axis=tuple(range(1, x.ndim)))
        return {"loss": mse, "mse": mse}

    def sample(self, u_fn: AverageVelocityFn, noise: jax.Array, num_steps: int) -> jax.Array:
        """num_steps steps of size 1 / num_steps from noise; u_fn(z, r, t) = s(z, t, t - r)."""
        self.check_num_steps(num_steps)
        return sample_average_velocity(u_fn, noise, num_steps)
