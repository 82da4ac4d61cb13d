"""The DiCo model zoo: `get_model(name, **overrides)` and per-image FLOPs."""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from dico_jax.models.dico import DiCo, REMAT_POLICIES, depthwise_for
from dico_jax.models.kernels import check_norm_impl

# Widths, depths (enc1, enc2, middle, dec2, dec1) and MLP ratios of the official models.
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "DiCo-S": dict(hidden_size=128, depths=(5, 4, 4, 4, 4), mlp_ratio=2.0),
    "DiCo-B": dict(hidden_size=256, depths=(5, 4, 4, 4, 4), mlp_ratio=2.0),
    "DiCo-L": dict(hidden_size=352, depths=(9, 8, 9, 8, 9), mlp_ratio=2.0),
    "DiCo-XL": dict(hidden_size=416, depths=(9, 9, 10, 9, 9), mlp_ratio=2.0),
    "DiCo-H": dict(hidden_size=416, depths=(14, 12, 10, 12, 14), mlp_ratio=4.0),
}
MODEL_NAMES = tuple(MODEL_CONFIGS)

# Official parameter counts (PyTorch `sum(p.numel())`), checked by the tests.
OFFICIAL_PARAM_COUNTS = {
    "DiCo-S": 33_137_672,
    "DiCo-B": 129_992_712,
    "DiCo-L": 463_897_992,
    "DiCo-XL": 701_151_368,
    "DiCo-H": 1_037_408_328,
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def get_model(name: str, **overrides) -> DiCo:
    """The DiCo module for `name` (DiCo-S/B/L/XL/H) with field overrides.

    Overrides: hidden_size, depths, mlp_ratio, in_channels, out_channels (default
    2 x in_channels, the learned variance), learn_sigma, num_classes, class_dropout_prob,
    dtype (compute dtype; parameters stay fp32), remat ("none", "full", "dots",
    "dots_no_batch", or a bool), scan, depthwise_impl ("auto", "conv", "shift"),
    norm_impl ("xla", "pallas", "pallas_interpret").
    """
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    fields = dict(MODEL_CONFIGS[name])
    learn_sigma = overrides.pop("learn_sigma", True)
    fields.update(overrides)
    if "depths" in fields:
        fields["depths"] = tuple(int(d) for d in fields["depths"])
    in_ch = fields.get("in_channels", 4)
    if fields.get("out_channels") is None:
        fields["out_channels"] = 2 * in_ch if learn_sigma else in_ch
    dtype = fields.get("dtype", jnp.float32)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        fields["dtype"] = _DTYPES[dtype]
    remat = fields.get("remat", "none")
    if isinstance(remat, bool) or remat is None:
        fields["remat"] = "full" if remat else "none"
    elif remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)} or a bool, got {remat!r}")
    valid = set(DiCo.__dataclass_fields__) - {"parent", "name"}
    unknown = set(fields) - valid
    if unknown:
        raise ValueError(f"unknown model fields {sorted(unknown)}; valid: {sorted(valid)}")
    return DiCo(**fields)


def abstract_params(model: DiCo, height: int = 32, width: int = 32) -> Any:
    """Parameter shapes/dtypes (jax.ShapeDtypeStruct tree) without allocating anything."""
    x = jax.ShapeDtypeStruct((1, height, width, model.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.eval_shape(
        lambda k, x, t: model.init({"params": k}, x, t, t, **time_inputs(model, t))["params"],
        jax.random.key(0), x, t)


def time_inputs(model: DiCo, h: Any) -> dict[str, Any]:
    """The keyword arguments that give `model` its second timestep `h`, if it takes one."""
    return {"h": h} if getattr(model, "second_time", False) else {}


def count_params(params: Any) -> int:
    return sum(int(jnp.size(p)) for p in jax.tree_util.tree_leaves(params))


def forward_flops_per_image(model: DiCo, height: int = 32, width: int = 32,
                            channels: int | None = None) -> float:
    """Forward FLOPs of one image from XLA's cost analysis (2 per MAC plus element-wise work).

    XLA's cost analysis counts a loop body once, so the blocks are unrolled here
    (`scan=False`) for an exact count. The count is taken on the program lowered for the CPU
    (unoptimized), so nothing is compiled and the figure is the same on every backend.
    """
    channels = channels or model.in_channels
    return _forward_flops(model.clone(scan=False, remat="none"), height, width, channels)


@functools.lru_cache(maxsize=32)
def _forward_flops(model: DiCo, height: int, width: int, channels: int) -> float:
    params = abstract_params(model, height, width)
    x = jax.ShapeDtypeStruct((1, height, width, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    # Lowered for the CPU, whose client analyses an unoptimized program (a GPU client does not).
    with jax.default_device(jax.devices("cpu")[0]):
        lowered = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, t,
                                                      **time_inputs(model, t))).lower(params, x, t)
    cost = lowered.cost_analysis()
    if not cost:
        cost = lowered.compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"])


__all__ = ["DiCo", "MODEL_CONFIGS", "MODEL_NAMES", "OFFICIAL_PARAM_COUNTS", "get_model",
           "abstract_params", "check_norm_impl", "time_inputs", "count_params", "depthwise_for",
           "forward_flops_per_image"]
