"""Scaling curves: training loss against steps and compute, FID against model FLOPs.

    python -m dico_jax.tools.scaling --out DIR [--runs DIR ...] [--label NAME ...]
        [--official DIR | --no_official] [--smooth N]

Sources:
- our runs (local or gs:// directories): TensorBoard event files written by the trainer
  (clu.metric_writers) anywhere under each run directory, tag `train/loss`; `config.json` in
  the run directory names the model (`model.name`), the resolution and the global batch;
  evaluation results are read from `eval/*.json` (keys `step`, `fid`, `sfid`, `is`,
  `precision`, `recall`).
- the official ImageNet logs (`dico-{s,b,l,xl}-{res}.csv`: step, train_loss,
  steps_per_sec at global batch 256); by default the copy shipped in this package.

Writes `loss_vs_step.png`, `loss_vs_flops.png`, `fid_vs_gflops.png` (when any FID exists),
`loss_curves.csv` (raw and smoothed loss, training FLOPs) and `fid.csv`; with evaluation
results or official logs of a scale in the paper's Table 8, `eval_vs_step.png` (each metric
against the step, with Table 8's curves), `fid_vs_train_flops.png`, `eval.csv`, and a table
of ours against the paper at matched steps (`tools.scaling_eval`).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import json
import os
import re
import sys
from typing import Iterable, Sequence

import numpy as np
from etils import epath

from dico_jax import command, errors
from dico_jax.tools import paper_reference, scaling_eval
from dico_jax.tools.scaling_eval import save_log_plot

OFFICIAL_LOGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "official_logs")
LOSS_TAG = "train/loss"
MODEL_ORDER = ("DiCo-S", "DiCo-B", "DiCo-L", "DiCo-XL", "DiCo-H")
OFFICIAL_GLOBAL_BATCH = paper_reference.OFFICIAL_GLOBAL_BATCH
PAPER_GMACS_256 = paper_reference.PAPER_GMACS_256
# FID-50K after 400K steps at 256, no guidance (the last rows of the paper's Table 8).
PAPER_FID50K_400K_256 = paper_reference.fid50k_at_last_step()
PAPER_FID_STEP = paper_reference.TABLE8_LAST_STEP
paper_forward_flops_per_image = paper_reference.paper_forward_flops_per_image
# Training cost of one image: forward plus a backward pass of about twice the forward.
TRAIN_FLOPS_PER_FORWARD = 3.0


@dataclasses.dataclass
class LossCurve:
    """One training-loss curve: `steps` ascending, `losses` aligned with them."""
    source: str  # "official" or "ours"
    label: str
    model: str | None  # "DiCo-XL", or None when unknown
    resolution: int  # image side in pixels (latents are 1/8 of it)
    global_batch: int
    steps: np.ndarray
    losses: np.ndarray
    flops_per_image: float | None = None  # forward FLOPs of one image, when known


@dataclasses.dataclass
class FidPoint:
    source: str
    label: str
    model: str | None
    resolution: int
    step: int
    fid: float
    flops_per_image: float | None


# ----------------------------------------------------------------------------- math

def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Centered moving average over `window` points (an even window grows by one).

    Near the ends the window shrinks symmetrically, so the curve neither lags nor
    carries the first, high losses forward.
    """
    if window < 1:
        raise ValueError(f"smoothing window must be >= 1, got {window}")
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    if n == 0:
        return values
    index = np.arange(n)
    half = np.minimum(np.minimum(index, n - 1 - index), window // 2)
    cumsum = np.concatenate([[0.0], np.cumsum(values)])
    return (cumsum[index + half + 1] - cumsum[index - half]) / (2 * half + 1)


def effective_window(window: int) -> int:
    """Points a centered `window` averages away from the ends (always odd)."""
    return 2 * (window // 2) + 1


def training_flops(forward_flops_per_image: float, global_batch: int, steps) -> np.ndarray:
    """Total training FLOPs after `steps`: 3 x forward FLOPs x global batch x steps."""
    return TRAIN_FLOPS_PER_FORWARD * forward_flops_per_image * global_batch * np.asarray(
        steps, dtype=np.float64)


def forward_flops_per_image(model: str | None, resolution: int,
                            recorded: float | None = None) -> float | None:
    """Forward FLOPs of one image: the run's recorded value, else the paper's table, else XLA.

    XLA's cost analysis (dico_jax.models) is used for models the paper gives no figure for
    (DiCo-H); it compiles the full network once, which takes a while on a CPU.
    """
    if recorded:
        return float(recorded)
    if model is None:
        return None
    flops = paper_forward_flops_per_image(model, resolution)
    if flops is not None:
        return flops
    try:
        from dico_jax.models import MODEL_NAMES, forward_flops_per_image as xla_flops, get_model
    except ImportError:
        return None
    if model not in MODEL_NAMES:
        return None
    latent = resolution // 8
    return xla_flops(get_model(model), latent, latent)


# -------------------------------------------------------------------------- reading

def read_official_csv(path: str) -> LossCurve:
    """One official log `dico-<size>-<res>.csv` with columns step, train_loss, steps_per_sec."""
    name = os.path.basename(path)
    match = re.fullmatch(r"dico-(s|b|l|xl|h)-(\d+)\.csv", name, flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"{path}: expected a file name like dico-xl-256.csv")
    model = f"DiCo-{match.group(1).upper()}"
    resolution = int(match.group(2))
    steps, losses = [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"step", "train_loss"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
        for line_number, row in enumerate(reader, start=2):
            try:
                steps.append(int(row["step"]))
                losses.append(float(row["train_loss"]))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}:{line_number}: bad row {row}: {e}") from None
    steps_array = np.asarray(steps, dtype=np.int64)
    if steps_array.size and np.any(np.diff(steps_array) <= 0):
        raise ValueError(f"{path}: steps are not strictly increasing")
    return LossCurve(source="official", label=f"{model} official", model=model,
                     resolution=resolution, global_batch=OFFICIAL_GLOBAL_BATCH,
                     steps=steps_array, losses=np.asarray(losses, dtype=np.float64),
                     flops_per_image=paper_forward_flops_per_image(model, resolution))


def read_official_dir(directory: str) -> list[LossCurve]:
    paths = sorted(glob.glob(os.path.join(directory, "dico-*.csv")))
    if not paths:
        raise FileNotFoundError(f"no official logs (dico-*.csv) in {directory}")
    return sorted((read_official_csv(p) for p in paths), key=_curve_order)


_gfile = scaling_eval.gfile


def _event_files(logdir: str) -> list[str]:
    gfile = _gfile()
    return sorted(gfile.join(root, name) for root, _, names in gfile.walk(logdir)
                  for name in names if name.startswith("events.out.tfevents."))


def read_tensorboard_scalars(logdir: str, tag: str = LOSS_TAG) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one scalar tag from every event file under `logdir`.

    Handles TF1 `simple_value` and TF2 tensor summaries (what clu writes). A step
    written twice (a run resumed from an older checkpoint) keeps its latest value.
    """
    import tensorflow as tf  # the event-file reader; imported late because it is slow
    from tensorflow.core.util import event_pb2

    records = []  # (wall_time, step, value)
    for path in _event_files(logdir):
        for raw in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(raw.numpy())
            for value in event.summary.value:
                if value.tag != tag:
                    continue
                if value.HasField("simple_value"):
                    scalar = float(value.simple_value)
                elif value.HasField("tensor"):
                    scalar = float(np.asarray(tf.make_ndarray(value.tensor)).reshape(()))
                else:
                    continue
                records.append((event.wall_time, event.step, scalar))
    latest: dict[int, float] = {}
    for _, step, scalar in sorted(records):
        latest[int(step)] = scalar
    steps = np.asarray(sorted(latest), dtype=np.int64)
    return steps, np.asarray([latest[s] for s in steps], dtype=np.float64)


def _lookup(config: dict, *dotted_keys: str):
    """First present value among dotted keys like "model.name" in a nested dict."""
    for key in dotted_keys:
        node = config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return node
    return None


def _canonical_model(name) -> str | None:
    if not isinstance(name, str):
        return None
    match = re.search(r"dico[-_/]?(xl|s|b|l|h)\b", name, flags=re.IGNORECASE)
    if match is None:
        match = re.fullmatch(r"(xl|s|b|l|h)", name.strip(), flags=re.IGNORECASE)
    return f"DiCo-{match.group(1).upper()}" if match else None


def _resolution_of(config: dict) -> int | None:
    """Image side in pixels: a pixel size field, else a latent side x 8 (the SD VAE)."""
    pixels = _lookup(config, "resolution", "data.resolution", "data.image_size", "image_size")
    if pixels is not None:
        return int(pixels[0] if isinstance(pixels, (list, tuple)) else pixels)
    latent = _lookup(config, "data.latent_size", "latent_size", "latent_shape")
    if latent is not None:
        return 8 * int(latent[0] if isinstance(latent, (list, tuple)) else latent)
    return None


def read_run_config(run_dir: str) -> dict:
    gfile = _gfile()
    path = gfile.join(run_dir, "config.json")
    if not gfile.exists(path):
        return {}
    with gfile.GFile(path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def describe_run(run_dir: str, label: str | None = None) -> dict:
    """Model, resolution, batch, FLOPs and label of a run: config.json first, then its name."""
    config = read_run_config(run_dir)
    base = os.path.basename(os.path.normpath(run_dir))
    model = _canonical_model(_lookup(config, "model.name", "model_name", "model")) \
        or _canonical_model(base) or _canonical_model(label or "")
    resolution = _resolution_of(config)
    if resolution is None:
        match = re.search(r"(?<!\d)(256|512)(?!\d)", base)
        resolution = int(match.group(1)) if match else 256
    batch = _lookup(config, "global_batch_size", "batch_size", "train.batch_size",
                    "training.batch_size", "data.global_batch_size", "data.batch_size")
    recorded_flops = _lookup(config, "flops_per_image", "forward_flops_per_image",
                             "model.flops_per_image", "model.forward_flops_per_image")
    return dict(label=label or base, model=model, resolution=resolution,
                global_batch=int(batch) if batch else OFFICIAL_GLOBAL_BATCH,
                batch_known=bool(batch), recorded_flops=recorded_flops)


def check_run_dir(run_dir: str) -> None:
    """A missing run directory as one line (local paths checked without importing TensorFlow)."""
    exists = _gfile().isdir(run_dir) if "://" in run_dir else os.path.isdir(run_dir)
    if not exists:
        raise errors.MissingFile(f"--runs {run_dir}: no such run directory")


def read_run(run_dir: str, label: str | None = None, tag: str = LOSS_TAG) -> LossCurve:
    check_run_dir(run_dir)
    info = describe_run(run_dir, label)
    steps, losses = read_tensorboard_scalars(run_dir, tag)
    return LossCurve(source="ours", label=info["label"], model=info["model"],
                     resolution=info["resolution"], global_batch=info["global_batch"],
                     steps=steps, losses=losses,
                     flops_per_image=forward_flops_per_image(
                         info["model"], info["resolution"], info["recorded_flops"]))


def read_run_fids(run_dir: str, curve: LossCurve) -> list[FidPoint]:
    """FID results `eval/*.json` ({"fid": ..., "step": ...}) of one run, ordered by step."""
    gfile = _gfile()
    points = []
    for path in sorted(gfile.glob(gfile.join(run_dir, "eval", "*.json"))):
        with gfile.GFile(path) as f:
            try:
                result = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(result, dict) or "fid" not in result or "step" not in result:
            raise ValueError(f"{path}: expected keys 'fid' and 'step'")
        points.append(FidPoint(source="ours", label=curve.label, model=curve.model,
                               resolution=curve.resolution, step=int(result["step"]),
                               fid=float(result["fid"]), flops_per_image=curve.flops_per_image))
    return sorted(points, key=lambda p: p.step)


def paper_fid_points() -> list[FidPoint]:
    return [FidPoint(source="official", label=f"{m} paper", model=m, resolution=256,
                     step=PAPER_FID_STEP, fid=fid,
                     flops_per_image=paper_forward_flops_per_image(m, 256))
            for m, fid in PAPER_FID50K_400K_256.items()]


def _curve_order(curve: LossCurve):
    rank = MODEL_ORDER.index(curve.model) if curve.model in MODEL_ORDER else len(MODEL_ORDER)
    return (rank, curve.resolution, curve.source, curve.label)


# -------------------------------------------------------------------------- writing

def write_loss_csv(path: str, curves: Iterable[LossCurve], window: int) -> int:
    rows = 0
    with epath.Path(path).open("w") as f:
        writer = csv.writer(f)
        writer.writerow(["source", "label", "model", "resolution", "global_batch", "step",
                         "loss", f"loss_smoothed_ma{effective_window(window)}", "train_flops"])
        for c in curves:
            smoothed = moving_average(c.losses, window)
            flops = (training_flops(c.flops_per_image, c.global_batch, c.steps)
                     if c.flops_per_image else [None] * len(c.steps))
            for step, loss, smooth, total in zip(c.steps, c.losses, smoothed, flops):
                writer.writerow([c.source, c.label, c.model or "", c.resolution, c.global_batch,
                                 int(step), f"{loss:.6g}", f"{smooth:.6g}",
                                 "" if total is None else f"{total:.6e}"])
                rows += 1
    return rows


def write_fid_csv(path: str, points: Iterable[FidPoint]) -> int:
    rows = 0
    with epath.Path(path).open("w") as f:
        writer = csv.writer(f)
        writer.writerow(["source", "label", "model", "resolution", "step", "fid",
                         "forward_gflops_per_image"])
        for p in points:
            gflops = "" if p.flops_per_image is None else f"{p.flops_per_image / 1e9:.4g}"
            writer.writerow([p.source, p.label, p.model or "", p.resolution, p.step,
                             f"{p.fid:.4f}", gflops])
            rows += 1
    return rows


def _colors(curves: Sequence[LossCurve]) -> dict:
    from matplotlib import colormaps

    keys = []
    for c in curves:
        key = (c.model or c.label, c.resolution)
        if key not in keys:
            keys.append(key)
    palette = colormaps["tab10"]
    return {key: palette(i % 10) for i, key in enumerate(keys)}


def plot_loss(path: str, curves: Sequence[LossCurve], window: int, x: str) -> None:
    """Loss against "step" or "flops"; official curves thin and solid, ours thick and dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = _colors(curves)
    fig, ax = plt.subplots(figsize=(8, 5))
    for c in curves:
        if x == "flops":
            if not c.flops_per_image:
                continue
            xs = training_flops(c.flops_per_image, c.global_batch, c.steps)
        else:
            xs = c.steps
        keep = xs > 0  # log axis
        name = c.label if c.source == "ours" else f"{c.model} {c.resolution} official"
        style = dict(lw=2.0, ls="--", marker="o" if keep.sum() < 30 else None, ms=3) \
            if c.source == "ours" else dict(lw=1.0, ls="-")
        ax.plot(np.asarray(xs)[keep], moving_average(c.losses, window)[keep],
                color=colors[(c.model or c.label, c.resolution)],
                label=f"{name} (centered moving average, {effective_window(window)} points)", **style)
    ax.set_xscale("log")
    ax.set_xlabel("training step" if x == "step" else
                  "training compute (FLOPs = 3 x forward FLOPs/image x global batch x steps)")
    ax.set_ylabel("training loss (MSE + VLB)")
    ax.set_title(f"DiCo training loss, centered moving average of {effective_window(window)} points"
                 + (" (official: 1 point / 100 steps)" if any(c.source == "official"
                                                              for c in curves) else ""),
                 fontsize=10)
    save_log_plot(fig, ax, path)


def plot_fid(path: str, points: Sequence[FidPoint]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    official = [p for p in points if p.source == "official" and p.flops_per_image]
    if official:
        ax.plot([p.flops_per_image / 1e9 for p in official], [p.fid for p in official],
                "s-", color="gray", label=f"paper, FID-50K at {PAPER_FID_STEP // 1000}K steps")
        for p in official:
            ax.annotate(p.model, (p.flops_per_image / 1e9, p.fid), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    ours: dict[str, list[FidPoint]] = {}
    for p in points:
        if p.source == "ours" and p.flops_per_image:
            ours.setdefault(p.label, []).append(p)
    for label, run_points in ours.items():
        last = run_points[-1]  # latest evaluation of the run
        ax.plot([last.flops_per_image / 1e9], [last.fid], "o", ms=7,
                label=f"{label}, step {last.step}")
    ax.set_xscale("log")
    ax.set_xlabel("forward GFLOP per image (paper: 2 x its GMACs; ours: as the run recorded)")
    ax.set_ylabel("FID (no guidance)")
    ax.set_title("FID against model compute")
    save_log_plot(fig, ax, path)


# ------------------------------------------------------------------------------ CLI

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = command.ArgumentParser("dico_jax.tools.scaling", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="*", default=[], metavar="DIR",
                        help="our run directories (TensorBoard logs, config.json, eval/*.json)")
    parser.add_argument("--label", nargs="*", default=[], metavar="NAME",
                        help="legend labels for --runs, in the same order")
    official = parser.add_mutually_exclusive_group()
    official.add_argument("--official", default=OFFICIAL_LOGS_DIR, metavar="DIR",
                          help="directory of official dico-*.csv logs (default: shipped copy)")
    official.add_argument("--no_official", action="store_true", help="plot our runs only")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--smooth", type=int, default=51, metavar="N",
                        help="centered moving-average window in logged points; an even N "
                             "becomes N+1 (default 51: about 5K official steps)")
    parser.add_argument("--tag", default=LOSS_TAG, help=f"loss scalar tag (default {LOSS_TAG})")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error(f"--smooth must be >= 1, got {args.smooth}")
    if args.label and len(args.label) != len(args.runs):
        parser.error(f"--label has {len(args.label)} names for {len(args.runs)} --runs")
    if args.no_official and not args.runs:
        parser.error("nothing to plot: --no_official without --runs")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for run_dir in args.runs:
        check_run_dir(run_dir)
    curves: list[LossCurve] = []
    fids: list[FidPoint] = []
    if not args.no_official:
        curves += read_official_dir(args.official)
        fids += paper_fid_points()
    evals = []
    labels = args.label or [None] * len(args.runs)
    for run_dir, label in zip(args.runs, labels):
        curve = read_run(run_dir, label, args.tag)
        if curve.steps.size == 0:
            print(f"warning: no '{args.tag}' scalars under {run_dir}", file=sys.stderr)
        if curve.flops_per_image is None:
            print(f"warning: {run_dir}: model unknown (no config.json model.name, no DiCo-<size> "
                  "in the directory name); left out of the compute plot", file=sys.stderr)
        curves.append(curve)
        fids += read_run_fids(run_dir, curve)
        evals.append(scaling_eval.RunEvals.read(run_dir, curve))
    curves.sort(key=_curve_order)

    epath.Path(args.out).mkdir(parents=True, exist_ok=True)
    written = []
    plot_loss(os.path.join(args.out, "loss_vs_step.png"), curves, args.smooth, "step")
    written.append("loss_vs_step.png")
    if any(c.flops_per_image for c in curves):
        plot_loss(os.path.join(args.out, "loss_vs_flops.png"), curves, args.smooth, "flops")
        written.append("loss_vs_flops.png")
    rows = write_loss_csv(os.path.join(args.out, "loss_curves.csv"), curves, args.smooth)
    written.append(f"loss_curves.csv ({rows} rows)")
    if fids:
        plot_fid(os.path.join(args.out, "fid_vs_gflops.png"), fids)
        rows = write_fid_csv(os.path.join(args.out, "fid.csv"), fids)
        written += ["fid_vs_gflops.png", f"fid.csv ({rows} rows)"]
    official_models = [c.model for c in curves if c.source == "official"
                       and c.resolution == paper_reference.TABLE8_RESOLUTION]
    written += scaling_eval.report(args.out, evals, official_models)
    for c in curves:
        if c.steps.size:
            last = min(effective_window(args.smooth), c.steps.size)
            print(f"{c.label:28s} {c.resolution:4d}px  steps {int(c.steps[0])}..{int(c.steps[-1])}"
                  f"  mean loss of the last {last} points {np.mean(c.losses[-last:]):.4f}")
    print(f"wrote to {args.out}: " + ", ".join(written))
    return 0


if __name__ == "__main__":
    # Every file it reads is one the user named (or the shipped logs).
    with errors.cli("dico_jax.tools.scaling", also=(OSError, ValueError)):
        sys.exit(main())
