"""dico_jax.tools.scaling and configs/sweep.py: smoothing, FLOPs, log reading, the CLI."""
import csv
import importlib.util
import json
import os

import subprocess
import sys

import numpy as np
import pytest

from dico_jax import errors

from dico_jax.tools import paper_reference, scaling, scaling_eval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _load_config_module(name):
    spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------ smoothing

def test_moving_average_is_centered_and_shrinks_at_the_ends():
    out = scaling.moving_average([0, 0, 3, 0, 0], 3)
    np.testing.assert_allclose(out, [0, 1, 1, 1, 0])
    # Window 5 on 7 points: ends average 1 and 3 points, the middle 5.
    values = np.array([1.0, 2, 4, 8, 16, 32, 64])
    expected = [1, 7 / 3, 31 / 5, 62 / 5, 124 / 5, 112 / 3, 64]
    np.testing.assert_allclose(scaling.moving_average(values, 5), expected)


def test_moving_average_keeps_lines_and_identity():
    line = np.arange(10.0)
    np.testing.assert_allclose(scaling.moving_average(line, 7), line)  # centered: no lag
    noisy = np.random.default_rng(0).normal(size=20)
    np.testing.assert_allclose(scaling.moving_average(noisy, 1), noisy, rtol=1e-12, atol=1e-12)
    assert scaling.effective_window(4) == 5 and scaling.effective_window(51) == 51
    # An even window averages like the next odd one.
    np.testing.assert_allclose(scaling.moving_average(noisy, 4), scaling.moving_average(noisy, 5))
    with pytest.raises(ValueError, match="window"):
        scaling.moving_average(noisy, 0)


# ---------------------------------------------------------------------------- FLOPs

def test_forward_flops_follow_the_paper_table():
    assert scaling.paper_forward_flops_per_image("DiCo-XL") == pytest.approx(174.6e9)
    assert scaling.paper_forward_flops_per_image("DiCo-S") == pytest.approx(8.5e9)
    # Fully convolutional: 4x the latent area at 512.
    assert scaling.paper_forward_flops_per_image("DiCo-B", 512) == pytest.approx(4 * 33.76e9)
    assert scaling.paper_forward_flops_per_image("DiCo-H") is None
    # A value the run recorded wins over the table.
    assert scaling.forward_flops_per_image("DiCo-XL", 256, recorded=176.4e9) == 176.4e9
    assert scaling.forward_flops_per_image(None, 256) is None


def test_training_flops_formula():
    np.testing.assert_allclose(scaling.training_flops(2e9, 256, [0, 1, 10]),
                               [0, 3 * 2e9 * 256, 3 * 2e9 * 256 * 10])
    # The official DiCo-XL 256 run: about 4.06M steps at batch 256 is ~5.4e20 FLOPs.
    total = scaling.training_flops(scaling.paper_forward_flops_per_image("DiCo-XL"), 256, 4_058_700)
    assert total == pytest.approx(5.44e20, rel=0.01)


# ---------------------------------------------------------------- official CSV logs

def test_shipped_official_logs():
    curves = scaling.read_official_dir(scaling.OFFICIAL_LOGS_DIR)
    assert [c.model for c in curves] == ["DiCo-S", "DiCo-B", "DiCo-L", "DiCo-XL"]
    rows = {c.model: len(c.steps) for c in curves}
    assert rows == {"DiCo-S": 4027, "DiCo-B": 5644, "DiCo-L": 4261, "DiCo-XL": 40587}
    for c in curves:
        assert c.resolution == 256 and c.global_batch == 256
        assert c.steps[0] == 100 and np.all(np.diff(c.steps) > 0)
        assert np.all((c.losses > 0.05) & (c.losses < 1.0))
    assert curves[-1].steps[-1] == 4_058_700
    # Bigger models reach a lower loss at the same step (the scaling the paper shows).
    at_400k = [scaling.moving_average(c.losses, 51)[np.searchsorted(c.steps, 400_000)] for c in curves]
    assert at_400k == sorted(at_400k, reverse=True)


def test_shipped_logs_match_the_reference_copy():
    reference = os.path.join(ROOT, "..", "shared", "reference", "official_training_logs")
    if not os.path.isdir(reference):
        pytest.skip("reference logs not present on this machine")
    for name in sorted(os.listdir(reference)):
        with open(os.path.join(reference, name), "rb") as a, \
                open(os.path.join(scaling.OFFICIAL_LOGS_DIR, name), "rb") as b:
            assert a.read() == b.read(), name


def test_table8_matches_the_reference_copy():
    table = paper_reference.table8()
    assert len(table) == 32 and set(scaling.PAPER_FID50K_400K_256) == set(paper_reference.TABLE8)
    for model, fid in scaling.PAPER_FID50K_400K_256.items():
        assert table[(model, 256, 400_000)]["fid"] == fid
        steps, fids = paper_reference.table8_curve(model, "fid")
        assert steps == list(range(50_000, 400_001, 50_000)) and fids == sorted(fids, reverse=True)
    reference = os.path.join(ROOT, "..", "shared", "reference", "paper_table8.csv")
    if not os.path.isfile(reference):
        pytest.skip("reference table not present on this machine")
    rows = _csv_rows(reference)
    assert len(rows) == len(table)
    for row in rows:
        ours = table[(row["model"], 256, int(row["step"]))]
        assert ours == {m: float(row[m]) for m in paper_reference.TABLE8_METRICS}, row


def test_bad_official_logs_name_the_file(tmp_path):
    bad = tmp_path / "dico-xl-256.csv"
    bad.write_text("step,loss\n100,0.2\n")
    with pytest.raises(ValueError, match=r"dico-xl-256\.csv.*train_loss"):
        scaling.read_official_csv(str(bad))
    bad.write_text("step,train_loss,steps_per_sec\n200,0.2,1\n100,0.3,1\n")
    with pytest.raises(ValueError, match="not strictly increasing"):
        scaling.read_official_csv(str(bad))
    wrong_name = tmp_path / "xl.csv"
    wrong_name.write_text("step,train_loss\n")
    with pytest.raises(ValueError, match="dico-xl-256.csv"):
        scaling.read_official_csv(str(wrong_name))
    with pytest.raises(FileNotFoundError, match="no official logs"):
        scaling.read_official_dir(str(tmp_path / "empty"))


# -------------------------------------------------------------- our TensorBoard logs

def _write_clu_losses(logdir, steps_losses):
    from clu import metric_writers

    writer = metric_writers.create_default_writer(str(logdir))
    for step, loss in steps_losses:
        writer.write_scalars(step, {"train/loss": loss, "train/grad_norm": 1.0})
    writer.flush()
    writer.close()


def _write_simple_value_event(path, step, tag, value, wall_time):
    """A TF1-style event (simple_value), as older writers and tensorboardX produce."""
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2
    from tensorflow.core.util import event_pb2

    event = event_pb2.Event(wall_time=wall_time, step=step, summary=summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)]))
    with tf.io.TFRecordWriter(str(path)) as f:
        f.write(event.SerializeToString())


@pytest.fixture(scope="module")
def our_run(tmp_path_factory):
    """A run directory as the trainer leaves it: clu event files, config.json, eval results."""
    run = tmp_path_factory.mktemp("runs") / "xl-run"
    run.mkdir()
    _write_clu_losses(run, [(1, 0.9), (2, 0.7), (3, 0.6), (4, 0.5)])
    # The run was resumed from step 2: the later values of steps 3 and 4 win, 5 is new.
    _write_clu_losses(run, [(3, 0.55), (4, 0.45), (5, 0.4)])
    (run / "config.json").write_text(json.dumps({
        "model": {"name": "DiCo-XL"}, "resolution": 512, "global_batch_size": 8,
        "forward_flops_per_image": 7.0e11}))
    (run / "eval").mkdir()
    (run / "eval" / "fid_000005.json").write_text(json.dumps({"fid": 250.5, "step": 5}))
    (run / "eval" / "fid_000002.json").write_text(json.dumps({"fid": 300.0, "step": 2}))
    return run


def test_reads_clu_scalars_keeping_the_latest_value_of_a_step(our_run):
    steps, losses = scaling.read_tensorboard_scalars(str(our_run), "train/loss")
    np.testing.assert_array_equal(steps, [1, 2, 3, 4, 5])
    np.testing.assert_allclose(losses, [0.9, 0.7, 0.55, 0.45, 0.4], rtol=1e-6)
    other_steps, grad = scaling.read_tensorboard_scalars(str(our_run), "train/grad_norm")
    assert other_steps.tolist() == [1, 2, 3, 4, 5] and np.all(grad == 1.0)
    assert scaling.read_tensorboard_scalars(str(our_run), "no/such/tag")[0].size == 0


def test_reads_tf1_simple_values(tmp_path):
    _write_simple_value_event(tmp_path / "events.out.tfevents.1.host", 7, "train/loss", 0.25, 1.0)
    steps, losses = scaling.read_tensorboard_scalars(str(tmp_path))
    assert steps.tolist() == [7] and losses.tolist() == [0.25]


def test_run_description_from_config_json(our_run):
    curve = scaling.read_run(str(our_run))
    assert (curve.model, curve.resolution, curve.global_batch) == ("DiCo-XL", 512, 8)
    assert curve.flops_per_image == 7.0e11  # recorded by the trainer, wins over the table
    assert curve.label == "xl-run" and curve.source == "ours"
    fids = scaling.read_run_fids(str(our_run), curve)
    assert [(p.step, p.fid) for p in fids] == [(2, 300.0), (5, 250.5)]


def test_run_description_without_config_json(tmp_path):
    run = tmp_path / "dico-b-512-try2"
    run.mkdir()
    info = scaling.describe_run(str(run))
    assert (info["model"], info["resolution"], info["global_batch"]) == ("DiCo-B", 512, 256)
    assert not info["batch_known"]
    info = scaling.describe_run(str(tmp_path), label="DiCo-S smoke")
    assert info["model"] == "DiCo-S" and info["label"] == "DiCo-S smoke"
    # Without a pixel size, the latent side (32) times the VAE's 8 gives 256 pixels.
    (run / "config.json").write_text(json.dumps({"model": {"name": "DiCo-L"}, "latent_shape": [32, 32, 4]}))
    info = scaling.describe_run(str(run))
    assert (info["model"], info["resolution"]) == ("DiCo-L", 256)
    (run / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        scaling.describe_run(str(run))


def test_bad_eval_json_names_the_file(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "fid.json").write_text(json.dumps({"fid": 3.0}))
    curve = scaling.LossCurve("ours", "x", None, 256, 256, np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match=r"fid\.json.*'step'"):
        scaling.read_run_fids(str(tmp_path), curve)


# ------------------------------------------------------------------------------ CLI

def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _assert_png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == PNG_SIGNATURE and os.path.getsize(path) > 5000, path


def test_cli_ours_over_the_official(our_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert scaling.main(["--runs", str(our_run), "--label", "XL 512 test", "--out", str(out),
                         "--smooth", "3"]) == 0
    for name in ("loss_vs_step.png", "loss_vs_flops.png", "fid_vs_gflops.png"):
        _assert_png(out / name)
    rows = _csv_rows(out / "loss_curves.csv")
    ours = [r for r in rows if r["source"] == "ours"]
    assert [int(r["step"]) for r in ours] == [1, 2, 3, 4, 5]
    assert ours[0]["label"] == "XL 512 test" and ours[0]["model"] == "DiCo-XL"
    assert float(ours[-1]["train_flops"]) == pytest.approx(3 * 7.0e11 * 8 * 5)
    # Smoothed column: window 3 centered; the last point averages itself only.
    assert float(ours[1]["loss_smoothed_ma3"]) == pytest.approx((0.9 + 0.7 + 0.55) / 3, rel=1e-5)
    assert float(ours[-1]["loss_smoothed_ma3"]) == pytest.approx(0.4, rel=1e-5)
    assert len(rows) - len(ours) == 4027 + 5644 + 4261 + 40587
    fids = _csv_rows(out / "fid.csv")
    assert {(r["source"], r["model"]) for r in fids} >= {("official", "DiCo-XL"), ("ours", "DiCo-XL")}
    assert "wrote to" in capsys.readouterr().out


def test_cli_either_source_alone(our_run, tmp_path):
    only_ours = tmp_path / "ours"
    assert scaling.main(["--runs", str(our_run), "--no_official", "--out", str(only_ours)]) == 0
    assert {r["source"] for r in _csv_rows(only_ours / "loss_curves.csv")} == {"ours"}
    assert [r["source"] for r in _csv_rows(only_ours / "fid.csv")] == ["ours", "ours"]
    _assert_png(only_ours / "loss_vs_step.png")

    only_official = tmp_path / "official"
    assert scaling.main(["--out", str(only_official), "--official", scaling.OFFICIAL_LOGS_DIR]) == 0
    assert {r["source"] for r in _csv_rows(only_official / "loss_curves.csv")} == {"official"}
    _assert_png(only_official / "loss_vs_flops.png")
    # The official logs come with the paper's Table 8 of their scales, drawn and printed.
    _assert_png(only_official / "eval_vs_step.png")
    _assert_png(only_official / "fid_vs_train_flops.png")


def test_cli_ours_against_table8_at_matched_steps(tmp_path, capsys):
    run = tmp_path / "dico-s-256"
    run.mkdir()
    _write_clu_losses(run, [(50_000, 0.2), (100_000, 0.19)])
    (run / "config.json").write_text(json.dumps({"model": {"name": "DiCo-S"}, "resolution": 256,
                                                 "global_batch_size": 256}))
    (run / "eval").mkdir()
    for step, fid in [(50_000, 111.25), (75_000, 90.0), (100_000, 80.5)]:
        result = {"step": step, "fid": fid, "sfid": 18.5, "is": 12.25, "precision": 0.3, "recall": 0.25}
        (run / "eval" / f"{step}.json").write_text(json.dumps(result))
    out = tmp_path / "out"
    assert scaling.main(["--runs", str(run), "--out", str(out), "--smooth", "51"]) == 0
    printed = capsys.readouterr().out
    rows = {line.split()[1]: line.split()[2:] for line in printed.splitlines()
            if line.strip().startswith("dico-s-256 ")}
    assert rows["50000"] == ["111.2/109.5", "18.5/18.28", "12.25/12", "0.3/0.283", "0.25/0.322"]
    assert rows["75000"] == ["90/-", "18.5/-", "12.25/-", "0.3/-", "0.25/-"]  # not in Table 8
    assert rows["100000"][0] == "80.5/79.79"
    # The other scales of the official logs print as Table 8 alone; DiCo-S is matched above.
    table8_rows = [line.split() for line in printed.split("the paper's Table 8")[1].splitlines()[2:]]
    table8_rows = [r for r in table8_rows if len(r) == 7 and r[1].isdigit()]
    assert len(table8_rows) == 24 and {r[0] for r in table8_rows} == {"DiCo-B", "DiCo-L", "DiCo-XL"}
    assert ["DiCo-XL", "400000", "11.67", "5.38", "100.4", "0.711", "0.606"] in table8_rows
    # Two loss points: the mean is over both, and says so.
    assert "mean loss of the last 2 points 0.1950" in printed
    _assert_png(out / "eval_vs_step.png")
    evals = [scaling_eval.RunEvals.read(str(run), scaling.read_run(str(run)))]
    drawn = scaling_eval.plot_metrics(str(tmp_path / "p.png"), evals, ["DiCo-S"])
    assert drawn == ["fid", "sfid", "is", "precision", "recall"]


@pytest.mark.parametrize("argv,message", [
    (["--no_official"], "nothing to plot"),
    (["--runs", "a", "b", "--label", "x"], "--label has 1 names for 2 --runs"),
    (["--smooth", "0"], "--smooth must be >= 1"),
])
def test_cli_rejects_bad_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        scaling.main([*argv, "--out", str(tmp_path)])
    assert message in capsys.readouterr().err


def test_cli_missing_run_directory(tmp_path):
    with pytest.raises(errors.MissingFile, match="does-not-exist"):
        scaling.main(["--runs", str(tmp_path / "does-not-exist"), "--out", str(tmp_path / "o")])
    run = subprocess.run([sys.executable, "-m", "dico_jax.tools.scaling", "--runs",
                          str(tmp_path / "does-not-exist"), "--out", str(tmp_path / "o")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [
        f"dico_jax.tools.scaling: error: --runs {tmp_path / 'does-not-exist'}: no such run directory"]


# ---------------------------------------------------------------------------- sweep

def test_sweep_covers_every_scale_and_resolution():
    sweep = _load_config_module("sweep")
    cfg = sweep.get_config()
    specs = sweep.run_specs(cfg, "gs://bucket/sweep/")
    assert len(specs) == 10
    assert {s["name"] for s in specs} == {f"dico-{s}-{r}" for s in ("s", "b", "l", "xl", "h")
                                          for r in (256, 512)}
    xl512 = next(s for s in specs if s["name"] == "dico-xl-512")
    assert xl512["config"] == "configs/dico.py:XL,res=512"
    assert xl512["workdir"] == "gs://bucket/sweep/dico-xl-512"
    assert "--config.num_train_steps=400000" in xl512["overrides"]
    points = xl512["eval_steps"]
    assert points[0] == (50_000, 10_000) and points[-1] == (400_000, 50_000) and len(points) == 8
    with pytest.raises(ValueError, match="unknown sweep"):
        sweep.get_config("huge")


def test_sweep_overrides_are_fields_of_the_training_config():
    sweep = _load_config_module("sweep")
    dico = _load_config_module("dico")
    for variant in ("paper", "smoke"):
        for spec in sweep.run_specs(sweep.get_config(variant), "/tmp/sweep"):
            config = dico.get_config(spec["config"].split(":", 1)[1])
            for override in spec["overrides"]:
                key, value = override[len("--config."):].split("=")
                assert key in config, f"{override}: no field {key} in {spec['config']}"
                assert type(config[key])(value) is not None
    smoke = sweep.get_config("smoke")
    assert smoke.num_train_steps <= 10 and smoke.global_batch_size % 8 == 0
    assert sweep.eval_steps(smoke) == []
