"""Timestep respacing: which original steps to keep, and the betas of the shortened process."""
from __future__ import annotations

from typing import Sequence

import numpy as np

ACCEPTED_FORMS = (
    '"" (all steps), "N" (N evenly spaced steps), "N1,N2,..." (N_i steps in the i-th of '
    'equal sections), "ddimN" (N steps with one integer stride, as in DDIM)'
)


def _parse_counts(spec: str) -> list[int]:
    try:
        counts = [int(part) for part in spec.split(",")]
    except ValueError:
        raise ValueError(
            f"malformed timestep_respacing {spec!r}; accepted forms: {ACCEPTED_FORMS}"
        ) from None
    if any(c < 0 for c in counts):
        raise ValueError(
            f"timestep_respacing {spec!r} has a negative count; accepted forms: {ACCEPTED_FORMS}"
        )
    return counts


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """Sorted original step indices to keep, by the improved-diffusion / DiT rule.

    A string "ddimN" picks the smallest integer stride i with len(range(0, T, i)) == N.
    Otherwise the T steps are split into len(counts) near-equal sections (the first T % len
    sections one longer) and each section keeps `count` steps at a rounded fractional stride.
    """
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            digits = spec[len("ddim"):]
            if not digits.isdigit():
                raise ValueError(
                    f"malformed timestep_respacing {spec!r}; accepted forms: {ACCEPTED_FORMS}"
                )
            desired = int(digits)
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(
                f"cannot create exactly {desired} steps from {num_timesteps} with an integer "
                f"stride (timestep_respacing {spec!r})"
            )
        counts = _parse_counts(spec)
    elif isinstance(section_counts, (int, np.integer)):
        counts = [int(section_counts)]
    else:
        counts = [int(c) for c in section_counts]
        if not counts or any(c < 0 for c in counts):
            raise ValueError(
                f"bad section counts {counts}; accepted forms: {ACCEPTED_FORMS}"
            )

    size_per, extra = divmod(num_timesteps, len(counts))
    start = 0
    kept: set[int] = set()
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            # Python's round (half to even) is part of the rule; np.round would agree, int() not.
            kept.add(start + round(position))
            position += stride
        start += size
    return sorted(kept)


def respaced_betas(alphas_cumprod: np.ndarray, kept: Sequence[int]) -> np.ndarray:
    """Float64 betas of the process that jumps between the kept steps.

    beta'_k = 1 - abar[kept_k] / abar[kept_{k-1}] (abar before the first step is 1), so the
    respaced alphas_cumprod equal the original ones at the kept steps.
    """
    ac = np.asarray(alphas_cumprod, dtype=np.float64)[np.asarray(sorted(kept))]
    return 1.0 - ac / np.append(1.0, ac[:-1])
