"""Opt-in kernels for the DiCo network, kept apart from its canonical layers (`layers.py`).

`model.norm_impl` is the one switch, and `layer_norm_fn` the one place that reads it:
"xla" is `layers.modulated_layer_norm` as the compiler fuses it; "pallas" runs its training
path as the Pallas GPU kernels of `fused_norm` (one pass over memory each way);
"pallas_interpret" runs those kernels in Pallas's interpreter on any backend (slow, for
checking them on a CPU).
"""
from __future__ import annotations

import functools
from typing import Callable

from dico_jax.models import layers
from dico_jax.models.kernels import fused_norm

NORM_IMPLS = ("xla", "pallas", "pallas_interpret")


def layer_norm_fn(impl: str, skip: bool = False, pin_residuals: bool = True) -> Callable:
    """The modulated layer norm (x, shift, scale) -> y that `impl` names; with skip=True
    (x, shift, scale) -> (y, x), for a block's residual stream (the Pallas backward kernel
    adds the gradient arriving along the returned x, which saves a pass over it).
    `pin_residuals` is that of the XLA layer norm (`layers._tangent_fn`); the kernels keep
    their own residuals."""
    if impl not in NORM_IMPLS:
        raise ValueError(f"norm_impl must be one of {NORM_IMPLS}, got {impl!r}")
    if impl == "xla":
        fn = layers.modulated_layer_norm_and_skip if skip else layers.modulated_layer_norm
        return fn if pin_residuals else functools.partial(fn, pin_residuals=False)
    return functools.partial(fused_norm.modulated_layer_norm, skip=skip,
                             interpret=impl == "pallas_interpret")


def check_norm_impl(norm_impl: str, platform: str, field: str = "norm_impl") -> None:
    """A clear error where `norm_impl` cannot run on `platform` ("cpu", "gpu", "tpu"): the
    "pallas" kernels are written for Pallas's Triton backend, which only GPUs have (elsewhere
    Pallas fails while lowering, on a TPU with a bare AssertionError)."""
    if norm_impl == "pallas" and platform != "gpu":
        raise ValueError(f"{field}='pallas' runs Pallas kernels for GPUs (Triton backend); this "
                         f"process runs on {platform!r}: use 'xla' there, or "
                         "'pallas_interpret' to run the same kernels in Pallas's interpreter")
