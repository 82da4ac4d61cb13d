"""Host memory of a digits run whose workdir is on Cloud Storage: does it grow?

    python bench/gcs_host_memory.py [--steps 2000] [--out /tmp/gcs_memory.csv] [--local] [--config.X=Y ...]

Starts the test Cloud Storage (tests/gcs_emulator.py: fake-gcs-server, every storage layer
pointed at it), trains `configs/digits.py` with `--workdir=gs://bench/run` in a subprocess (the
dataset, checkpoints, TensorBoard events and losses all on the bucket), reads the trainer's
resident memory (VmRSS) every second and prints it against the training step, then the growth
after warm-up (from the first checkpoint on). `--local` puts the workdir on local disk for
comparison. Extra `--config.*` flags go to the trainer; `--from_csv` reprints a saved series.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.gcs_emulator import GcsEmulator  # noqa: E402

_STEP = re.compile(r"\((\d+)/(\d+)\)")


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def last_step(log_path: str) -> int:
    with open(log_path, "rb") as f:
        f.seek(max(0, os.path.getsize(log_path) - 20000))
        found = _STEP.findall(f.read().decode(errors="replace"))
    return int(found[-1][0]) if found else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--checkpoint_every", type=int, default=250)
    parser.add_argument("--out", default=None, help="CSV of (seconds, step, rss_mib)")
    parser.add_argument("--local", action="store_true",
                        help="the workdir on local disk instead (the comparison)")
    parser.add_argument("--from_csv", default=None, help="only print the table of a saved CSV")
    args, extra = parser.parse_known_args()
    if args.from_csv:
        with open(args.from_csv) as f:
            rows = [line.split(",") for line in f.read().splitlines()[1:]]
        report([(float(t), int(s), float(r)) for t, s, r in rows], args.steps,
               args.checkpoint_every)
        return

    folder = tempfile.mkdtemp(prefix="gcs_bench_")
    storage = GcsEmulator(folder).start()
    try:
        storage.create_bucket("bench")
        flags = {"num_train_steps": args.steps, "log_every_steps": 50,
                 "checkpoint_every_steps": args.checkpoint_every, "keep_checkpoints": 2,
                 "keep_every_steps": 0, "eval.every_steps": 0, "sample_at_end": False}
        workdir = os.path.join(folder, "run") if args.local else "gs://bench/run"
        cmd = ([sys.executable, "-m", "dico_jax.main", f"--config={ROOT}/configs/digits.py",
                f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in flags.items()]
               + extra)
        log_path = os.path.join(folder, "train.log")
        samples = []
        start = time.time()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **storage.env},
                                    stdout=log, stderr=log)
            while proc.poll() is None:
                rss = rss_mib(proc.pid)
                if rss is not None:
                    samples.append((time.time() - start, last_step(log_path), rss))
                time.sleep(1.0)
        if proc.returncode != 0:
            tail = open(log_path, "rb").read()[-3000:].decode(errors="replace")
            sys.exit(f"gcs_host_memory: error: the run exited with {proc.returncode}:\n{tail}")
    finally:
        storage.wipe()

    if args.out:
        with open(args.out, "w") as f:
            f.write("seconds,step,rss_mib\n")
            f.writelines(f"{t:.1f},{s},{r:.1f}\n" for t, s, r in samples)
    report(samples, args.steps, args.checkpoint_every, "local disk" if args.local else "the emulator")


def report(samples, steps: int, window: int, where: str = "the emulator") -> None:
    """Per window of `window` steps (the checkpoint interval): the lowest resident size (the
    baseline between saves) and the highest (a save's transient)."""
    print(f"digits, {steps} steps, workdir on {where}; {len(samples)} samples of VmRSS "
          f"over {samples[-1][0]:.0f} s")
    print(f"{'steps':>11} {'min MiB':>8} {'max MiB':>8}")
    lows = []
    for lo in range(0, steps, window):
        inside = [r for _, s, r in samples if lo <= s < lo + window or (s == steps == lo + window)]
        if inside:
            print(f"{lo:>5}-{lo + window:<5} {min(inside):>8.1f} {max(inside):>8.1f}")
            if lo >= window:  # after warm-up: the first window compiles and builds the data
                lows.append((lo, min(inside)))
    if len(lows) >= 2:
        (first, a), (last, b) = lows[0], lows[-1]
        print(f"baseline after warm-up: {a:.1f} MiB (steps {first}+) -> {b:.1f} MiB (steps "
              f"{last}+): {(b - a) / max(last - first, 1) * 1000:+.1f} MiB per 1000 steps")


if __name__ == "__main__":
    main()
