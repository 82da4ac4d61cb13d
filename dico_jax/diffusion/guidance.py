"""Classifier-free guidance as a model wrapper for the samplers."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

ApplyFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def guided_model_fn(apply_fn: ApplyFn, y: jax.Array, cfg_scale: float, *, null_label: int,
                    guidance_channels: int | str | None = 3,
                    interval: tuple[float, float] | None = None):
    """Returns model_fn(x, t) = the class-conditional output of `apply_fn(x, t, y)`, guided.

    The conditional and null-label passes run as one doubled batch [x; x] with labels
    [y; null_label]; on the guided channels the output is uncond + s * (cond - uncond), all
    other channels come from the conditional pass. `guidance_channels=3` is the DiT/DiCo
    reference form behind their published FIDs (only the first 3 of the 4 eps channels);
    None or "all" guides every eps channel (as many as x has). Unlike the reference, which
    returns the doubled batch, this returns the N conditional rows only. With cfg_scale == 1
    the null pass is skipped and the model sees N rows.

    `interval=(low, high)` limits guidance to low <= t <= high (Kynkaanniemi et al. 2024,
    "Applying guidance in a limited interval"), with t as model_fn receives it, i.e. in the
    sampler's own time: the original step index for the DDPM/DDIM samplers (0 = least noisy;
    `FlowMatching.ddpm_step_interval` turns a flow-time interval into steps of matching noise
    level), flow time for `FlowMatching.guided_velocity_fn`. An example outside the interval
    gets the conditional output exactly, one inside the guided output. When no example of the
    batch is inside (the samplers give every row the same t) a `lax.cond` runs the N-row
    conditional pass alone, so steps outside the interval cost one pass, not two.
    """
    try:
        scale = float(cfg_scale)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise TypeError(
            "cfg_scale must be a static Python number (it selects whether the null-label pass "
            "runs); close over it instead of tracing it"
        ) from None
    if guidance_channels == "all":
        guidance_channels = None
    if guidance_channels is not None and (
        not isinstance(guidance_channels, int) or guidance_channels < 1
    ):
        raise ValueError(
            f"guidance_channels must be a positive int, None or 'all'; got {guidance_channels!r}"
        )

    if interval is not None:
        low, high = (float(v) for v in interval)

    if scale == 1.0:
        return lambda x, t: apply_fn(x, t, y)

    def guided_fn(x, t):
        n, channels = x.shape[0], x.shape[-1]
        guided = channels if guidance_channels is None else guidance_channels
        if guided > channels:
            raise ValueError(
                f"guidance_channels={guided} exceeds the {channels} eps channels of x "
                f"{tuple(x.shape)}"
            )
        labels = jnp.concatenate([y, jnp.full_like(y, null_label)], axis=0)
        out = apply_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), labels)
        cond, uncond = out[:n], out[n:]
        mixed = uncond[..., :guided] + scale * (cond[..., :guided] - uncond[..., :guided])
        return jnp.concatenate([mixed.astype(cond.dtype), cond[..., guided:]], axis=-1), cond

    if interval is None:
        return lambda x, t: guided_fn(x, t)[0]

    def model_fn(x, t):
        inside = (t >= low) & (t <= high)

        def some_inside(x, t):
            out, cond = guided_fn(x, t)
            return jnp.where(inside.reshape((-1,) + (1,) * (out.ndim - 1)), out, cond)

        return jax.lax.cond(jnp.any(inside), some_inside, lambda x, t: apply_fn(x, t, y), x, t)

    return model_fn
