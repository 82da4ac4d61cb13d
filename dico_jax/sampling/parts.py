"""Resumable sampling on disk: each finished batch is a part file under `OUT.parts/`, next to
the settings that made it; the processes of a multi-host run agree on what is done, and
process 0 alone reads and writes the disk."""
from __future__ import annotations

import json
import os

import jax
import numpy as np

_PART = "batch_{:05d}.npz"
_RECORD = "settings.json"


def parts_dir(out: str) -> str:
    return f"{os.path.abspath(out)}.parts"


def part_path(directory: str, b: int) -> str:
    return os.path.join(directory, _PART.format(b))


def atomic_savez(path: str, **arrays) -> None:
    tmp = f"{path}.tmp.npz"  # np.savez appends .npz to other names
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def check_or_write_record(directory: str, record: dict) -> None:
    """Writes `record` into a new parts folder, or checks it against the one found there."""
    path = os.path.join(directory, _RECORD)
    if os.path.isfile(path):
        with open(path) as f:
            previous = json.load(f)
        if previous != record:
            diff = {k: (previous.get(k), record.get(k)) for k in set(previous) | set(record)
                    if previous.get(k) != record.get(k)}
            raise ValueError(
                f"{directory} holds batches made with other settings ({diff}, as (then, now)); "
                "rerun with the same settings, or delete that folder to start over")
        return
    os.makedirs(directory, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def finished_batches(directory: str, num_batches: int) -> list[int]:
    return [b for b in range(num_batches) if os.path.isfile(part_path(directory, b))]


def write_part(directory: str, b: int, images: np.ndarray, labels: np.ndarray) -> None:
    atomic_savez(part_path(directory, b), arr_0=images, label=labels)


def read_part(directory: str, b: int, labels: np.ndarray, image_shape: tuple) -> np.ndarray:
    path = part_path(directory, b)
    with np.load(path) as part:
        images, saved_labels = part["arr_0"], part["label"]
    if images.shape != (len(labels), *image_shape) or images.dtype != np.uint8:
        raise ValueError(f"{path} holds {images.dtype} {images.shape}, expected uint8 "
                         f"{(len(labels), *image_shape)}; delete it to recompute that batch")
    if not np.array_equal(saved_labels, labels):
        raise ValueError(f"{path} was sampled for other labels; delete {directory} to start over")
    return images


def remove_parts(directory: str, num_batches: int) -> None:
    for b in range(num_batches):
        os.remove(part_path(directory, b))
    os.remove(os.path.join(directory, _RECORD))
    os.rmdir(directory)


def agree(done: list[int], num_batches: int) -> list[int]:
    """Every process takes the chief's list of finished batches (it alone reads the disk)."""
    if jax.process_count() == 1:
        return done
    from jax.experimental import multihost_utils

    mask = np.zeros((num_batches,), np.int32)
    mask[done] = 1
    mask = np.asarray(multihost_utils.broadcast_one_to_all(mask))
    return [int(b) for b in np.flatnonzero(mask)]


def to_host(images: jax.Array) -> np.ndarray:
    """A global array whole on every process."""
    if jax.process_count() == 1:
        return np.asarray(images)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(images, tiled=True))


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
