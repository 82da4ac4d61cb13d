"""Entry points as real JAX multi-process jobs: 2 processes x 4 CPU devices (and 2 slices x 2 processes x 2 devices) through
`dico_jax.tools.local_pod` (jax.distributed with gloo collectives, Orbax multi-host
checkpoints, Grain per-process reads), compared with 1 process x 8 devices.

The training runs share one small digits setup; the 1-process reference run is made once per
module and every other run is checked against its losses.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

STEPS = 12
TRAIN = ["dico_jax.main", "--config=configs/digits.py", "--config.checkpoint_every_steps=4",
         "--config.log_every_steps=4", "--config.debug_log_losses=True",
         "--config.sample_at_end=False", "--config.keep_checkpoints=10"]
GRID = ["--config.sample_at_end=True", "--config.sampling.respacing=4",
        "--config.sampling.grid_per_class=1", "--config.sampling.grid_classes=4"]


def pod_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               DICO_JAX_HEARTBEAT_TIMEOUT="20", DICO_JAX_INIT_TIMEOUT="60")
    env.update(extra)
    return env


def pod_command(n: int, module_args: list[str], devices: int | None = None,
                slices: int = 1) -> list[str]:
    devices = devices or 8 // n
    return [PY, "-m", "dico_jax.tools.local_pod", "-n", str(n), "--devices_per_process",
            str(devices), "--slices", str(slices), "--grace", "60", "--", PY, "-m", *module_args]


def run_pod(n: int, module_args: list[str], timeout: float = 600, slices: int = 1,
            **env) -> subprocess.CompletedProcess:
    return subprocess.run(pod_command(n, module_args, slices=slices), cwd=REPO,
                          env=pod_env(**env), capture_output=True, text=True, timeout=timeout)


def train(n: int, workdir: Path, steps: int = STEPS, *extra: str, check: bool = True,
          slices: int = 1, timeout: float = 600, **env: str):
    result = run_pod(n, [*TRAIN, f"--workdir={workdir}", f"--config.num_train_steps={steps}",
                         *extra], slices=slices, timeout=timeout, **env)
    if check:
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return result


def losses(workdir: Path) -> dict[int, float]:
    out = {}
    for line in (workdir / "losses.jsonl").read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            out[record["step"]] = record["loss"]
    return out


def assert_losses_close(got: dict[int, float], want: dict[int, float], steps, rtol: float):
    steps = list(steps)
    assert set(steps) <= set(got), sorted(got)
    np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=rtol)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """Workdir of the 1-process, 8-device run."""
    workdir = tmp_path_factory.mktemp("one_process")
    train(1, workdir)
    return workdir


@pytest.fixture
def reference(reference_run) -> dict[int, float]:
    return losses(reference_run)


@pytest.mark.slow
def test_slices_and_process_counts_resume_one_another_and_match_one_process(tmp_path, reference):
    # 1 process with FSDP over its 8 devices trains 4 steps; 2 slices x 2 processes x 2 devices
    # resume it to step 8 (data parallel across the slices, FSDP over the 4 devices of each
    # slice, so every parameter is split across both processes of a slice) and draw the end
    # grid; 1 process resumes that checkpoint (global arrays and the input position of every
    # process) to the reference's end. Every step's loss is the 1-process run's.
    workdir = tmp_path / "run"
    fsdp = ["--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.fsdp_min_size=1"]
    train(1, workdir, 4, *fsdp)
    result = train(4, workdir, 8, "--config.mesh.slice=2", "--config.mesh.data=1",
                   "--config.mesh.fsdp=4", "--config.fsdp_min_size=1", *GRID, slices=2,
                   timeout=900)
    text = result.stdout
    assert "process 3 of 4 in slice 1 of 2 started" in text, text[-4000:]
    assert "mesh {'slice': 2, 'data': 1, 'fsdp': 4}" in text, text[-4000:]
    assert "slice 0: processes [0, 1]; slice 1: processes [2, 3]" in text, text[-4000:]
    assert (workdir / "samples.png").stat().st_size > 0
    assert (workdir / "samples_00000008.png").exists()
    # Quiet logs: metrics from process 0 only, no gloo connection lines, the parameter table
    # in a file.
    metric_lines = [line for line in text.splitlines() if "train/loss=" in line]
    assert metric_lines and all(line.startswith("[0]") for line in metric_lines)
    assert "[Gloo]" not in text and "Total: " not in text
    assert "x_embedder/kernel" in (workdir / "parameters.txt").read_text()
    assert_losses_close(losses(workdir), reference, range(1, 9), rtol=1e-4)
    train(1, workdir)
    assert_losses_close(losses(workdir), reference, range(1, STEPS + 1), rtol=1e-4)


def _start_pod(n: int, module_args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(pod_command(n, module_args), cwd=REPO, env=pod_env(),
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the pod ended early:\n{log.read_text()[-6000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out:\n{log.read_text()[-6000:]}")
        time.sleep(0.05)


def _pids(log: Path) -> dict[int, int]:
    pids = {}
    for line in log.read_text().splitlines():
        if line.startswith("[local_pod] process ") and " pid " in line:
            words = line.split()
            pids[int(words[2])] = int(words[words.index("pid") + 1].rstrip(","))
    return pids


# Minutes on 2 cores; by default test_a_failing_process_stops_its_peer_with_the_reason covers
# the peer stopping and the slice test a resume across process counts.
@pytest.mark.long
def test_sigkill_of_one_process_stops_the_other_and_a_rerun_resumes(tmp_path, reference):
    workdir = tmp_path / "run"
    log = tmp_path / "killed.log"
    args = [*TRAIN, f"--workdir={workdir}", f"--config.num_train_steps={STEPS}"]
    proc = _start_pod(2, args, log)
    _wait_for(lambda: (workdir / "checkpoints" / "4").is_dir(), proc, log)
    os.kill(_pids(log)[1], signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    text = log.read_text()
    # The survivor stops on its own (the pod's grace is longer than its wait), naming its peer.
    assert "[0] ERROR (process 0 of 2): lost process 1" in text, text[-4000:]
    assert "restart the whole job" in text
    assert "process 1 failed first" in text
    assert "process 0 exited with code 75" in text

    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    train(2, workdir)
    resumed = losses(workdir)
    # Steps after the last complete checkpoint are those of an uninterrupted run.
    assert_losses_close(resumed, reference, range(saved[-1] + 1, STEPS + 1), rtol=1e-4)


@pytest.mark.slow
def test_sigterm_to_both_processes_saves_one_agreed_step_and_exits_zero(tmp_path):
    workdir = tmp_path / "run"
    log = tmp_path / "preempted.log"
    proc = _start_pod(2, [*TRAIN, f"--workdir={workdir}", "--config.num_train_steps=1000"], log)
    _wait_for(lambda: (workdir / "checkpoints" / "4").is_dir(), proc, log)
    proc.send_signal(signal.SIGTERM)  # the pod passes it on to both processes
    assert proc.wait(timeout=180) == 0, log.read_text()[-6000:]
    text = log.read_text()
    stops = sorted({line.split("saved step ")[1].split(",")[0]
                    for line in text.splitlines() if "preempted: saved step" in line})
    assert len(stops) == 1, text[-4000:]
    assert sum("preempted: saved step" in line for line in text.splitlines()) == 2
    step = int(stops[0])
    assert 4 <= step < 1000 and (workdir / "checkpoints" / str(step)).is_dir()


# ---------------------------------------------------------------------------------------------
# Start-up.


@pytest.mark.parametrize("env, message", [
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID is not"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES is not"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"},
     "a single process needs no coordinator"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, "JAX_COORDINATOR_ADDRESS is not"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "outside 0 .. 1"),
])
def test_inconsistent_process_settings_are_refused(monkeypatch, env, message):
    from dico_jax import runtime

    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(runtime.DistributedConfigError, match=message):
        runtime.explicit_process_env()


def test_unreachable_coordinator_fails_in_bounded_time_with_a_clear_error():
    from dico_jax import runtime
    from dico_jax.tools.local_pod import free_port

    env = pod_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAX_NUM_PROCESSES="2",
                  JAX_PROCESS_ID="1", DICO_JAX_INIT_TIMEOUT="3")
    start = time.monotonic()
    result = subprocess.run([PY, "-c", "from dico_jax import runtime; runtime.start()"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 60
    assert result.returncode == runtime.EXIT_JOIN_FAILED, result.stderr[-3000:]
    assert "could not join process 1 of 2 via the coordinator at 127.0.0.1:" in result.stderr
    assert "within 3 s" in result.stderr


FAILING_JOB = """
from dico_jax import runtime
runtime.start()
import jax
from jax.experimental import multihost_utils
if jax.process_index() == 1:
    raise ValueError("bad input on process 1")
multihost_utils.sync_global_devices("never reached by process 1")
"""


def test_a_failing_process_stops_its_peer_with_the_reason():
    # Process 0 waits in a collective that process 1 never joins; without the peer watch it
    # would wait until the runtime's heartbeat and shutdown timeouts.
    from dico_jax import runtime

    start = time.monotonic()
    result = subprocess.run(
        [PY, "-m", "dico_jax.tools.local_pod", "-n", "2", "--devices_per_process", "1",
         "--grace", "100", "--", PY, "-c", FAILING_JOB],
        cwd=REPO, env=pod_env(), capture_output=True, text=True, timeout=200)
    assert result.returncode == 1
    assert time.monotonic() - start < 90
    assert ("[0] ERROR (process 0 of 2): process 1 failed (ValueError: bad input on process 1)"
            in result.stdout), result.stdout[-4000:]
    assert f"process 0 exited with code {runtime.EXIT_PEER_LOST}" in result.stdout
    assert "process 1 failed first" in result.stdout


# ---------------------------------------------------------------------------------------------
# Latent extraction and sampling.


def _extract_job(source: str, out: str) -> None:
    """Runs as each process of a pod: the extraction library with the test's small encoder."""
    from dico_jax import runtime

    runtime.start()
    from dico_jax.data import extract, imagenet
    from tests.test_extract import IMAGE_SIZE, _pool_encode

    import jax.numpy as jnp

    extract.extract_latents(imagenet.FolderSource(source), out, encode_fn=_pool_encode,
                            params={"gain": jnp.float32(2.0)}, image_size=IMAGE_SIZE,
                            batch_size=8, shard_size=4, scale_factor=0.5, vae_name="pool8",
                            latent_stats=True, show_progress=False)


def _dataset_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.mark.slow
def test_extract_across_two_processes_writes_the_one_process_dataset(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    source = tmp_path / "images"
    for c in range(3):
        (source / f"n0{c}").mkdir(parents=True)
        for i in range(10):
            w, h = rng.integers(20, 60, size=2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                source / f"n0{c}" / f"img{i}.png")
    datasets = {}
    for n in (1, 2):
        out = tmp_path / f"latents_{n}"
        result = run_pod(n, ["tests.test_multiprocess", "extract", str(source), str(out)],
                         timeout=300)
        assert result.returncode == 0, result.stdout[-6000:]
        datasets[n] = _dataset_files(out)
    assert "manifest.json" in datasets[1]
    # The per-channel statistics, merged from the shards' markers, are the same bytes too.
    assert json.loads(datasets[1]["manifest.json"])["latent_std"] is not None
    assert len([name for name in datasets[1] if name.endswith(".done.json")]) == 8
    assert datasets[2].keys() == datasets[1].keys()
    for name in datasets[1]:
        assert datasets[2][name] == datasets[1][name], name


@pytest.mark.slow
def test_sample_across_two_processes_writes_the_one_process_npz(tmp_path, reference_run):
    arrays = {}
    for n in (1, 2):
        out = tmp_path / f"samples_{n}.npz"
        result = run_pod(n, ["dico_jax.sample", f"--workdir={reference_run}", f"--out={out}",
                             "--config.sampling.num_samples=24", "--config.sampling.batch_size=8",
                             "--config.sampling.respacing=4", "--config.seed=3"], timeout=300)
        assert result.returncode == 0, result.stdout[-6000:]
        with np.load(out) as f:
            arrays[n] = {k: f[k] for k in f.files}
    assert arrays[1].keys() == arrays[2].keys() and arrays[1]["arr_0"].shape[0] == 24
    for key in arrays[1]:
        np.testing.assert_array_equal(arrays[2][key], arrays[1][key], err_msg=key)


if __name__ == "__main__":
    if sys.argv[1] == "extract":
        _extract_job(*sys.argv[2:])
