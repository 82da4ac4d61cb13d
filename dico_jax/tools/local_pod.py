"""A pod on one machine: runs a command as n JAX processes that find each other.

    python -m dico_jax.tools.local_pod -n 2 --devices_per_process 4 -- \\
        python -m dico_jax.main --config=configs/digits.py --workdir=/tmp/digits

Process i gets JAX_COORDINATOR_ADDRESS (a free localhost port), JAX_NUM_PROCESSES=n and
JAX_PROCESS_ID=i, which `dico_jax.runtime.start()` reads; with `--devices_per_process` it runs
on the CPU backend with that many devices per process, as a pod slice of n hosts would run
with its chips. `--slices S` rehearses a multislice job: the n processes form S slices of
n / S consecutive processes (DICO_JAX_NUM_SLICES=S, which `dico_jax.sharding` reads to build
the mesh's `slice` axis), e.g. 2 slices x 2 processes x 2 devices:

    python -m dico_jax.tools.local_pod -n 4 --slices 2 --devices_per_process 2 -- \\
        python -m dico_jax.main --config=configs/digits.py --workdir=/tmp/digits \\
        --config.mesh.slice=2 --config.mesh.fsdp=2

Every line a process prints comes out prefixed with `[i]`.

If a process exits non-zero or is killed, the others are given `--grace` seconds to notice
on their own (they stop when they lose a peer), then stopped; the pod exits non-zero and
names the process that failed first. SIGTERM or SIGINT to the pod is passed on to every
process (a preemption of the whole slice); the pod then waits for them.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from dico_jax import command

EXIT_PEER_LOST = 75  # dico_jax.runtime.EXIT_PEER_LOST; not imported, to keep JAX out of here
NUM_SLICES_ENV = "DICO_JAX_NUM_SLICES"  # dico_jax.sharding.NUM_SLICES_ENV, for the same reason


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict[str, str], *, index: int, count: int, address: str,
                devices_per_process: int | None, slices: int = 1) -> dict[str, str]:
    env = dict(base)
    env["PYTHONUNBUFFERED"] = "1"
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                 NUM_SLICES_ENV):
        env.pop(name, None)
    if slices > 1:
        env[NUM_SLICES_ENV] = str(slices)
    if count > 1:  # one process runs alone, without a coordinator
        env.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(count),
                   JAX_PROCESS_ID=str(index))
    if devices_per_process:
        env["JAX_PLATFORMS"] = "cpu"
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
        env["XLA_FLAGS"] = " ".join(flags)
    return env


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


# The CPU collectives' transport (gloo) prints a line for every connection it makes, with no
# setting to turn it off; a local pod's log leaves them out. Its threads write each line in
# pieces, so two connections can interleave into lines that hold any part of the message.
GLOO_CHATTER = re.compile(r"\[Gloo\]|is connected to|connected peer ranks|\d+ peer ranks")


class Pod:
    def __init__(self, command: Sequence[str], count: int, devices_per_process: int | None,
                 port: int | None = None, out=None, slices: int = 1):
        self.out = out or sys.stdout
        self.lock = threading.Lock()
        address = f"127.0.0.1:{port or free_port()}"
        self.procs = []
        self.pumps = []
        for i in range(count):
            env = process_env(os.environ, index=i, count=count, address=address,
                              devices_per_process=devices_per_process, slices=slices)
            proc = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            self.procs.append(proc)
            where = f" in slice {i // (count // slices)} of {slices}" if slices > 1 else ""
            self.say(f"process {i} of {count}{where} started, pid {proc.pid}, "
                     f"coordinator {address}")
            pump = threading.Thread(target=self._pump, args=(i, proc), daemon=True)
            pump.start()
            self.pumps.append(pump)

    def say(self, line: str) -> None:
        with self.lock:
            self.out.write(f"[local_pod] {line}\n")
            self.out.flush()

    def _pump(self, index: int, proc: subprocess.Popen) -> None:
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            if GLOO_CHATTER.search(line):
                continue
            with self.lock:
                self.out.write(f"[{index}] {line}\n")
                self.out.flush()

    def signal_all(self, signum: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    def stop_all(self, wait_s: float = 10.0) -> None:
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.1)
        self.signal_all(signal.SIGKILL)

    def wait(self, grace_s: float) -> int:
        """0 when every process exits 0; else 1 after naming the first that failed."""
        failed = None
        failed_at = 0.0
        order: list[int] = []  # processes in the order they were seen to fail
        while True:
            codes = [p.poll() for p in self.procs]
            for i, code in enumerate(codes):
                if code not in (None, 0) and i not in order:
                    order.append(i)
            if failed is None and order:
                failed, failed_at = order[0], time.monotonic()
                self.say(f"process {failed} {_describe(codes[failed])}; the others get "
                         f"{grace_s:g} s to stop on their own")
            if all(c is not None for c in codes):
                break
            if failed is not None and time.monotonic() - failed_at > grace_s:
                self.say("stopping the processes still running")
                self.stop_all()
                for p in self.procs:
                    p.wait()
                break
            time.sleep(0.1)
        for pump in self.pumps:
            pump.join(timeout=5)
        if failed is None:
            return 0
        # A process that stopped because it lost a peer (dico_jax.runtime.EXIT_PEER_LOST) is
        # not the cause when another failed too.
        causes = [i for i in order if self.procs[i].returncode != EXIT_PEER_LOST]
        failed = (causes or order)[0]
        summary = ", ".join(f"process {i} {_describe(p.returncode)}"
                            for i, p in enumerate(self.procs))
        self.say(f"FAILED: process {failed} failed first ({summary})")
        return 1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = command.ArgumentParser("dico_jax.tools.local_pod", description=__doc__.splitlines()[0],
                                     usage="%(prog)s -n N [options] -- command ...")
    parser.add_argument("-n", "--num_processes", type=int, required=True)
    parser.add_argument("--devices_per_process", type=int, default=None,
                        help="run on the CPU backend with this many devices per process")
    parser.add_argument("--slices", type=int, default=1,
                        help="rehearse a multislice job: the processes form this many slices")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds the others get to stop on their own after one fails")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("no command given: local_pod -n N -- command ...")
    if args.num_processes < 1:
        parser.error(f"-n must be >= 1, got {args.num_processes}")
    if args.slices < 1 or args.num_processes % args.slices:
        parser.error(f"--slices {args.slices} must be >= 1 and divide the {args.num_processes} "
                     "processes into equal slices")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    pod = Pod(args.command, args.num_processes, args.devices_per_process, args.port,
              slices=args.slices)

    def forward(signum, frame):
        del frame
        pod.say(f"{signal.Signals(signum).name}: passing it on to every process")
        pod.signal_all(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return pod.wait(args.grace)


if __name__ == "__main__":
    sys.exit(main())
