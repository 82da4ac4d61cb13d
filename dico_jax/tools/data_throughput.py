"""Input-pipeline throughput: latents/s out of the Grain loader over ArrayRecord shards.

Writes a temporary synthetic dataset (32x32x4 float32 latents, image + flip views, like
ImageNet 256 after the VAE), then times batches for several worker counts. Prints a table.

    python -m dico_jax.tools.data_throughput [--records 20000] [--batch 256] [--workers 0 2]
"""
from __future__ import annotations

import multiprocessing
import os
import tempfile
import time

import numpy as np
from absl import flags

from dico_jax import command



def build_synthetic(out_dir: str, count: int, shape: tuple[int, int, int], storage: str, shard_size: int) -> None:
    from dico_jax.data import records

    rng = np.random.default_rng(0)
    parts = records.STORAGE_PARTS[storage]
    views = rng.standard_normal((count, 2, parts, *shape), dtype=np.float32)
    labels = rng.integers(0, 1000, count)
    records.write_dataset(
        out_dir, views, labels, num_classes=1000, storage=storage, scale_factor=0.18215,
        vae="synthetic", image_size=256, shard_size=shard_size, source="bench",
    )


def cpu_seconds() -> float:
    """CPU time of this process and its live worker processes (Linux /proc)."""
    total = time.process_time()
    ticks = os.sysconf("SC_CLK_TCK")
    for child in multiprocessing.active_children():
        try:
            with open(f"/proc/{child.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        except OSError:
            pass
    return total


def time_loader(data_dir: str, batch: int, workers: int, warmup: int, batches: int) -> tuple[float, float, float]:
    """(latents/s wall clock, latents per CPU-second, seconds to first batches)."""
    from dico_jax.data import pipeline

    start = time.perf_counter()
    it = pipeline.create_train_iterator(data_dir, global_batch_size=batch, seed=0, worker_count=workers)
    for _ in range(warmup):
        next(it)
    first = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
        out = next(it)
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    assert out["latent"].shape[0] == batch
    return batches * batch / elapsed, batches * batch / cpu, first


def main() -> None:
    parser = command.ArgumentParser("dico_jax.tools.data_throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--storage", nargs="+", default=["sample", "moments"])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--shard_size", type=int, default=1024)
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags.

    print(f"cpu cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.1f}")
    print("latents/CPU-s: throughput per core-second used (loader + workers); it predicts the rate of an")
    print("uncontended machine when the wall rate is held down by other processes.")
    print(f"{'storage':>8} {'workers':>7} {'batch':>5} {'latents/s':>10} {'latents/CPU-s':>13} {'load':>5} {'startup s':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for storage in args.storage:
            data_dir = os.path.join(tmp, storage)
            build_synthetic(data_dir, args.records, (32, 32, 4), storage, args.shard_size)
            for workers in args.workers:
                rate, cpu_rate, first = time_loader(data_dir, args.batch, workers, args.warmup, args.batches)
                print(f"{storage:>8} {workers:>7} {args.batch:>5} {rate:>10,.0f} {cpu_rate:>13,.0f} "
                      f"{os.getloadavg()[0]:>5.1f} {first:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
