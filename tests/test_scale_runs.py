"""End to end: a full-width DiCo-S trains a few steps on ImageNet-shaped latents, and the
scaling tool plots the loss points it logged."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import sweep
from dico_jax.data import records
from dico_jax.tools import scaling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_latents(out_dir, count=32):
    """Random 32x32x4 'latents' with both views, in the format the extraction writes."""
    rng = np.random.default_rng(0)
    views = rng.standard_normal((count, 2, 1, 32, 32, 4), dtype=np.float32)
    records.write_dataset(out_dir, views, rng.integers(0, 1000, count), num_classes=1000,
                          storage="sample", scale_factor=0.18215, vae="synthetic",
                          image_size=256, shard_size=16, source="test")


# A minute on 2 cores; test_scaling covers the plots and test_gcs the command on a run.
@pytest.mark.long
def test_smoke_sweep_run_of_dico_s_is_plotted(tmp_path):
    data = str(tmp_path / "latents")
    synthetic_latents(data)
    cfg = sweep.get_config("smoke")
    spec = next(s for s in sweep.run_specs(cfg, str(tmp_path / "runs")) if s["name"] == "dico-s-256")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    cmd = [sys.executable, "-m", "dico_jax.main", f"--config={spec['config']}",
           f"--workdir={spec['workdir']}", f"--config.data.dir={data}",
           "--config.global_batch_size=2", "--config.num_train_steps=3"]
    cmd += [o for o in spec["overrides"] if not o.startswith(("--config.global_batch_size",
                                                               "--config.num_train_steps"))]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    out = str(tmp_path / "plots")
    assert scaling.main(["--runs", spec["workdir"], "--out", out, "--smooth", "1"]) == 0
    assert os.path.getsize(os.path.join(out, "loss_vs_flops.png")) > 1000
    with open(os.path.join(out, "loss_curves.csv")) as f:
        rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
    header, rows = rows[0], rows[1:]
    ours = [r for r in rows if any("DiCo-S" in c for c in r) and "official" not in " ".join(r)]
    steps = sorted({int(float(r[header.index("step")])) for r in ours})
    assert steps == [1, 2, 3], (header, ours[:5])
    losses = [float(r[header.index("loss")]) for r in ours]
    assert all(np.isfinite(losses)) and 0.0 < min(losses)
