"""Grain input pipeline over latent ArrayRecord shards, and global batches laid out on a mesh.

Grain shuffles and batches record *indices* into global batches: global batch s holds
elements s*B .. (s+1)*B-1 of the seeded permutations, and one transform seeded by (seed, s)
picks every position's image or flip view (or posterior noise). Each JAX process reads only
its contiguous part of each global batch, so a step sees the same images in the same
positions with the same views whatever the number of processes, and the iterator state (the
global batch count) is the same on every process. The iterator state saves and
restores with Orbax through ``grain.checkpoint``::

    mngr.save(step, args=ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(it)))
    mngr.restore(step, args=ocp.args.Composite(..., data=grain.checkpoint.CheckpointRestore(it)))
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dico_jax.data import records


class ReadLatentBatch(grain.transforms.RandomMap):
    """Reads a batch of record indices into {"latent": float32 (B, H, W, C), "label": int32 (B,)}.

    Each record contributes its image or flip view (at random unless ``random_flip`` is off);
    from stored moments a fresh posterior sample is drawn and scaled, vectorized over the batch;
    latents with per-channel statistics in the manifest come out as (latent - mean) / std.
    """

    def __init__(self, data_dir: str, manifest: records.Manifest, random_flip: bool = True,
                 part: tuple[int, int] | None = None):
        self.data_dir = data_dir
        # Positions [start, stop) of the global batch that this process reads; the random
        # draws are made for the whole global batch so that each position's draw does not
        # depend on how the batch is split.
        self.part = part
        self.manifest = manifest
        self.random_flip = random_flip
        self.source = grain.sources.ArrayRecordDataSource(
            [f"{p}[0:{s.count}]" for p, s in zip(records.shard_paths(data_dir, manifest), manifest.shards)]
        )
        # Everything before the label must equal this header prefix.
        self._prefix = records.record_header(manifest)[: records.HEADER_SIZE - 4]
        self._dtype = records.storage_dtype(manifest.dtype)
        self._part_size = int(np.prod(manifest.latent_shape))
        self._offsets = np.cumsum([0] + [s.count for s in manifest.shards])
        self._stats = None
        if manifest.latent_mean is not None:
            self._stats = (np.asarray(manifest.latent_mean, np.float32),
                           np.asarray(manifest.latent_std, np.float32))

    def _where(self, index: int) -> str:
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        name = os.path.join(self.data_dir, self.manifest.shards[shard].name)
        return f"shard {name} record {index - self._offsets[shard]}"

    def random_map(self, indices: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        m = self.manifest
        global_size = len(indices)
        views = rng.integers(m.views, size=global_size) if self.random_flip else np.zeros(global_size, int)
        lo, hi = self.part or (0, global_size)
        indices, views = indices[lo:hi], views[lo:hi]
        size = len(indices)
        parts = records.STORAGE_PARTS[m.storage]
        out = np.empty((parts, size, *m.latent_shape), np.float32)
        labels = np.empty(size, np.int32)
        item, part, nbytes, label_at = self._dtype.itemsize, self._part_size, m.record_nbytes, records.HEADER_SIZE - 4
        # Reading in file order costs far less CPU time than shuffled order.
        for i in np.argsort(indices):
            try:
                record = self.source[int(indices[i])]
            except Exception as err:  # noqa: BLE001 - the reader names neither file nor record
                raise records.damaged(self._where(int(indices[i])), err) from err
            if len(record) != nbytes or record[:label_at] != self._prefix:
                records.check_record(record, m, self._where(int(indices[i])))
            labels[i] = int.from_bytes(record[label_at : records.HEADER_SIZE], "little", signed=True)
            offset = records.HEADER_SIZE + int(views[i]) * parts * part * item
            for p in range(parts):
                out[p, i] = np.frombuffer(record, self._dtype, part, offset + p * part * item).reshape(m.latent_shape)
        bad = np.flatnonzero((labels < 0) | (labels >= m.num_classes))
        if bad.size:
            where = self._where(int(indices[bad[0]]))
            raise records.DataFormatError(f"{where}: label {labels[bad[0]]} is outside [0, {m.num_classes}) (manifest field 'num_classes')")
        if m.storage == "moments":
            mean, std = out[0], out[1]
            np.multiply(std, 0.5, out=std)
            np.exp(std, out=std)
            latent = rng.standard_normal((global_size, *mean.shape[1:]), dtype=np.float32)[lo:hi]
            latent *= std
            latent += mean
            latent *= np.float32(m.scale_factor)
        else:
            latent = out[0]
        if self._stats is not None:
            latent -= self._stats[0]
            latent /= self._stats[1]
        return {"latent": latent, "label": labels}


def create_train_dataset(
    data_dir: str,
    *,
    global_batch_size: int,
    seed: int,
    random_flip: bool = True,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 2,
    prefetch_batches: int = 4,
    num_epochs: int | None = None,
    shuffle: bool = True,
    process: tuple[int, int] | None = None,
) -> grain.IterDataset:
    """Per-process batches {"latent": (B, H, W, C) float32, "label": (B,) int32} of a dataset.

    Every epoch is a fresh permutation drawn from ``seed``; global batch s holds its next
    ``global_batch_size`` elements, and process p of P reads positions
    [p B / P, (p + 1) B / P) of it. ``num_epochs=None`` repeats forever (batches then run across epoch
    boundaries). ``read_threads`` batches are read in parallel, ``prefetch_batches`` ahead;
    ``worker_count > 0`` moves the work to that many processes. The dataset is checked against
    its manifest first. ``process`` is (index, count), by default this JAX process's.
    """
    manifest = records.validate_dataset(data_dir)
    index, count = process or (jax.process_index(), jax.process_count())
    if global_batch_size % count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by the {count} JAX processes")
    local_batch = global_batch_size // count
    if global_batch_size > manifest.count:
        raise ValueError(
            f"global batch {global_batch_size} exceeds the {manifest.count} records of {data_dir}")
    indices = grain.MapDataset.range(manifest.count).seed(seed)
    if shuffle:
        indices = indices.shuffle()  # reshuffled every epoch of the repeat below
    part = (index * local_batch, (index + 1) * local_batch)
    batches = (
        indices.repeat(num_epochs)
        .batch(global_batch_size, drop_remainder=True)
        .random_map(ReadLatentBatch(data_dir, manifest, random_flip, part))
    )
    dataset = batches.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches))
    if worker_count > 0:
        dataset = dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=worker_buffer_size)
        )
    return dataset


def create_train_iterator(data_dir: str, **kwargs) -> grain.DatasetIterator:
    """``iter(create_train_dataset(data_dir, **kwargs))``. Checkpointable: ``get_state()`` /
    ``set_state(state)``, or inside Orbax ``grain.checkpoint.CheckpointSave(it)`` /
    ``grain.checkpoint.CheckpointRestore(it)``."""
    return iter(create_train_dataset(data_dir, **kwargs))


def make_global_batch(
    local_batch: dict[str, np.ndarray],
    mesh: jax.sharding.Mesh,
    batch_axes: str | Sequence[str] | None = None,
) -> dict[str, jax.Array]:
    """Assembles each process's batch into global arrays split along dim 0 over ``batch_axes``
    (default: those of the trainer's batch axes the mesh has)."""
    if batch_axes is None:
        from dico_jax.sharding import BATCH_AXES

        batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    missing = [a for a in axes if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"batch axes {missing} are not axes of the mesh {mesh.axis_names}")
    sharding = NamedSharding(mesh, PartitionSpec(axes))
    shards_per_process = int(np.prod([mesh.shape[a] for a in axes])) // jax.process_count()

    def to_global(name: str, x: np.ndarray) -> jax.Array:
        if shards_per_process and x.shape[0] % shards_per_process:
            raise ValueError(
                f"local batch field {name!r} has {x.shape[0]} rows, not divisible by the "
                f"{shards_per_process} batch shards per process of mesh axes {axes}"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return {name: to_global(name, np.asarray(x)) for name, x in local_batch.items()}
