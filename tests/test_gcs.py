"""Runs whose workdir is on Cloud Storage, against the local emulator (conftest.py `gcs`).

A tiny digits run trains with `--workdir=gs://dico-test/...` in a subprocess whose current and
temporary folders are empty and must stay so; a second run is killed and restarted on the
bucket and must end bit-identical to the first.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from etils import epath

from dico_jax import checkpoint as ckpt_lib

from tests.test_train import NUM_STEPS, ROOT, TINY  # the same tiny run as the local-disk tests

BUCKET = "dico-test"


def command(workdir, **overrides):
    flags = {**TINY, **overrides}
    return [sys.executable, "-m", "dico_jax.main", f"--config={ROOT}/configs/digits.py",
            f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in flags.items()]


def environment(gcs, compilation_cache, tmp):
    """The emulator's settings and a fresh temporary folder for a subprocess."""
    tmp.mkdir(parents=True, exist_ok=True)
    return {**os.environ, **gcs.env, **compilation_cache, "TMPDIR": str(tmp),
            "PYTHONPATH": ROOT}


def read_losses(workdir):
    out = {}
    for line in epath.Path(workdir, "losses.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        out.setdefault(record["step"], []).append(record["loss"])
    return out


def local_files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def gs_run(gcs, compilation_cache, tmp_path_factory):
    """A tiny digits run on gs://dico-test/straight: the dataset built there, evaluated and
    sampled at its end; run from an empty folder with an empty temporary folder."""
    workdir = f"gs://{BUCKET}/straight"
    cwd, tmp = tmp_path_factory.mktemp("cwd"), tmp_path_factory.mktemp("tmp")
    done = subprocess.run(
        command(workdir, **{"eval.every_steps": NUM_STEPS, "eval.num_samples": 8,
                            "eval.batch_size": 8, "eval.respacing": "2",
                            "keep_every_steps": NUM_STEPS, "sample_at_end": True,
                            "sampling.respacing": "2", "sampling.grid_per_class": 1}),
        cwd=cwd, env=environment(gcs, compilation_cache, tmp), capture_output=True, text=True,
        timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"workdir": workdir, "cwd": cwd, "tmp": tmp, "stderr": done.stderr}


@pytest.mark.slow
def test_gs_run_keeps_everything_in_the_bucket(gcs, gs_run):
    names = set(gcs.objects(BUCKET, "straight/"))
    for name in ["config.json", "digits/manifest.json", "losses.jsonl", f"eval/{NUM_STEPS}.json",
                 "samples.png", "checkpoints/4/commit_success.txt",
                 f"checkpoints/{NUM_STEPS}/state/_METADATA"]:
        assert f"straight/{name}" in names, (name, sorted(names))
    assert any(n.startswith("straight/events.out.tfevents") for n in names)
    assert any(n.startswith("straight/eval/cache/") for n in names)
    result = json.loads(epath.Path(gs_run["workdir"], "eval", f"{NUM_STEPS}.json").read_text())
    assert result["step"] == NUM_STEPS and result["num_samples"] == 8
    # Nothing of the run on the local disk: not under its current folder, not in its TMPDIR.
    assert local_files(gs_run["cwd"]) == []
    assert local_files(gs_run["tmp"]) == []
    assert sorted(read_losses(gs_run["workdir"])) == list(range(1, NUM_STEPS + 1))


def wait_for_object(gcs, name, proc, log_path, timeout=300):
    start = time.time()
    while name not in gcs.objects(BUCKET, name.split("/")[0] + "/"):
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}:\n"
                                 + log_path.read_text(errors="replace")[-3000:])
        assert time.time() - start < timeout, f"no {name} within {timeout} s"
        time.sleep(0.1)


@pytest.mark.slow
def test_storage_outage_short_is_ridden_out_long_stops_in_one_line_then_resumes(
        gcs, gs_run, compilation_cache, tmp_path):
    workdir = f"gs://{BUCKET}/outage"
    steps = 400
    cmd = command(workdir, **{"data.dir": f"{gs_run['workdir']}/digits", "num_train_steps": steps,
                              "keep_checkpoints": 2, "checkpoint_timeout_secs": 20,
                              "debug_log_losses": False})
    env = environment(gcs, compilation_cache, tmp_path / "tmp")
    log_path = tmp_path / "run.txt"
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=log)
            wait_for_object(gcs, "outage/checkpoints/4/commit_success.txt", proc, log_path)
            gcs.stop_storage()  # shorter than the retries: the run goes on
            time.sleep(3)
            gcs.restart_storage()
            wait_for_object(gcs, "outage/checkpoints/16/commit_success.txt", proc, log_path)
            gcs.stop_storage()  # for good: the run stops within a bounded time
            start = time.time()
            proc.wait(timeout=240)
            waited = time.time() - start
    finally:
        gcs.restart_storage()
    lines = log_path.read_text(errors="replace").strip().splitlines()
    assert proc.returncode == 2, lines[-20:]
    assert lines[-1].startswith("dico_jax.main: error: Cloud Storage bucket gs://dico-test "
                                "cannot be reached"), lines[-5:]
    assert waited < 200
    saved = ckpt_lib.saved_steps(f"{workdir}/checkpoints")
    assert saved and max(saved) >= 16

    done = subprocess.run(cmd + [f"--config.num_train_steps={max(saved) + 4}"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from the checkpoint of step {max(saved)}" in done.stderr
    assert max(ckpt_lib.saved_steps(f"{workdir}/checkpoints")) == max(saved) + 4


@pytest.mark.slow
def test_tools_read_and_write_gs(gcs, gs_run, tmp_path, monkeypatch):
    """sample, convert export, evaluate_run and tools.scaling with their inputs and outputs on
    the bucket; nothing lands in the current folder."""
    from dico_jax import sampling
    from dico_jax.convert import checkpoints
    from dico_jax.tools import evaluate_run, scaling

    monkeypatch.chdir(tmp_path)
    run = gs_run["workdir"]
    out = f"gs://{BUCKET}/tools"

    source = sampling.load_source(workdir=run)
    settings = sampling.Settings(num_samples=8, batch_size=8, seed=0, cfg_scale=1.0,
                                 guidance_channels=1, sampler="ddim", respacing="ddim2",
                                 labels=None)
    report = sampling.generate(source, settings, f"{out}/samples.npz", grid=f"{out}/grid.png",
                               progress=False)
    assert report.complete and report.out == f"{out}/samples.npz"
    import io

    with np.load(io.BytesIO(epath.Path(out, "samples.npz").read_bytes())) as f:
        assert f["arr_0"].shape == (8, 8, 8, 1)

    exported = checkpoints.export_torch_checkpoint(f"{run}/checkpoints", f"{out}/dico.pt")
    assert exported.files == (f"{out}/dico.pt",)

    # The step-4 checkpoint has no evaluation yet (the run evaluated its last step only).
    assert evaluate_run.evaluate_run(run, {}, [4]) == [4]
    assert json.loads(epath.Path(run, "eval", "4.json").read_text())["step"] == 4

    assert scaling.main(["--runs", run, "--no_official", "--out", f"{out}/scaling"]) == 0
    names = set(gcs.objects(BUCKET, "tools/"))
    assert {"tools/samples.npz", "tools/grid.png", "tools/dico.pt",
            "tools/scaling/loss_vs_step.png", "tools/scaling/loss_curves.csv"} <= names, names
    assert local_files(tmp_path) == []


def objects_of_step(gcs, name, step):
    return len(gcs.objects(BUCKET, f"{name}/checkpoints/{step}/"))


@pytest.mark.slow
def test_killed_at_several_moments_of_saves_to_gs_resumes_bit_identically(
        gcs, gs_run, compilation_cache, tmp_path):
    """One run on the bucket, stopped three times while an asynchronous checkpoint is being
    written (its first object in the bucket, then well into it), by SIGKILL and by SIGTERM, and
    restarted each time: every restart resumes from a complete checkpoint, never the partial
    one, and the run ends bit-identical to the uninterrupted one."""
    workdir = f"gs://{BUCKET}/killed"
    name = workdir.split("/")[-1]
    # The dataset the first run built, read from the bucket as config.data.dir.
    cmd = command(workdir, **{"data.dir": f"{gs_run['workdir']}/digits"})
    env = environment(gcs, compilation_cache, tmp_path / "tmp")
    log_path = tmp_path / "run.txt"
    # (signal, step whose save is under way, objects of that step already in the bucket)
    for sig, step, seen in [(signal.SIGKILL, 8, 1), (signal.SIGTERM, 12, 1),
                            (signal.SIGKILL, 16, 12)]:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=log)
            start = time.time()
            while objects_of_step(gcs, name, step) < seen:
                assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
                assert time.time() - start < 300, f"no save of step {step} within 300 s"
                time.sleep(0.02)
            proc.send_signal(sig)
            proc.wait(timeout=300)
        text = log_path.read_text(errors="replace")
        if sig == signal.SIGTERM:
            assert proc.returncode == 0, text[-3000:]
        saved = ckpt_lib.saved_steps(f"{workdir}/checkpoints")
        assert saved and max(saved) < NUM_STEPS, (sig, step, saved)
        if step > 8:
            assert "resumed from the checkpoint of step" in text, text[-3000:]

    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from the checkpoint of step" in done.stderr
    reference = read_losses(gs_run["workdir"])
    for step, values in read_losses(workdir).items():
        assert values == reference[step] * len(values), step
    ours, step = ckpt_lib.restore_to_host(f"{workdir}/checkpoints")
    theirs, _ = ckpt_lib.restore_to_host(f"{gs_run['workdir']}/checkpoints", step)
    assert step == NUM_STEPS
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
