"""Per-chip figures, matched against `jax.Device.device_kind`: peak bf16 FLOP/s, HBM bandwidth
and the HBM a program may use where the device does not report it.

Sources: NVIDIA's H100 SXM and H200 datasheets and Google Cloud's TPU system-architecture
pages; the usable TPU HBM is what XLA:TPU (libtpu 0.0.42) names as available when a program
is too large for the chip.
"""
from __future__ import annotations

from typing import Sequence

# Dense bf16 peak FLOP/s of one chip, matched in order (the first name found wins).
PEAK_BF16_FLOPS = (
    ("H100", 989e12),
    ("H200", 989e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("TPU v4", 275e12),
)

# HBM bandwidth (bytes/s) of one chip, matched the same way.
HBM_BANDWIDTH = (
    ("H100", 3.35e12),
    ("H200", 4.8e12),
    ("TPU v5 lite", 0.819e12),  # v5e
    ("TPU v5", 2.765e12),  # v5p
    ("TPU v6 lite", 1.64e12),  # v6e
    ("TPU v4", 1.2e12),
)

# HBM per chip (GiB) that XLA:TPU lets a program use (nominal 32, 16, 95, 32 GiB).
CHIP_MEMORY_GIB = {
    "TPU v4": 30.75,
    "TPU v5 lite": 15.75,  # v5e
    "TPU v5": 95.74,  # v5p
    "TPU v6 lite": 31.25,  # v6e
}


def per_chip(table: Sequence[tuple[str, float]], device_kind: str, default: float) -> float:
    """The value of the first name in `table` found in `device_kind` (case apart)."""
    return next((v for name, v in table if name.lower() in device_kind.lower()), float(default))


def peak_flops_per_chip(device_kind: str, default: float) -> float:
    return per_chip(PEAK_BF16_FLOPS, device_kind, default)


def model_flops_utilization(images_per_sec: float, flops_per_image: float,
                            peak_per_chip: float, num_chips: int) -> float:
    """Training FLOPs (3x forward: forward + backward) per second over the chips' peak."""
    return images_per_sec * 3.0 * flops_per_image / (peak_per_chip * num_chips)
