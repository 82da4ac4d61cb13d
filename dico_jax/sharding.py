"""Device mesh and sharding rules: large parameters split along `fsdp`, the batch along all axes.

The same rules serve one CPU (every axis of size 1), fake CPU devices in tests and a TPU pod.
"""
from __future__ import annotations

import glob
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def tpu_chips_present() -> bool:
    """Whether this host is a Cloud TPU VM: its chips show as /dev/accel* (or /dev/vfio/<n>
    on newer generations)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def resolve_axis_sizes(axis_sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Replaces a -1 axis size by the devices left over; checks the product is `num_devices`."""
    sizes = {name: int(axis_sizes[name]) for name in axis_sizes}
    unknown = [name for name in sizes if name not in MESH_AXES]
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown} in config.mesh; valid: {MESH_AXES}")
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
    """A ("data", "fsdp") mesh over `devices` (default: all) with the sizes of `axis_sizes`."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes(axis_sizes, len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    # Auto axes: shardings are given at jit boundaries and XLA propagates them inside.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


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
    (data, fsdp) mesh (the train step sets it); elsewhere returns x as is.

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
