"""The evaluation side of `tools.scaling`: our `eval/<step>.json` points per metric, FID against
training compute, and a table of ours against the paper at matched steps.

The paper's reference is its scaling table (arXiv 2505.11196, Table 8: FID, sFID, IS, precision
and recall of DiCo-S/B/L/XL at 256 every 50K steps to 400K, no guidance). Only the FID-50K at
400K of each scale is carried (`scaling.PAPER_FID50K_400K_256`); the table's other metrics
and earlier steps are not, and print as "-": a reference value is added here only with its
source.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Sequence

import numpy as np
from etils import epath

from dico_jax import storage

METRICS = ("fid", "sfid", "is", "precision", "recall", "accuracy")
TRAIN_FLOPS_PER_FORWARD = 3.0  # forward plus a backward of about twice the forward


def paper_reference() -> dict[tuple[str, int, int], dict[str, float]]:
    """(model, resolution, step) -> the paper's metrics there (only what is sourced)."""
    from dico_jax.tools import scaling

    return {(model, 256, scaling.PAPER_FID_STEP): {"fid": fid}
            for model, fid in scaling.PAPER_FID50K_400K_256.items()}


@dataclasses.dataclass
class RunEvals:
    label: str
    model: str | None
    resolution: int
    global_batch: int
    flops_per_image: float | None
    points: list[dict]  # the eval/<step>.json results, by step

    @classmethod
    def read(cls, run_dir: str, curve) -> "RunEvals":
        """The results of one run; `curve` is its `scaling.LossCurve` (model, batch, FLOPs)."""
        from dico_jax.tools import scaling

        gfile = scaling._gfile()
        points = []
        for path in gfile.glob(gfile.join(run_dir, "eval", "*.json")):
            with gfile.GFile(path) as f:
                try:
                    result = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: not valid JSON: {e}") from None
            if isinstance(result, dict) and "step" in result:
                points.append(result)
        points.sort(key=lambda r: int(r["step"]))
        return cls(curve.label, curve.model, curve.resolution, curve.global_batch,
                   curve.flops_per_image, points)

    def steps(self) -> np.ndarray:
        return np.asarray([int(p["step"]) for p in self.points], np.int64)

    def values(self, metric: str) -> np.ndarray:
        return np.asarray([float(p.get(metric, np.nan)) for p in self.points])

    def train_flops(self) -> np.ndarray | None:
        if not self.flops_per_image:
            return None
        return (TRAIN_FLOPS_PER_FORWARD * self.flops_per_image * self.global_batch
                * self.steps().astype(np.float64))


def write_csv(path: str, runs: Sequence[RunEvals]) -> int:
    rows = 0
    with epath.Path(path).open("w") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "model", "resolution", "step", "train_flops", *METRICS])
        for run in runs:
            flops = run.train_flops()
            for i, point in enumerate(run.points):
                writer.writerow([run.label, run.model or "", run.resolution, int(point["step"]),
                                 "" if flops is None else f"{flops[i]:.6e}",
                                 *("" if point.get(m) is None else f"{float(point[m]):.6g}"
                                   for m in METRICS)])
                rows += 1
    return rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(path: str, runs: Sequence[RunEvals]) -> None:
    """One panel per metric any run reports, against the training step; the paper's points
    (where sourced) as gray squares."""
    plt = _pyplot()
    metrics = [m for m in METRICS if any(np.isfinite(r.values(m)).any() for r in runs)]
    reference = paper_reference()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for run in runs:
            values = run.values(metric)
            keep = np.isfinite(values)
            ax.plot(run.steps()[keep], values[keep], "o-", ms=3, label=run.label)
            paper = [(step, ref[metric]) for (model, res, step), ref in reference.items()
                     if model == run.model and res == run.resolution and metric in ref]
            if paper:
                ax.plot(*zip(*paper), "s", color="gray", label=f"{run.model} paper")
        ax.set_xlabel("training step")
        ax.set_title(metric.upper() if metric in ("fid", "sfid", "is") else metric, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    storage.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def plot_fid_vs_train_flops(path: str, runs: Sequence[RunEvals]) -> None:
    plt = _pyplot()
    from dico_jax.tools import scaling

    fig, ax = plt.subplots(figsize=(7, 5))
    for run in runs:
        flops = run.train_flops()
        if flops is None:
            continue
        ax.plot(flops, run.values("fid"), "o-", ms=3, label=run.label)
    for model, fid in scaling.PAPER_FID50K_400K_256.items():
        forward = scaling.paper_forward_flops_per_image(model, 256)
        x = TRAIN_FLOPS_PER_FORWARD * forward * scaling.OFFICIAL_GLOBAL_BATCH * scaling.PAPER_FID_STEP
        ax.plot([x], [fid], "s", color="gray")
        ax.annotate(f"{model} paper", (x, fid), fontsize=7, textcoords="offset points",
                    xytext=(4, 4))
    ax.set_xscale("log")
    ax.set_xlabel("training compute (FLOPs = 3 x forward FLOPs/image x global batch x steps)")
    ax.set_ylabel("FID (no guidance)")
    ax.set_title("FID against training compute")
    scaling.save_log_plot(fig, ax, path)


def table(runs: Sequence[RunEvals]) -> str:
    """Ours vs the paper at matched (model, resolution, step); '-' where the paper's value is
    not carried."""
    reference = paper_reference()
    head = ["run", "step"] + [f"{m} ours/paper" for m in METRICS[:5]]
    lines = ["evaluations, ours vs the paper (Table 8, no guidance) at matched steps",
             "  ".join(f"{h:>20s}" for h in head)]
    for run in runs:
        for point in run.points:
            step = int(point["step"])
            ref = reference.get((run.model, run.resolution, step), {})
            cells = [run.label[-20:], str(step)]
            for m in METRICS[:5]:
                ours = "-" if point.get(m) is None else f"{float(point[m]):.4g}"
                cells.append(f"{ours}/{ref[m]:.4g}" if m in ref else f"{ours}/-")
            lines.append("  ".join(f"{c:>20s}" for c in cells))
    return "\n".join(lines)


def report(out: str, runs: Sequence[RunEvals]) -> list[str]:
    """Writes the plots and CSV of the runs with results; prints the table. Returns the names
    written."""
    runs = [r for r in runs if r.points]
    if not runs:
        return []
    written = []
    plot_metrics(os.path.join(out, "eval_vs_step.png"), runs)
    written.append("eval_vs_step.png")
    if any(r.flops_per_image for r in runs):
        plot_fid_vs_train_flops(os.path.join(out, "fid_vs_train_flops.png"), runs)
        written.append("fid_vs_train_flops.png")
    rows = write_csv(os.path.join(out, "eval.csv"), runs)
    written.append(f"eval.csv ({rows} rows)")
    print(table(runs))
    return written
