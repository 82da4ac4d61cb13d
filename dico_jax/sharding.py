"""Device mesh and sharding rules: large parameters split along `fsdp`, the batch along all axes.

The mesh is (slice, data, fsdp). `slice` spans the slices of a multislice job, joined by the
data-center network (DCN): pure data parallelism, one gradient all-reduce per step crosses
it. `data` and `fsdp` lie inside each slice, on its fast interconnect (ICI). The same rules
serve one CPU (every axis of size 1), fake CPU devices in tests and TPU pods of one or more
slices.
"""
from __future__ import annotations

import glob
import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("slice", "data", "fsdp")
BATCH_AXES = ("slice", "data", "fsdp")
# CPU rehearsal of a multislice job (`tools.local_pod --slices S`): the processes form S
# slices of equal size, in process order. On TPU each device names its own slice.
NUM_SLICES_ENV = "DICO_JAX_NUM_SLICES"


def tpu_chips_present() -> bool:
    """Whether this host is a Cloud TPU VM: its chips show as /dev/accel* (or /dev/vfio/<n>
    on newer generations)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def device_slices(devices: Sequence[jax.Device]) -> list[int]:
    """The slice of each device: its `slice_index` on a multislice TPU job; else, with
    DICO_JAX_NUM_SLICES=S, S equal blocks of consecutive processes; else 0."""
    if any(getattr(d, "slice_index", None) is not None for d in devices):
        return [int(getattr(d, "slice_index", 0) or 0) for d in devices]
    num_slices = num_slices_from_env()
    processes = sorted({d.process_index for d in devices})
    if num_slices <= 1 or len(processes) == 1:
        return [0] * len(devices)
    if len(processes) % num_slices:
        raise ValueError(f"{NUM_SLICES_ENV}={num_slices} does not divide the "
                         f"{len(processes)} processes into equal slices")
    per_slice = len(processes) // num_slices
    rank = {p: i for i, p in enumerate(processes)}
    return [rank[d.process_index] // per_slice for d in devices]


def num_slices_from_env() -> int:
    value = os.environ.get(NUM_SLICES_ENV, "").strip()
    try:
        count = int(value) if value else 1
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"{NUM_SLICES_ENV}={value!r}: give the number of slices, >= 1")
    return count


def num_slices(devices: Sequence[jax.Device] | None = None) -> int:
    """How many slices `devices` (default: all) form."""
    return len(set(device_slices(list(jax.devices() if devices is None else devices))))


def resolve_axis_sizes(axis_sizes: Mapping[str, int], num_devices: int,
                       slices: int = 1) -> dict[str, int]:
    """Replaces a -1 axis size by the devices left over; checks the product is `num_devices`.

    `slice` 0 (or left out) means one per slice of the job (`slices`); on a job of several
    slices it must equal their number. On one slice it may still split the devices into
    groups that behave as slices (data parallel between them), e.g. to rehearse a multislice
    mesh with one process.
    """
    sizes = {name: int(axis_sizes[name]) for name in axis_sizes}
    unknown = [name for name in sizes if name not in MESH_AXES]
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown} in config.mesh; valid: {MESH_AXES}")
    if sizes.get("slice", 0) == 0:
        sizes["slice"] = slices
    if slices > 1 and sizes["slice"] != slices:
        raise ValueError(f"config.mesh.slice={sizes['slice']}, but the devices form {slices} "
                         f"slices: set --config.mesh.slice={slices} (or 0: one per slice)")
    if sizes["slice"] == -1:
        raise ValueError("config.mesh.slice cannot be -1: give the number of slices, or 0 "
                         "for one per slice of the job")
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"config.mesh: only one axis may be -1, got {sizes}")
    bad = [name for name, size in sizes.items() if size == 0 or size < -1]
    if bad:
        raise ValueError(f"config.mesh: axis sizes must be positive or -1, got {sizes}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if rest:
        if num_devices % known:
            raise ValueError(
                f"config.mesh {sizes}: {num_devices} devices are not divisible by {known}")
        sizes[rest[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"config.mesh {dict(axis_sizes)} needs {math.prod(sizes.values())} devices, "
            f"found {num_devices}")
    return {name: sizes.get(name, 1) for name in MESH_AXES}


def create_mesh(axis_sizes: Mapping[str, int],
                devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (slice, data, fsdp) mesh over `devices` (default: all) with the sizes of
    `axis_sizes`."""
    devices = list(jax.devices() if devices is None else devices)
    slice_of = device_slices(devices)
    slices = len(set(slice_of))
    sizes = resolve_axis_sizes(axis_sizes, len(devices), slices)
    shape = tuple(sizes[name] for name in MESH_AXES)
    # Auto axes: shardings are given at jit boundaries and XLA propagates them inside.
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if sizes["slice"] == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    if slices > 1 and devices[0].platform == "tpu":
        # Each slice's devices laid out on its ICI torus, slices joined along `slice` (DCN).
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_hybrid_device_mesh(
            (1, *shape[1:]), (shape[0], 1, 1), devices, allow_split_physical_axes=True)
    else:
        # CPU (or one slice split into groups): slices of consecutive processes, each
        # process's devices together, so every process holds one block of the batch.
        order = sorted(range(len(devices)), key=lambda i: (
            slice_of[i], devices[i].process_index, devices[i].id))
        grid = np.asarray([devices[i] for i in order], dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def slice_processes(mesh: Mesh) -> list[list[int]]:
    """The processes whose devices make up each index of the mesh's `slice` axis."""
    axis = mesh.axis_names.index("slice")
    grid = np.moveaxis(mesh.devices, axis, 0)
    return [sorted({d.process_index for d in grid[i].flat}) for i in range(grid.shape[0])]


def param_partition_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> P:
    """Splits an array of >= `min_size` elements along its largest dim divisible by `fsdp_size`.

    Ties go to the later dim (the output features of a kernel, not a stacked-depth axis).
    Small or indivisible arrays are replicated.
    """
    if fsdp_size <= 1 or not shape or math.prod(shape) < min_size:
        return P()
    candidates = [(size, dim) for dim, size in enumerate(shape) if size % fsdp_size == 0]
    if not candidates:
        return P()
    _, dim = max(candidates)
    spec = [None] * len(shape)
    spec[dim] = "fsdp"
    return P(*spec)


def param_shardings(tree: Any, mesh: Mesh, min_size: int) -> Any:
    """NamedShardings by `param_partition_spec` for every array (or ShapeDtypeStruct) of `tree`."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, param_partition_spec(np.shape(x), fsdp_size, min_size)),
        tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim split over every mesh axis."""
    return NamedSharding(mesh, P(BATCH_AXES))


def constrain_batch(x: jax.Array, batch_dim: int = 0) -> jax.Array:
    """Keeps an activation split along its batch dim over the batch axes, when traced under a
    (slice, data, fsdp) mesh (the train step sets it); elsewhere returns x as is.

    Without it XLA may follow the FSDP-split kernels instead and split activations along
    their channels, gathering whole-batch activations between layers (tensor parallelism by
    accident, about ten times the collective traffic of gathering the weights: see
    docs/planning.md).
    """
    if batch_split_mesh() is None:
        return x
    return jax.lax.with_sharding_constraint(x, P(*([None] * batch_dim), BATCH_AXES))


def batch_split_mesh():
    """The (abstract) mesh being traced under, if it splits the batch over more than one
    device; else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return None
    if math.prod(mesh.shape[a] for a in BATCH_AXES) == 1:
        return None
    return mesh


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings`: the restore target for Orbax."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)
