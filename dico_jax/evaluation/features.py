"""Feature extraction over image files: streaming reads of .npz arrays, batches sharded over devices.

A 50,000-image ADM sample file at 256x256 is ~10 GB, so arrays are read from the zip member
batch by batch instead of loaded whole.
"""
from __future__ import annotations

import contextlib
import logging
import math
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXIS = "batch"


class NpzArrayReader:
    """One array of an .npz file, read in row batches; ``shape`` and ``dtype`` come from its header."""

    def __init__(self, path: str, key: str):
        self.path, self.key = path, key
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file") from None
        except zipfile.BadZipFile:
            raise ValueError(f"{path} is not an .npz file (not a zip archive)") from None
        self.keys = sorted(n[: -len(".npy")] for n in names if n.endswith(".npy"))
        if key not in self.keys:
            raise ValueError(f"{path} has no array '{key}' (arrays found: {self.keys})")
        with self._member() as (_, shape, dtype, streamable):
            self.shape, self.dtype, self._streamable = shape, dtype, streamable

    @contextlib.contextmanager
    def _member(self):
        with zipfile.ZipFile(self.path) as archive, archive.open(self.key + ".npy") as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
            else:  # a header format numpy offers no public reader for: load the array whole
                array = np.load(self.path)[self.key]
                shape, fortran, dtype = array.shape, True, array.dtype
            streamable = not fortran and not dtype.hasobject
            yield member, tuple(shape), np.dtype(dtype), streamable

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if not self._streamable:
            whole = np.load(self.path)[self.key]
            for start in range(0, len(whole), batch_size):
                yield whole[start : start + batch_size]
            return
        row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])
        with self._member() as (member, _, _, _):
            for start in range(0, len(self), batch_size):
                rows = min(batch_size, len(self) - start)
                data = member.read(rows * row_bytes)
                if len(data) != rows * row_bytes:
                    raise ValueError(
                        f"{self.path}: array '{self.key}' ends early at row {start} "
                        f"(header says {self.shape[0]} rows)"
                    )
                yield np.frombuffer(data, self.dtype).reshape((rows, *self.shape[1:]))

    def read(self) -> np.ndarray:
        return np.load(self.path)[self.key]


def npz_images(path: str, key: str = "arr_0", channels: int | None = 3) -> NpzArrayReader:
    """Reader of an (N, H, W, C) uint8 image array, with errors naming what is wrong."""
    reader = NpzArrayReader(path, key)
    if len(reader.shape) != 4 or (channels is not None and reader.shape[-1] != channels):
        want = f"(N, H, W, {channels})" if channels else "(N, H, W, C)"
        raise ValueError(f"{path}: '{key}' must be {want} images, found shape {reader.shape}")
    if reader.dtype != np.uint8:
        raise ValueError(f"{path}: '{key}' must be uint8 pixels in [0, 255], found dtype {reader.dtype}")
    if len(reader) == 0:
        raise ValueError(f"{path}: '{key}' holds no images")
    return reader


def device_mesh(devices=None) -> Mesh:
    """A 1-D mesh over this process's devices; feature batches are split along it."""
    devices = jax.local_devices() if devices is None else devices
    return Mesh(np.asarray(devices), (BATCH_AXIS,))


def extract_features(
    apply_fn: Callable[[Any, jax.Array], dict[str, jax.Array]],
    variables: Any,
    batches: Iterator[np.ndarray],
    batch_size: int,
    mesh: Mesh,
    total: int | None = None,
) -> dict[str, np.ndarray]:
    """Runs ``apply_fn(variables, images)`` over batches, each split across the mesh.

    Every batch is zero-padded to ``batch_size`` rounded up to a multiple of the device count,
    so one compiled program serves all batches; padding rows are dropped from the outputs.
    """
    padded_size = -(-batch_size // mesh.size) * mesh.size
    data_sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    replicated = NamedSharding(mesh, PartitionSpec())
    variables = jax.device_put(variables, replicated)
    run = jax.jit(apply_fn, in_shardings=(replicated, data_sharding), out_shardings=replicated)
    outputs: dict[str, list[np.ndarray]] = {}
    done = 0

    def collect(result, rows):
        nonlocal done
        for name, value in result.items():
            outputs.setdefault(name, []).append(np.asarray(value)[:rows])
        done += rows
        logging.info("features: %d/%s images", done, total if total is not None else "?")

    pending = None
    for batch in batches:
        rows = batch.shape[0]
        if rows > padded_size:
            raise ValueError(f"batch of {rows} rows exceeds batch_size {batch_size}")
        if rows < padded_size:
            batch = np.concatenate([batch, np.zeros((padded_size - rows, *batch.shape[1:]), batch.dtype)])
        # Dispatch is asynchronous: fetch the previous batch's features while this one runs.
        current = (run(variables, jax.device_put(batch, data_sharding)), rows)
        if pending is not None:
            collect(*pending)
        pending = current
    if pending is None:
        raise ValueError("no images to extract features from")
    collect(*pending)
    return {name: np.concatenate(parts) for name, parts in outputs.items()}
