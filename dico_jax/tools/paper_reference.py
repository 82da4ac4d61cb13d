"""The DiCo paper's figures that the scaling tools compare against (arXiv 2505.11196v2).

- Table 6: forward cost per image of each scale at 256x256, in the paper's "GFLOPs", which
  count multiply-accumulates.
- Table 8: FID-50K, sFID, IS, precision and recall of DiCo-S/B/L/XL at 256x256 every 50K
  training steps to 400K; no guidance, iDDPM 250 steps, ADM's evaluation suite, global batch
  256. Its 400K rows are Table 1's (which rounds recall to two decimals).
"""
from __future__ import annotations

OFFICIAL_GLOBAL_BATCH = 256
TABLE8_RESOLUTION = 256
TABLE8_METRICS = ("fid", "sfid", "is", "precision", "recall")

PAPER_GMACS_256 = {"DiCo-S": 4.25, "DiCo-B": 16.88, "DiCo-L": 60.24, "DiCo-XL": 87.30}

# model: {step: (FID-50K, sFID, IS, precision, recall)}
TABLE8 = {
    "DiCo-S": {
        50_000: (109.50, 18.28, 12.00, 0.283, 0.322),
        100_000: (79.79, 15.60, 16.39, 0.382, 0.440),
        150_000: (68.93, 13.98, 19.93, 0.411, 0.498),
        200_000: (62.61, 13.18, 22.87, 0.433, 0.531),
        250_000: (57.95, 12.47, 25.58, 0.450, 0.546),
        300_000: (54.58, 11.99, 27.74, 0.467, 0.565),
        350_000: (51.77, 11.69, 29.68, 0.479, 0.576),
        400_000: (49.97, 11.41, 31.38, 0.481, 0.582),
    },
    "DiCo-B": {
        50_000: (84.78, 14.24, 14.85, 0.392, 0.423),
        100_000: (53.66, 9.13, 25.01, 0.494, 0.544),
        150_000: (43.09, 8.21, 33.02, 0.536, 0.571),
        200_000: (37.24, 8.03, 39.10, 0.561, 0.596),
        250_000: (33.31, 7.72, 44.89, 0.577, 0.598),
        300_000: (30.68, 7.59, 49.34, 0.584, 0.597),
        350_000: (28.72, 7.55, 52.95, 0.594, 0.599),
        400_000: (27.20, 7.43, 56.52, 0.603, 0.617),
    },
    "DiCo-L": {
        50_000: (68.11, 11.50, 18.62, 0.480, 0.465),
        100_000: (35.42, 6.52, 38.12, 0.607, 0.561),
        150_000: (25.69, 6.04, 53.91, 0.643, 0.579),
        200_000: (20.81, 5.80, 65.78, 0.665, 0.589),
        250_000: (18.19, 5.70, 74.77, 0.676, 0.588),
        300_000: (16.11, 5.60, 81.47, 0.685, 0.594),
        350_000: (14.92, 5.58, 86.01, 0.689, 0.602),
        400_000: (13.66, 5.50, 91.37, 0.694, 0.604),
    },
    "DiCo-XL": {
        50_000: (66.53, 11.35, 19.41, 0.501, 0.472),
        100_000: (31.78, 6.39, 42.81, 0.637, 0.563),
        150_000: (22.61, 5.94, 60.49, 0.672, 0.572),
        200_000: (17.95, 5.67, 73.21, 0.693, 0.582),
        250_000: (15.60, 5.58, 82.96, 0.697, 0.591),
        300_000: (13.70, 5.52, 89.44, 0.707, 0.599),
        350_000: (12.59, 5.48, 95.49, 0.710, 0.605),
        400_000: (11.67, 5.38, 100.42, 0.711, 0.606),
    },
}
TABLE8_LAST_STEP = 400_000


def table8() -> dict[tuple[str, int, int], dict[str, float]]:
    """(model, resolution, step) -> {metric: value} for every entry of Table 8."""
    return {(model, TABLE8_RESOLUTION, step): dict(zip(TABLE8_METRICS, values))
            for model, rows in TABLE8.items() for step, values in rows.items()}


def table8_curve(model: str, metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one model's metric in Table 8; empty when the model is not in it."""
    rows = TABLE8.get(model, {})
    column = TABLE8_METRICS.index(metric)
    return sorted(rows), [rows[s][column] for s in sorted(rows)]


def fid50k_at_last_step() -> dict[str, float]:
    """FID-50K of each scale after 400K steps (Table 8's last row per scale)."""
    return {model: rows[TABLE8_LAST_STEP][0] for model, rows in TABLE8.items()}


def paper_forward_flops_per_image(model: str, resolution: int = 256) -> float | None:
    """Forward FLOPs of one image from the paper's MACs (2 FLOPs per MAC); None if not listed.

    The networks are fully convolutional, so the cost grows with the latent area: 4x at 512.
    """
    gmacs = PAPER_GMACS_256.get(model)
    if gmacs is None:
        return None
    return 2.0 * gmacs * 1e9 * (resolution / 256) ** 2
