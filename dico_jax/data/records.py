"""Latent datasets on disk: ArrayRecord shards of fixed-layout records plus a JSON manifest.

A record is a 24-byte header followed by the raw array bytes:

    magic b"DCLT" | dtype code (4 bytes) | shape (5 x uint16) | 2 pad bytes | label (int32)

The array has shape ``(views, parts, H, W, C)``: ``views`` are the image and its horizontal
flip; ``parts`` is 1 for ``storage="sample"`` (a posterior sample already multiplied by
``scale_factor``) and 2 for ``storage="moments"`` (unscaled posterior mean and log-variance,
from which the input pipeline draws a fresh sample). All integers are little-endian.

The manifest (``manifest.json``) lists the shards with their record counts and byte sizes, so
a missing or truncated shard is found before training starts.

A dataset may live on Cloud Storage (``gs://``): files go through etils epath, and ArrayRecord's
reader opens gs:// shards itself. Its writer cannot, so a gs:// shard is written into an
anonymous in-memory file and uploaded whole (a Cloud Storage object appears only once complete).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import ml_dtypes
from etils import epath
import numpy as np
from array_record.python import array_record_module

from dico_jax import command, errors
from dico_jax.storage import is_remote
from dico_jax.errors import UserError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".array_record"
# Grain reads records one at a time: group size 1 makes each a single random access, and
# latents barely compress (a few percent) while decompression would cost reader CPU.
WRITER_OPTIONS = "group_size:1,uncompressed"

_HEADER = struct.Struct("<4s4s5Hxxi")
HEADER_SIZE = _HEADER.size
_MAGIC = b"DCLT"
_LABEL_OFFSET = HEADER_SIZE - 4

STORAGE_PARTS = {"sample": 1, "moments": 2}
_DTYPES = {
    "float32": (b"f32\0", np.dtype(np.float32)),
    "float16": (b"f16\0", np.dtype(np.float16)),
    "bfloat16": (b"bf16", np.dtype(ml_dtypes.bfloat16)),
}
_DTYPE_BY_CODE = {code: name for name, (code, _) in _DTYPES.items()}


class DataFormatError(UserError):
    """A dataset on disk disagrees with its manifest or the record format."""


def damaged(where: str, err: Exception) -> DataFormatError:
    """The error for a record the ArrayRecord reader could not read (a damaged chunk)."""
    return DataFormatError(f"{where} cannot be read: {' '.join(str(err).split())[:300]}; the "
                           "shard is damaged: restore or re-extract it")


def storage_dtype(name: str) -> np.dtype:
    """The numpy dtype of a manifest dtype name (float32, float16, bfloat16)."""
    if name not in _DTYPES:
        raise DataFormatError(f"unsupported storage dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name][1]


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    num_bytes: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a latent dataset holds; training reads ``latent_shape`` and ``num_classes`` here."""

    count: int
    latent_shape: tuple[int, int, int]  # (H, W, C) of one latent
    dtype: str  # storage dtype of the arrays
    num_classes: int
    storage: str  # "sample" or "moments"
    scale_factor: float
    image_size: int | None
    vae: str
    shards: tuple[ShardInfo, ...]
    views: int = 2
    source: str = ""
    skipped: int = 0  # unreadable source images left out
    format_version: int = FORMAT_VERSION
    # Which VAE architecture made the latents ("sd-vae", "va-vae"); older manifests lack it
    # and hold SD-VAE latents.
    vae_kind: str = ""
    # Per-channel mean and standard deviation of the stored latents over the dataset (the
    # VA-VAE's normalisation, LightningDiT datasets/img_latent_dataset.py): the input
    # pipeline returns (latent - mean) / std. None: the latents are used as stored.
    latent_mean: tuple[float, ...] | None = None
    latent_std: tuple[float, ...] | None = None

    @property
    def pixels(self) -> bool:
        """The arrays are images in [-1, 1], not VAE latents (no `vae` named)."""
        return self.vae in ("", "none")

    @property
    def kind(self) -> str:
        """The VAE kind of the latents; "" for pixels."""
        return "" if self.pixels else (self.vae_kind or "sd-vae")

    @property
    def record_shape(self) -> tuple[int, ...]:
        return (self.views, STORAGE_PARTS[self.storage], *self.latent_shape)

    @property
    def record_nbytes(self) -> int:
        return HEADER_SIZE + int(np.prod(self.record_shape)) * storage_dtype(self.dtype).itemsize

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["latent_shape"] = list(self.latent_shape)
        for name in ("latent_mean", "latent_std"):
            out[name] = None if out[name] is None else [float(v) for v in out[name]]
        out["shards"] = [dataclasses.asdict(s) for s in self.shards]
        return out


def record_header(manifest: Manifest, label: int = 0) -> bytes:
    code = _DTYPES[manifest.dtype][0]
    return _HEADER.pack(_MAGIC, code, *manifest.record_shape, label)


def encode_record(views: np.ndarray, label: int) -> bytes:
    """Serializes one example: ``views`` of shape (views, parts, H, W, C) and its class label."""
    if views.ndim != 5:
        raise ValueError(f"record array must have shape (views, parts, H, W, C), got {views.shape}")
    name = next((n for n, (_, dt) in _DTYPES.items() if dt == views.dtype), None)
    if name is None:
        raise ValueError(f"record array dtype {views.dtype} is not one of {sorted(_DTYPES)}")
    header = _HEADER.pack(_MAGIC, _DTYPES[name][0], *views.shape, int(label))
    return header + np.ascontiguousarray(views).tobytes()


def decode_header(data: bytes) -> tuple[str, tuple[int, ...], int]:
    """Returns (dtype name, array shape, label) of a serialized record."""
    if len(data) < HEADER_SIZE:
        raise DataFormatError(f"record of {len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, code, *shape, label = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise DataFormatError(f"record does not start with {_MAGIC!r} (found {magic!r}); not a dico-jax latent record")
    if code not in _DTYPE_BY_CODE:
        raise DataFormatError(f"record has unknown dtype code {code!r}")
    return _DTYPE_BY_CODE[code], tuple(shape), label


def check_record(data: bytes, manifest: Manifest, where: str) -> int:
    """Checks a record against the manifest; returns its label. ``where`` names it in errors."""
    dtype, shape, label = decode_header(data)
    if dtype != manifest.dtype:
        raise DataFormatError(f"{where}: record dtype is {dtype} but the manifest field 'dtype' says {manifest.dtype}")
    if shape != manifest.record_shape:
        raise DataFormatError(
            f"{where}: record shape (views, parts, H, W, C) is {shape} but the manifest fields "
            f"'views', 'storage', 'latent_shape' give {manifest.record_shape}"
        )
    if len(data) != manifest.record_nbytes:
        raise DataFormatError(f"{where}: record has {len(data)} bytes, expected {manifest.record_nbytes}")
    if not 0 <= label < manifest.num_classes:
        raise DataFormatError(f"{where}: label {label} is outside [0, {manifest.num_classes}) (manifest field 'num_classes')")
    return label


def decode_record(data: bytes, manifest: Manifest) -> tuple[np.ndarray, int]:
    """Returns (array of shape ``manifest.record_shape``, label) of a serialized record."""
    label = check_record(data, manifest, "record")
    views = np.frombuffer(data, dtype=storage_dtype(manifest.dtype), offset=HEADER_SIZE)
    return views.reshape(manifest.record_shape), label


def _exists(path: str) -> bool:
    return epath.Path(path).exists() if is_remote(path) else os.path.exists(path)


def _size(path: str) -> int:
    return epath.Path(path).stat().length if is_remote(path) else os.path.getsize(path)


def _write_remote_shard(path: str, records: Iterable[bytes]) -> ShardInfo:
    fd = os.memfd_create("shard")
    try:
        writer = array_record_module.ArrayRecordWriter(f"/proc/self/fd/{fd}", WRITER_OPTIONS)
        count = 0
        try:
            for record in records:
                writer.write(record)
                count += 1
        finally:
            writer.close()
        data = os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)
    epath.Path(path).write_bytes(data)
    return ShardInfo(os.path.basename(path), count, len(data))


def shard_name(prefix: str, index: int, num_shards: int) -> str:
    return f"{prefix}-{index:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


def write_shard(path: str, records: Iterable[bytes]) -> ShardInfo:
    """Writes records to ``path`` atomically: a partial file never carries the final name."""
    if is_remote(path):
        return _write_remote_shard(path, records)
    tmp = f"{path}.tmp-{os.getpid()}"
    writer = array_record_module.ArrayRecordWriter(tmp, WRITER_OPTIONS)
    count = 0
    try:
        for record in records:
            writer.write(record)
            count += 1
    except BaseException:
        writer.close()
        os.remove(tmp)
        raise
    writer.close()
    os.replace(tmp, path)
    return ShardInfo(os.path.basename(path), count, os.path.getsize(path))


def write_manifest(data_dir: str, manifest: Manifest) -> None:
    path = os.path.join(data_dir, MANIFEST_NAME)
    if is_remote(path):  # an object is replaced whole
        epath.Path(path).write_text(json.dumps(manifest.to_json(), indent=1))
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(manifest.to_json(), f, indent=1)
    os.replace(tmp, path)


def _field(raw: dict, key: str, kind: type | tuple[type, ...], path: str):
    if key not in raw:
        raise DataFormatError(f"{path}: missing field {key!r}")
    value = raw[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataFormatError(f"{path}: field {key!r} has value {value!r}, expected {kind}")
    return value


def _channel_stats(raw: dict, key: str, channels: int, path: str) -> tuple[float, ...] | None:
    value = raw.get(key)
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != channels
            or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in value)):
        raise DataFormatError(f"{path}: field {key!r} must list {channels} finite numbers (one "
                              f"per latent channel), got {value!r}")
    return tuple(float(v) for v in value)


def read_manifest(data_dir: str) -> Manifest:
    """Reads and checks ``data_dir/manifest.json`` (fields only; see ``validate_dataset``)."""
    path = os.path.join(data_dir, MANIFEST_NAME)
    if not _exists(path):
        raise errors.MissingFile(
            f"{path} does not exist; build a dataset with `python -m dico_jax.data.extract` "
            "or dico_jax.data.digits.build_digits_dataset"
        )
    try:
        raw = json.loads(epath.Path(path).read_text())
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}: not valid JSON ({e})") from e
    version = _field(raw, "format_version", int, path)
    if version != FORMAT_VERSION:
        raise DataFormatError(f"{path}: field 'format_version' is {version}, this code reads {FORMAT_VERSION}")
    shape = _field(raw, "latent_shape", list, path)
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise DataFormatError(f"{path}: field 'latent_shape' must be [H, W, C] of positive ints, got {shape}")
    storage = _field(raw, "storage", str, path)
    if storage not in STORAGE_PARTS:
        raise DataFormatError(f"{path}: field 'storage' is {storage!r}, expected one of {sorted(STORAGE_PARTS)}")
    dtype = _field(raw, "dtype", str, path)
    if dtype not in _DTYPES:
        raise DataFormatError(f"{path}: field 'dtype' is {dtype!r}, expected one of {sorted(_DTYPES)}")
    shards = []
    for i, s in enumerate(_field(raw, "shards", list, path)):
        where = f"{path} shards[{i}]"
        if not isinstance(s, dict):
            raise DataFormatError(f"{where}: expected an object, got {s!r}")
        shards.append(ShardInfo(_field(s, "name", str, where), _field(s, "count", int, where), _field(s, "num_bytes", int, where)))
    image_size = raw.get("image_size")
    manifest = Manifest(
        count=_field(raw, "count", int, path),
        latent_shape=tuple(shape),
        dtype=dtype,
        num_classes=_field(raw, "num_classes", int, path),
        storage=storage,
        scale_factor=float(_field(raw, "scale_factor", (int, float), path)),
        image_size=image_size if isinstance(image_size, int) else None,
        vae=_field(raw, "vae", str, path),
        shards=tuple(shards),
        views=_field(raw, "views", int, path),
        source=str(raw.get("source", "")),
        skipped=int(raw.get("skipped", 0)),
        format_version=version,
        vae_kind=str(raw.get("vae_kind") or ""),
        latent_mean=_channel_stats(raw, "latent_mean", shape[-1], path),
        latent_std=_channel_stats(raw, "latent_std", shape[-1], path),
    )
    if (manifest.latent_mean is None) != (manifest.latent_std is None):
        raise DataFormatError(f"{path}: fields 'latent_mean' and 'latent_std' go together; one is missing")
    if manifest.latent_std is not None and min(manifest.latent_std) <= 0:
        raise DataFormatError(f"{path}: field 'latent_std' must be positive, got {list(manifest.latent_std)}")
    if manifest.num_classes < 1 or manifest.views < 1:
        raise DataFormatError(f"{path}: fields 'num_classes' and 'views' must be >= 1")
    if not shards:
        raise DataFormatError(f"{path}: field 'shards' is empty")
    total = sum(s.count for s in shards)
    if total != manifest.count:
        raise DataFormatError(f"{path}: field 'count' is {manifest.count} but the shards' counts sum to {total}")
    return manifest


def shard_paths(data_dir: str, manifest: Manifest) -> list[str]:
    return [os.path.join(data_dir, s.name) for s in manifest.shards]


def _check_shard(data_dir: str, manifest: Manifest, shard: ShardInfo, deep: bool) -> None:
    path = os.path.join(data_dir, shard.name)
    if not _exists(path):
        raise DataFormatError(f"shard {path} listed in {MANIFEST_NAME} does not exist")
    size = _size(path)
    if size != shard.num_bytes:
        raise DataFormatError(
            f"shard {path} has {size} bytes but {MANIFEST_NAME} says {shard.num_bytes} (truncated or replaced?)"
        )
    try:
        reader = array_record_module.ArrayRecordReader(path)
    except Exception as e:  # the C++ reader raises plain RuntimeError/ValueError on damaged files
        raise DataFormatError(f"shard {path} cannot be opened as ArrayRecord: {e}") from e
    try:
        found = reader.num_records()
        if found != shard.count:
            raise DataFormatError(f"shard {path} holds {found} records but {MANIFEST_NAME} field 'count' of this shard says {shard.count}")
        stop = min(found, found if deep else 1)
        for start in range(0, stop, 256):
            indices = list(range(start, min(stop, start + 256)))
            try:
                records = reader.read(indices)
            except Exception:  # the C++ reader names neither the file nor the record
                records = [_read_one(reader, path, i) for i in indices]
            for offset, data in enumerate(records):
                check_record(data, manifest, f"shard {path} record {start + offset}")
    except BaseException:
        _close_quietly(reader)  # the error in flight says more than a failing close
        raise
    try:
        reader.close()
    except Exception as e:  # noqa: BLE001 - a damaged tail fails only when closing
        raise damaged(f"shard {path}", e) from e


def _close_quietly(reader) -> None:
    try:
        reader.close()
    except Exception:  # noqa: BLE001
        pass


def _read_one(reader, path: str, index: int) -> bytes:
    try:
        return reader.read([index])[0]
    except Exception as e:  # noqa: BLE001 - RuntimeError or ValueError from the C++ reader
        raise damaged(f"shard {path} record {index}", e) from e


def validate_dataset(data_dir: str, deep: bool = False, num_threads: int = 16) -> Manifest:
    """Checks that every shard exists, has its recorded size and count, and that records match
    the manifest (the first record of each shard, or all records with ``deep=True``)."""
    manifest = read_manifest(data_dir)
    with concurrent.futures.ThreadPoolExecutor(max(1, min(num_threads, len(manifest.shards)))) as pool:
        futures = [pool.submit(_check_shard, data_dir, manifest, s, deep) for s in manifest.shards]
        for future in futures:
            future.result()
    return manifest


def write_dataset(
    out_dir: str,
    views: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    *,
    num_classes: int,
    storage: str,
    scale_factor: float,
    vae: str,
    image_size: int | None,
    shard_size: int,
    source: str = "",
    prefix: str = "train",
) -> Manifest:
    """Writes in-memory examples (``views`` of shape (N, views, parts, H, W, C)) as a dataset."""
    if views.ndim != 6 or views.shape[2] != STORAGE_PARTS[storage]:
        raise ValueError(f"views must have shape (N, views, {STORAGE_PARTS[storage]}, H, W, C) for storage {storage!r}, got {views.shape}")
    labels = np.asarray(labels)
    if len(labels) != len(views):
        raise ValueError(f"{len(views)} examples but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), found range [{labels.min()}, {labels.max()}]")
    dtype = next(n for n, (_, dt) in _DTYPES.items() if dt == views.dtype)
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
    num_shards = max(1, -(-len(views) // shard_size))
    shards = []
    for k in range(num_shards):
        lo, hi = k * shard_size, min(len(views), (k + 1) * shard_size)
        path = os.path.join(out_dir, shard_name(prefix, k, num_shards))
        shards.append(write_shard(path, (encode_record(views[i], int(labels[i])) for i in range(lo, hi))))
    manifest = Manifest(
        count=len(views),
        latent_shape=tuple(int(d) for d in views.shape[3:]),
        dtype=dtype,
        num_classes=num_classes,
        storage=storage,
        scale_factor=scale_factor,
        image_size=image_size,
        vae=vae,
        shards=tuple(shards),
        views=views.shape[1],
        source=source,
    )
    write_manifest(out_dir, manifest)
    return manifest


def main(argv: Sequence[str] | None = None) -> None:
    parser = command.ArgumentParser("dico_jax.data.records",
                                    description="Check a dico-jax latent dataset against its manifest.")
    parser.add_argument("data_dir")
    parser.add_argument("--deep", action="store_true", help="read every record, not only the first of each shard")
    args = parser.parse_args(argv)
    with errors.cli("dico_jax.data.records"):
        manifest = validate_dataset(args.data_dir, deep=args.deep)
    print(
        f"{args.data_dir}: OK, {manifest.count} records in {len(manifest.shards)} shards, "
        f"latent {manifest.latent_shape} {manifest.dtype}, storage {manifest.storage}, "
        f"{manifest.num_classes} classes"
    )


if __name__ == "__main__":
    main()
