"""Resumable sampling on disk: each finished batch is a part file under `OUT.parts/`, next to
the settings that made it; the processes of a multi-host run agree on what is done, and
process 0 alone reads and writes the disk. OUT may be on Cloud Storage (gs://): files go
through etils epath."""
from __future__ import annotations

import json
import os

import io

import jax
import numpy as np
from etils import epath

from dico_jax import storage
from dico_jax.checkpoint import resolve_workdir

_PART = "batch_{:05d}.npz"
_RECORD = "settings.json"


def parts_dir(out: str) -> str:
    return f"{resolve_workdir(out)}.parts"


def part_path(directory: str, b: int) -> str:
    return os.path.join(directory, _PART.format(b))


def atomic_savez(path: str, **arrays) -> None:
    storage.atomic_write(path, lambda f: np.savez(f, **arrays))


def check_or_write_record(directory: str, record: dict) -> None:
    """Writes `record` into a new parts folder, or checks it against the one found there."""
    path = epath.Path(directory, _RECORD)
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != record:
            diff = {k: (previous.get(k), record.get(k)) for k in set(previous) | set(record)
                    if previous.get(k) != record.get(k)}
            raise ValueError(
                f"{directory} holds batches made with other settings ({diff}, as (then, now)); "
                "rerun with the same settings, or delete that folder to start over")
        return
    text = json.dumps(record, indent=2, sort_keys=True)
    storage.atomic_write(path, lambda f: f.write(text.encode()))


def finished_batches(directory: str, num_batches: int) -> list[int]:
    return [b for b in range(num_batches) if epath.Path(part_path(directory, b)).is_file()]


def write_part(directory: str, b: int, images: np.ndarray, labels: np.ndarray) -> None:
    atomic_savez(part_path(directory, b), arr_0=images, label=labels)


def read_part(directory: str, b: int, labels: np.ndarray, image_shape: tuple) -> np.ndarray:
    path = part_path(directory, b)
    with np.load(io.BytesIO(epath.Path(path).read_bytes())) as part:
        images, saved_labels = part["arr_0"], part["label"]
    if images.shape != (len(labels), *image_shape) or images.dtype != np.uint8:
        raise ValueError(f"{path} holds {images.dtype} {images.shape}, expected uint8 "
                         f"{(len(labels), *image_shape)}; delete it to recompute that batch")
    if not np.array_equal(saved_labels, labels):
        raise ValueError(f"{path} was sampled for other labels; delete {directory} to start over")
    return images


def remove_parts(directory: str, num_batches: int) -> None:
    for b in range(num_batches):
        epath.Path(part_path(directory, b)).unlink()
    epath.Path(directory, _RECORD).unlink()
    if not storage.is_remote(directory):  # a bucket has no folders to remove
        epath.Path(directory).rmdir()


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
