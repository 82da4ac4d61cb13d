"""Host memory of a digits run whose workdir is on Cloud Storage: does it grow?

    python bench/gcs_host_memory.py [--steps 2000] [--out /tmp/gcs_memory.csv] [--config.X=Y ...]

Starts the test Cloud Storage (tests/gcs_emulator.py: fake-gcs-server, every storage layer
pointed at it), trains `configs/digits.py` with `--workdir=gs://bench/run` in a subprocess (the
dataset, checkpoints, TensorBoard events and losses all on the bucket), reads the trainer's
resident memory (VmRSS) every second and prints it against the training step, then the growth
after warm-up (from the first checkpoint on). Extra `--config.*` flags go to the trainer.
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
    args, extra = parser.parse_known_args()

    folder = tempfile.mkdtemp(prefix="gcs_bench_")
    storage = GcsEmulator(folder).start()
    try:
        storage.create_bucket("bench")
        flags = {"num_train_steps": args.steps, "log_every_steps": 50,
                 "checkpoint_every_steps": args.checkpoint_every, "keep_checkpoints": 2,
                 "keep_every_steps": 0, "eval.every_steps": 0, "sample_at_end": False}
        cmd = ([sys.executable, "-m", "dico_jax.main", f"--config={ROOT}/configs/digits.py",
                "--workdir=gs://bench/run"] + [f"--config.{k}={v}" for k, v in flags.items()]
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
    print(f"digits, {args.steps} steps, workdir gs://bench/run on the emulator; "
          f"{len(samples)} samples of VmRSS, {samples[-1][0]:.0f} s")
    print(f"{'step':>6} {'seconds':>8} {'RSS MiB':>8}")
    shown = set()
    for target in range(0, args.steps + 1, max(args.steps // 10, 1)):
        t, s, r = min(samples, key=lambda x: (abs(x[1] - target), x[0]))
        if (t, s) not in shown:
            shown.add((t, s))
            print(f"{s:>6} {t:>8.0f} {r:>8.1f}")
    warm = [x for x in samples if x[1] >= args.checkpoint_every]
    if len(warm) >= 2:
        first, peak_after = warm[0], max(x[2] for x in warm)
        end = warm[-1]
        steps = max(end[1] - first[1], 1)
        print(f"after warm-up (step {first[1]} on): {first[2]:.1f} MiB -> {end[2]:.1f} MiB at "
              f"step {end[1]} (peak {peak_after:.1f}); growth "
              f"{(end[2] - first[2]) / steps * 1000:+.1f} MiB per 1000 steps")


if __name__ == "__main__":
    main()
