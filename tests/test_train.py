"""Training: sharded step, exact resumption, restoring onto other meshes, NaN stop, SIGTERM.

Everything runs a tiny DiCo (width 16, one block per level) on the 8x8 digits, on the
8 fake CPU devices of conftest.py.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dico_jax import checkpoint as ckpt_lib
from dico_jax import sharding as sharding_lib
from dico_jax import builders, train, train_step
from dico_jax.data import digits, pipeline, records
from dico_jax.diffusion import create_diffusion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import digits as digits_config  # noqa: E402

NUM_STEPS = 24
TINY = {  # command-line form of the tiny config, shared by in-process and subprocess runs
    "model.hidden_size": 16,
    "global_batch_size": 16,
    "num_train_steps": NUM_STEPS,
    "log_every_steps": 4,
    "checkpoint_every_steps": 4,
    "keep_checkpoints": 10,
    "mesh.data": 4,
    "mesh.fsdp": 2,
    "fsdp_min_size": 256,
    "sample_at_end": False,
    "debug_log_losses": True,
    "eval.every_steps": 0,  # evaluation during training has its own tests
}


@pytest.fixture(scope="module", autouse=True)
def _compile_once(compilation_cache):
    """This module's runs and subprocesses share one compilation cache (conftest.py), set up
    before any of them."""
    yield compilation_cache


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("digits"))
    digits.build_digits_dataset(path)
    return path


def tiny_config(data_dir, **overrides):
    config = digits_config.get_config()
    config.update_from_flattened_dict({**TINY, "data.dir": data_dir, **overrides})
    return config


def read_losses(workdir):
    """step -> list of logged losses (a resumed run logs some steps twice)."""
    out = {}
    with open(os.path.join(workdir, "losses.jsonl")) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            out.setdefault(record["step"], []).append(record["loss"])
    return out


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(a, b):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def straight_run(digits_dir, tmp_path_factory):
    """An uninterrupted run: the reference for every resumption test."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    state = train.train_and_evaluate(tiny_config(digits_dir), workdir)
    return workdir, host(state.to_dict()), read_losses(workdir)


# ---------------------------------------------------------------------------------------------


def test_sharded_step_matches_one_device(digits_dir):
    config = tiny_config(digits_dir)
    manifest = records.read_manifest(digits_dir)
    config = train.resolve_config(config, manifest)
    model = builders.build_model(config)
    diffusion = create_diffusion("")
    tx, schedule = builders.build_optimizer(config)
    shape = tuple(manifest.latent_shape)
    rng = np.random.default_rng(0)
    batch = {"latent": rng.standard_normal((16, *shape)).astype(np.float32),
             "label": rng.integers(0, 10, 16).astype(np.int32)}

    mesh8 = sharding_lib.create_mesh({"data": 4, "fsdp": 2})
    init, _, _ = train_step.init_state(config, model, tx, mesh8, shape)
    initial = host(init())
    results = []
    for mesh in (sharding_lib.create_mesh({"data": 1}, jax.devices()[:1]), mesh8):
        _, _, shardings = train_step.init_state(config, model, tx, mesh, shape)
        state = jax.device_put(initial, shardings)
        step = train_step.make_train_step(config, model, diffusion, tx, schedule, shardings, mesh)
        losses = []
        for _ in range(2):
            state, metrics = step(state, pipeline.make_global_batch(batch, mesh))
            losses.append(float(metrics["loss"]))
        results.append((losses, host(state.params), state.params))

    (losses1, params1, _), (losses8, params8, sharded) = results
    # The FSDP rule did split some parameters across the 2-way fsdp axis.
    specs = [x.sharding.spec for x in jax.tree.leaves(sharded)]
    assert any("fsdp" in s for s in specs) and any(s == jax.sharding.PartitionSpec() for s in specs)
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
    assert losses1[0] != losses1[1]
    for a, b in zip(jax.tree.leaves(params8), jax.tree.leaves(params1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_equals_the_large_batch(digits_dir):
    """k = 4 micro-batches: the same draws, loss and update as the whole batch at once."""
    config = train.resolve_config(tiny_config(digits_dir), records.read_manifest(digits_dir))
    config.global_batch_size = 64
    model = builders.build_model(config)
    diffusion = create_diffusion("")
    tx, schedule = builders.build_optimizer(config)
    shape = tuple(records.read_manifest(digits_dir).latent_shape)
    rng = np.random.default_rng(1)
    batch = {"latent": rng.standard_normal((64, *shape)).astype(np.float32),
             "label": rng.integers(0, 10, 64).astype(np.int32)}
    mesh = sharding_lib.create_mesh({"data": 4, "fsdp": 2})
    init, _, shardings = train_step.init_state(config, model, tx, mesh, shape)
    initial = host(init())
    out = {}
    for k in (1, 4):
        config.grad_accum_steps = k
        step = train_step.make_train_step(config, model, diffusion, tx, schedule, shardings, mesh)
        state, metrics = step(jax.device_put(initial, shardings),
                              pipeline.make_global_batch(batch, mesh))
        update = jax.tree.map(lambda new, old: np.asarray(new) - old, host(state.params),
                              initial.params)
        out[k] = ({m: float(v) for m, v in metrics.items()}, update)
    (m1, u1), (m4, u4) = out[1], out[4]
    for name in ("loss", "mse", "vb", "grad_norm"):
        assert abs(m4[name] - m1[name]) <= 1e-5 * abs(m1[name]), (name, m1[name], m4[name])
    flat1, flat4 = (np.concatenate([x.ravel() for x in jax.tree.leaves(u)]) for u in (u1, u4))
    assert np.linalg.norm(flat4 - flat1) <= 1e-5 * np.linalg.norm(flat1)


def test_param_partition_rule():
    spec = sharding_lib.param_partition_spec
    assert spec((9, 416, 832), 4, 1024) == jax.sharding.PartitionSpec(None, None, "fsdp")
    assert spec((832, 7), 4, 1024) == jax.sharding.PartitionSpec("fsdp", None)
    assert spec((832,), 4, 10_000) == jax.sharding.PartitionSpec()  # small: replicated
    assert spec((7, 9), 2, 1) == jax.sharding.PartitionSpec()  # indivisible: replicated
    assert spec((64, 64), 1, 1) == jax.sharding.PartitionSpec()  # no fsdp axis
    assert sharding_lib.resolve_axis_sizes({"data": -1, "fsdp": 2}, 8) == {"slice": 1, "data": 4, "fsdp": 2}
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding_lib.resolve_axis_sizes({"data": 3, "fsdp": 2}, 8)


def test_resume_is_bitwise_exact(digits_dir, straight_run, tmp_path):
    ref_dir, ref_state, ref_losses = straight_run
    assert sorted(ref_losses) == list(range(1, NUM_STEPS + 1))
    workdir = str(tmp_path)
    # Stop off the checkpoint interval (the final save), then resume with the full length.
    train.train_and_evaluate(tiny_config(digits_dir, num_train_steps=10), workdir)
    assert ckpt_lib.saved_steps(ckpt_lib.checkpoint_dir(workdir)) == [4, 8, 10]
    state = train.train_and_evaluate(tiny_config(digits_dir), workdir)
    losses = read_losses(workdir)
    assert losses == ref_losses  # every step logged once, each loss equal to the bit
    assert_trees_equal(host(state.to_dict()), ref_state)


# A minute on 2 cores; the slice test resumes across meshes and process counts.
@pytest.mark.long
def test_restore_onto_smaller_mesh_and_one_cpu(digits_dir, straight_run):
    ref_dir, ref_state, ref_losses = straight_run
    config = train.resolve_config(tiny_config(digits_dir), records.read_manifest(digits_dir))
    model = builders.build_model(config)
    tx, schedule = builders.build_optimizer(config)
    directory = ckpt_lib.checkpoint_dir(ref_dir)

    # 8 devices (data 4 x fsdp 2) -> 4 devices (data 2 x fsdp 2), then one more step there.
    mesh4 = sharding_lib.create_mesh({"data": 2, "fsdp": 2}, jax.devices()[:4])
    _, abstract, shardings = train_step.init_state(config, model, tx, mesh4, (8, 8, 1))
    target = sharding_lib.with_shardings(abstract.to_dict(), shardings.to_dict())
    checkpointer = ckpt_lib.TrainCheckpointer(directory, keep=10)
    iterator = pipeline.create_train_iterator(digits_dir, global_batch_size=16, seed=config.seed,
                                              random_flip=False)
    restored, iterator = checkpointer.restore(NUM_STEPS - 4, target, iterator)
    checkpointer.close()
    devices = {d for x in jax.tree.leaves(restored["params"]) for d in x.sharding.device_set}
    assert devices == set(jax.devices()[:4])
    step = train_step.make_train_step(config, model, create_diffusion(""), tx, schedule,
                                 train_step.TrainState(**shardings.to_dict()), mesh4)
    state, metrics = step(train_step.TrainState(**restored),
                          pipeline.make_global_batch(next(iterator), mesh4))
    assert int(state.step) == NUM_STEPS - 3
    np.testing.assert_allclose(float(metrics["loss"]), ref_losses[NUM_STEPS - 3][0], rtol=1e-5)

    # -> one CPU, numpy, without the optimizer state.
    on_host, step_restored = ckpt_lib.restore_to_host(directory)
    assert step_restored == NUM_STEPS and set(on_host) == {"step", "params", "ema_params"}
    assert_trees_equal(on_host["params"], ref_state["params"])
    assert_trees_equal(on_host["ema_params"], ref_state["ema_params"])
    assert ckpt_lib.read_config(directory)["model"]["name"] == "DiCo-S"


def test_nan_batch_stops_and_keeps_last_checkpoint(digits_dir, tmp_path):
    workdir = str(tmp_path / "run")
    good = train.train_and_evaluate(tiny_config(digits_dir, num_train_steps=4), workdir)
    # Same record count and labels as the digits, every pixel NaN.
    images, labels = digits.digits_arrays()
    views = np.full((len(images), 2, 1, 8, 8, 1), np.nan, np.float32)
    bad_dir = str(tmp_path / "nan_digits")
    records.write_dataset(bad_dir, views, labels, num_classes=10, storage="sample",
                          scale_factor=1.0, vae="none", image_size=8, shard_size=1024)

    with pytest.raises(train.NonFiniteLossError, match="step 5"):
        train.train_and_evaluate(tiny_config(bad_dir, num_train_steps=8), workdir)
    directory = ckpt_lib.checkpoint_dir(workdir)
    assert ckpt_lib.saved_steps(directory) == [4]
    on_host, step = ckpt_lib.restore_to_host(directory)
    assert step == 4
    assert_trees_equal(on_host["params"], host(good.params))


@pytest.mark.slow
def test_profile_traces_the_chosen_steps_where_tensorboard_and_profile_summary_find_it(
        digits_dir, tmp_path, capsys):
    import gzip

    from dico_jax.tools import profile_summary

    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config(digits_dir, num_train_steps=4, profile=(2, 2)), workdir)
    [run] = list((tmp_path / "run" / "plugins" / "profile").iterdir())
    names = sorted(p.name for p in run.iterdir())
    assert any(n.endswith(".xplane.pb") for n in names), names  # what TensorBoard reads
    assert json.loads((run / "profile.json").read_text())["steps"] == 2
    [trace] = [run / n for n in names if n.endswith(".trace.json.gz")]
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    # The loop's step annotations (numbered from 0): steps 2 and 3 only.
    traced = {int(e["args"]["step_num"]) for e in events
              if e.get("name") == "train" and "step_num" in e.get("args", {})}
    assert traced == {1, 2}, traced

    summary = profile_summary.main([workdir])
    assert f"trace {trace}, 2 step(s)" in capsys.readouterr().out
    assert summary["device_ms_per_step"] > 0
    assert {"conv", "matmul"} <= set(summary["categories"]), summary["categories"]


@pytest.mark.parametrize("spec", [(0, 2), (3, -1), (1, 2, 3)])
def test_bad_profile_setting_is_a_user_error(digits_dir, tmp_path, spec):
    with pytest.raises(train.UserError, match="config.profile"):
        train.train_and_evaluate(tiny_config(digits_dir, profile=spec), str(tmp_path))


# ---------------------------------------------------------------------------------------------
# The command line, in subprocesses.


def main_command(workdir, data_dir, **overrides):
    flags = {**TINY, "data.dir": data_dir, **overrides}
    return [sys.executable, "-m", "dico_jax.main", f"--config={ROOT}/configs/digits.py",
            f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in flags.items()]


def wait_for(predicate, proc, log_path, timeout=240):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            tail = open(log_path, "rb").read()[-3000:].decode(errors="replace")
            raise AssertionError(f"training exited early with code {proc.returncode}:\n{tail}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for training progress")
        time.sleep(0.05)


# A minute on 2 cores; the gs:// kill test stops one run three times (SIGKILL included)
# and checks the same bit-identical end.
@pytest.mark.long
def test_sigkill_then_restart_matches_uninterrupted_run(digits_dir, straight_run, tmp_path,
                                                         compilation_cache):
    _, ref_state, ref_losses = straight_run
    workdir = str(tmp_path / "run")
    cmd = main_command(workdir, digits_dir)
    env = {**os.environ, **compilation_cache}
    log_path = tmp_path / "killed.txt"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log)
        first_checkpoint = os.path.join(ckpt_lib.checkpoint_dir(workdir), "4")
        wait_for(lambda: os.path.isdir(first_checkpoint), proc, log_path)
        # A second training on the live run's workdir refuses, naming the holder; the first
        # is stopped (SIGSTOP) meanwhile so that it cannot finish first.
        proc.send_signal(signal.SIGSTOP)
        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=300)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert second.returncode == 2, second.stderr[-3000:]
    last = _last_line(second.stderr)
    assert last.startswith(f"dico_jax.main: error: {workdir} is in use by another training: "
                           f"host {socket.gethostname()}, process {proc.pid}, since "), last
    killed_at = max(read_losses(workdir))
    assert killed_at < NUM_STEPS, "the run finished before it could be killed"

    # The killed run's lock is left behind; the restart resumes all the same.
    assert os.path.exists(os.path.join(workdir, "run.lock"))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from the checkpoint of step" in done.stderr
    assert not os.path.exists(os.path.join(workdir, "run.lock"))
    losses = read_losses(workdir)
    assert sorted(losses) == list(range(1, NUM_STEPS + 1))
    for step, values in losses.items():  # steps logged before the kill and again after it
        assert values == ref_losses[step] * len(values), step
    on_host, _ = ckpt_lib.restore_to_host(ckpt_lib.checkpoint_dir(workdir))
    assert_trees_equal(on_host["params"], ref_state["params"])


@pytest.mark.slow
def test_a_finished_run_says_so_and_builds_nothing(digits_dir, straight_run, tmp_path,
                                                  compilation_cache):
    workdir = tmp_path / "run"
    shutil.copytree(straight_run[0], workdir)
    before = sorted(os.listdir(workdir))
    done = subprocess.run(main_command(str(workdir), digits_dir, sample_at_end=True), cwd=ROOT,
                          env={**os.environ, **compilation_cache}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (f"the run in {workdir} is finished: it has the checkpoint of step {NUM_STEPS}"
            in done.stderr), done.stderr[-3000:]
    assert "compiled" not in done.stderr and "grid of step" not in done.stderr
    assert sorted(os.listdir(workdir)) == before


@pytest.mark.slow
def test_sigterm_saves_current_step(digits_dir, tmp_path, compilation_cache):
    workdir = str(tmp_path / "run")
    log_path = tmp_path / "stderr.txt"
    with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would stall training
        proc = subprocess.Popen(
            main_command(workdir, digits_dir, num_train_steps=100_000,
                         checkpoint_every_steps=100_000),
            cwd=ROOT, env={**os.environ, **compilation_cache}, stdout=log, stderr=log)
        losses_path = os.path.join(workdir, "losses.jsonl")
        wait_for(lambda: os.path.exists(losses_path) and len(read_losses(workdir)) >= 3, proc,
                 log_path)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    stderr = log_path.read_bytes()
    assert proc.returncode == 0, stderr[-3000:]
    last_logged = max(read_losses(workdir))
    steps = ckpt_lib.saved_steps(ckpt_lib.checkpoint_dir(workdir))
    assert steps == [last_logged] and 3 <= last_logged < 100_000
    assert b"preempted" in stderr


# ---------------------------------------------------------------------------------------------
# Mistakes and damage, as a user meets them on the command line.


def _last_line(stderr):
    lines = stderr.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.mark.slow
def test_run_level_user_errors_are_one_line(digits_dir, straight_run, tmp_path, compilation_cache):
    env = {**os.environ, **compilation_cache}
    # A global batch the devices cannot split: refused before anything is built.
    fresh = tmp_path / "fresh"
    done = subprocess.run(main_command(str(fresh), digits_dir, global_batch_size=60), cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert _last_line(done.stderr).startswith(
        "dico_jax.main: error: config.global_batch_size=60 does not split into 8 devices")
    assert "Traceback" not in done.stderr and not (fresh / "checkpoints").exists()
    # Resuming with another model: the differing config fields are named; nothing is touched.
    workdir = tmp_path / "run"
    shutil.copytree(straight_run[0], workdir)
    done = subprocess.run(main_command(str(workdir), digits_dir, **{"model.hidden_size": 32}),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    last = _last_line(done.stderr)
    assert last.startswith("dico_jax.main: error: ") and "holds another model" in last
    assert "config.model.hidden_size: checkpoint 16, this run 32" in last
    assert ckpt_lib.saved_steps(ckpt_lib.checkpoint_dir(str(workdir))) == list(range(4, 25, 4))


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_and_the_run_continues(digits_dir, straight_run,
                                                                     tmp_path, compilation_cache):
    ref_workdir, ref_state, _ = straight_run
    workdir = tmp_path / "run"
    shutil.copytree(ref_workdir, workdir)
    newest = os.path.join(ckpt_lib.checkpoint_dir(str(workdir)), str(NUM_STEPS))
    files = [os.path.join(root, f) for root, _, names in os.walk(os.path.join(newest, "state"))
             for f in names if f"{os.sep}d{os.sep}" in os.path.join(root, f)]
    for victim in files:  # the step's array data cut short, as by a copy that stopped midway
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    done = subprocess.run(main_command(str(workdir), digits_dir), cwd=ROOT,
                          env={**os.environ, **compilation_cache}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cannot be restored" in done.stderr, done.stderr[-3000:]
    assert f"checkpoint of step {NUM_STEPS}" in done.stderr
    assert f"resumed from the checkpoint of step {NUM_STEPS - 4}" in done.stderr
    # The damaged step is kept aside; the run redid its last steps exactly.
    assert os.path.isdir(os.path.join(f"{ckpt_lib.checkpoint_dir(str(workdir))}_damaged",
                                      str(NUM_STEPS)))
    on_host, step = ckpt_lib.restore_to_host(ckpt_lib.checkpoint_dir(str(workdir)))
    assert step == NUM_STEPS
    assert_trees_equal(on_host["params"], ref_state["params"])


@pytest.mark.slow
def test_disk_full_during_training_is_one_line_and_keeps_the_last_checkpoint(
        digits_dir, straight_run, small_tmpfs, compilation_cache):
    ref_workdir = straight_run[0]
    one = sum(os.path.getsize(os.path.join(root, f)) for root, _, names in
              os.walk(os.path.join(ckpt_lib.checkpoint_dir(ref_workdir), "4")) for f in names)
    # Room for a few checkpoints, not for the ten this run keeps.
    workdir = os.path.join(small_tmpfs(f"{int(one * 3) // 1024}k"), "run")
    done = subprocess.run(main_command(workdir, digits_dir, num_train_steps=40), cwd=ROOT,
                          env={**os.environ, **compilation_cache}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-5000:]
    last = _last_line(done.stderr)
    match = re.search(r"no space left on device; the checkpoint of step (\d+) is intact", last)
    assert last.startswith("dico_jax.main: error: saving a checkpoint in ") and match, last
    _, step = ckpt_lib.restore_to_host(ckpt_lib.checkpoint_dir(workdir), items=("params",))
    assert step == int(match.group(1)) >= 4
