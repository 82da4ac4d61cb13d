"""The evaluation side of `tools.scaling`: our `eval/<step>.json` points per metric, FID against
training compute, and a table of ours against the paper at matched steps.

The paper's reference is its Table 8 (`tools.paper_reference`: FID-50K, sFID, IS, precision
and recall of DiCo-S/B/L/XL at 256 every 50K steps to 400K, no guidance). Each scale's Table 8
curves are drawn with the runs of that scale, and with the official training logs of that
scale when those are plotted.
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

from dico_jax.tools import paper_reference

METRICS = ("fid", "sfid", "is", "precision", "recall", "accuracy")
PAPER_METRICS = paper_reference.TABLE8_METRICS
TRAIN_FLOPS_PER_FORWARD = 3.0  # forward plus a backward of about twice the forward


def gfile():
    """TensorFlow's file layer: local paths and gs:// alike (imported late: it is slow)."""
    import tensorflow as tf

    return tf.io.gfile


def save_log_plot(fig, ax, path: str) -> None:
    """The scaling plots' common finish: grid on both log decades, legend, written and closed."""
    import matplotlib.pyplot as plt

    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    storage.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


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
        files = gfile()
        points = []
        for path in files.glob(files.join(run_dir, "eval", "*.json")):
            with files.GFile(path) as f:
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
        return np.asarray([np.nan if p.get(metric) is None else float(p[metric])
                           for p in self.points])

    def train_flops(self) -> np.ndarray | None:
        if not self.flops_per_image:
            return None
        return (TRAIN_FLOPS_PER_FORWARD * self.flops_per_image * self.global_batch
                * self.steps().astype(np.float64))


def paper_models(runs: Sequence[RunEvals], official_models: Sequence[str] = ()) -> list[str]:
    """Table 8's scales to draw: those of the runs at 256 and of the official logs plotted."""
    wanted = {r.model for r in runs if r.resolution == paper_reference.TABLE8_RESOLUTION}
    wanted |= set(official_models)
    return [m for m in paper_reference.TABLE8 if m in wanted]


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


def _title(metric: str) -> str:
    return {"fid": "FID", "sfid": "sFID", "is": "IS"}.get(metric, metric)


def plot_metrics(path: str, runs: Sequence[RunEvals], models: Sequence[str]) -> list[str]:
    """One panel per metric that a run reports or Table 8 holds, against the training step:
    ours as dots and lines, Table 8's scales in `models` as dashed lines with squares.
    Returns the metrics drawn."""
    plt = _pyplot()
    metrics = [m for m in METRICS if any(np.isfinite(r.values(m)).any() for r in runs)
               or (models and m in PAPER_METRICS)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.8), squeeze=False)
    palette = plt.get_cmap("tab10")
    for ax, metric in zip(axes[0], metrics):
        for i, run in enumerate(runs):
            values = run.values(metric)
            keep = np.isfinite(values)
            if keep.any():
                ax.plot(run.steps()[keep], values[keep], "o-", ms=3, color=palette(i % 10),
                        label=run.label)
        if metric in PAPER_METRICS:
            for j, model in enumerate(models):
                steps, values = paper_reference.table8_curve(model, metric)
                ax.plot(steps, values, "s--", ms=3, lw=1, color=plt.get_cmap("Greys")(0.4 + 0.15 * j),
                        label=f"{model} paper (Table 8)")
        ax.set_xlabel("training step")
        ax.set_title(_title(metric), fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    storage.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return metrics


def plot_fid_vs_train_flops(path: str, runs: Sequence[RunEvals], models: Sequence[str]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for run in runs:
        flops = run.train_flops()
        if flops is None:
            continue
        ax.plot(flops, run.values("fid"), "o-", ms=3, label=run.label)
    for model in models:
        steps, fids = paper_reference.table8_curve(model, "fid")
        forward = paper_reference.paper_forward_flops_per_image(model, paper_reference.TABLE8_RESOLUTION)
        x = TRAIN_FLOPS_PER_FORWARD * forward * paper_reference.OFFICIAL_GLOBAL_BATCH * np.asarray(steps, float)
        ax.plot(x, fids, "s--", ms=3, lw=1, color="gray", label=f"{model} paper (Table 8)")
        ax.annotate(f"{model} paper", (x[-1], fids[-1]), fontsize=7, textcoords="offset points",
                    xytext=(4, 4))
    ax.set_xscale("log")
    ax.set_xlabel("training compute (FLOPs = 3 x forward FLOPs/image x global batch x steps)")
    ax.set_ylabel("FID (no guidance)")
    ax.set_title("FID against training compute (paper: Table 8)")
    save_log_plot(fig, ax, path)


def _cell(value) -> str:
    return "-" if value is None else f"{float(value):.4g}"


def table(runs: Sequence[RunEvals], models: Sequence[str] = ()) -> str:
    """Ours vs the paper at matched (model, resolution, step), '-' where either has no value;
    then Table 8 itself for the scales in `models` that no run matches."""
    reference = paper_reference.table8()
    head = ["run", "step"] + [f"{m} ours/paper" for m in PAPER_METRICS]
    lines = []
    if runs:
        lines += ["evaluations, ours vs the paper (Table 8, no guidance) at matched steps",
                  "  ".join(f"{h:>20s}" for h in head)]
    for run in runs:
        for point in run.points:
            step = int(point["step"])
            ref = reference.get((run.model, run.resolution, step), {})
            cells = [run.label[-20:], str(step)]
            cells += [f"{_cell(point.get(m))}/{_cell(ref.get(m))}" for m in PAPER_METRICS]
            lines.append("  ".join(f"{c:>20s}" for c in cells))
    alone = [m for m in models if not any(r.model == m for r in runs)]
    if alone:
        lines += ["the paper's Table 8 (256x256, no guidance)",
                  "  ".join(f"{h:>9s}" for h in ["model", "step", *(_title(m) for m in PAPER_METRICS)])]
        for model in alone:
            for step, values in sorted(paper_reference.TABLE8[model].items()):
                lines.append("  ".join(f"{c:>9s}" for c in [model, str(step), *map(_cell, values)]))
    return "\n".join(lines)


def report(out: str, runs: Sequence[RunEvals], official_models: Sequence[str] = ()) -> list[str]:
    """Writes the plots and CSV of the runs with results and of Table 8's matching scales;
    prints the table. Returns the names written."""
    runs = [r for r in runs if r.points]
    models = paper_models(runs, official_models)
    if not runs and not models:
        return []
    written = []
    plot_metrics(os.path.join(out, "eval_vs_step.png"), runs, models)
    written.append("eval_vs_step.png")
    if any(r.flops_per_image for r in runs) or models:
        plot_fid_vs_train_flops(os.path.join(out, "fid_vs_train_flops.png"), runs, models)
        written.append("fid_vs_train_flops.png")
    if runs:
        rows = write_csv(os.path.join(out, "eval.csv"), runs)
        written.append(f"eval.csv ({rows} rows)")
    print(table(runs, models))
    return written
