"""Encode an image dataset into VAE latents stored as ArrayRecord shards plus a manifest.

    python -m dico_jax.data.extract --source folder:/data/imagenet/train \\
        --vae_weights /models/sd-vae-ft-ema/diffusion_pytorch_model.safetensors --out /data/latents256

Every image is ADM center-cropped, scaled to [-1, 1] and encoded together with its horizontal
flip. ``--storage sample`` (default, the official recipe) stores a posterior sample times the
scale factor; ``--storage moments`` stores mean and log-variance so training draws a fresh
sample each time it reads the record.

``--vae sd-vae`` (default) is the Stable Diffusion VAE, its latents scaled by 0.18215;
``--vae va-vae`` is LightningDiT's VA-VAE (f16d32), whose latents are stored unscaled and
normalised per channel instead: the mean and standard deviation of each channel over the
whole dataset (posterior samples of the unflipped images, as LightningDiT computes them in
datasets/img_latent_dataset.py, there on 10,000 random images) go into the manifest, and the
input pipeline applies them. Each shard's partial statistics are kept in its marker, so a
resumed or multi-process extraction gets the same numbers.

As process p of P (started from the environment, see ``dico_jax.runtime``) it encodes shards
p, p + P, p + 2P, ... over its local devices, each example with its own noise key, so the
dataset is the same for any number of processes; ``--out`` must be a directory every host sees. Each finished shard is renamed
into place and marked with a ``.done.json`` file, so a rerun skips it. Process 0 checks all
shards and the total count, then writes ``manifest.json``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dico_jax import command, errors, runtime
from dico_jax.errors import UserError
from dico_jax.data import imagenet, records

SD_VAE_SCALE_FACTOR = 0.18215
# diffusers clamps the posterior log-variance to this range before sampling.
LOGVAR_RANGE = (-30.0, 20.0)
DONE_SUFFIX = ".done.json"
SKIPPED_NAME = "skipped.txt"

# (params, images NHWC float32 in [-1, 1]) -> (mean, logvar), both NHWC latents, unscaled.
EncodeFn = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]


class ChannelStats:
    """Per-channel count, mean and sum of squared deviations, in float64, mergeable (Chan et
    al.'s parallel update), so shards and processes combine exactly in any order."""

    def __init__(self, channels: int, count: int = 0, mean=None, m2=None):
        self.count = count
        self.mean = np.zeros(channels) if mean is None else np.asarray(mean, np.float64)
        self.m2 = np.zeros(channels) if m2 is None else np.asarray(m2, np.float64)

    def update(self, latents: np.ndarray) -> None:
        """Adds latents (..., C): every position counts once per channel."""
        x = np.asarray(latents, np.float64).reshape(-1, self.mean.size)
        if len(x):
            mean = x.mean(axis=0)
            self.merge(ChannelStats(self.mean.size, len(x), mean, ((x - mean) ** 2).sum(axis=0)))

    def merge(self, other: "ChannelStats") -> None:
        total = self.count + other.count
        if other.count == 0:
            return
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / total)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / total)
        self.count = total

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Mean and unbiased standard deviation (torch.std's default) of each channel."""
        std = np.sqrt(self.m2 / max(self.count - 1, 1))
        return tuple(float(v) for v in self.mean), tuple(float(v) for v in std)

    def to_json(self) -> dict:
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_json(cls, raw: dict) -> "ChannelStats":
        return cls(len(raw["mean"]), int(raw["count"]), raw["mean"], raw["m2"])


class ExtractionError(RuntimeError):
    """The extracted dataset is incomplete or disagrees with what was expected."""


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    index: int
    name: str
    start: int  # first source example
    stop: int


def plan_shards(num_examples: int, shard_size: int, prefix: str) -> list[ShardPlan]:
    num_shards = max(1, -(-num_examples // shard_size))
    return [
        ShardPlan(k, records.shard_name(prefix, k, num_shards), k * shard_size, min(num_examples, (k + 1) * shard_size))
        for k in range(num_shards)
    ]


def read_done_marker(out_dir: str, plan: ShardPlan) -> dict | None:
    """The completion record of a shard, or None when the shard must be (re)encoded."""
    marker = os.path.join(out_dir, plan.name + DONE_SUFFIX)
    shard = os.path.join(out_dir, plan.name)
    if not (os.path.exists(marker) and os.path.exists(shard)):
        return None
    with open(marker) as f:
        done = json.load(f)
    if os.path.getsize(shard) != done["num_bytes"]:
        return None
    return done


def make_encoder(
    encode_fn: EncodeFn,
    params: Any,
    *,
    storage: str,
    scale_factor: float,
    dtype: str,
    seed: int,
    batch_size: int,
    image_size: int,
) -> tuple[Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]], tuple[int, int, int]]:
    """Returns (encode(images uint8 (B, S, S, 3), example ids (B,)) -> (record arrays
    (B, 2, parts, h, w, c), unscaled float32 posterior samples of the unflipped images
    (B, h, w, c)), latent shape (h, w, c)). Batches are split over local devices."""
    devices = np.array(jax.local_devices())
    if batch_size % devices.size:
        raise ValueError(f"--batch_size {batch_size} must be divisible by the {devices.size} local devices")
    mesh = Mesh(devices, ("batch",))
    batch_sharding = NamedSharding(mesh, PartitionSpec("batch"))
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    out_dtype = records.storage_dtype(dtype)
    base_key = jax.random.key(seed)

    def encode(params, images, ids):
        x = images.astype(jnp.float32) / 127.5 - 1.0
        both = jnp.concatenate([x, x[:, :, ::-1]], axis=0)  # image views, then flip views
        mean, logvar = encode_fn(params, both)
        logvar = jnp.clip(logvar, *LOGVAR_RANGE)
        mean, logvar = (jnp.stack(jnp.split(a.astype(jnp.float32), 2), axis=1) for a in (mean, logvar))
        # A key per example keeps samples identical across batch sizes and hosts.
        noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base_key, i), mean.shape[1:]))(ids)
        sample = mean + jnp.exp(0.5 * logvar) * noise
        if storage == "moments":
            out = jnp.stack([mean, logvar], axis=2)
        else:
            out = (sample * scale_factor)[:, :, None]
        return out.astype(out_dtype), sample[:, 0]

    jitted = jax.jit(encode, in_shardings=(None, batch_sharding, batch_sharding),
                     out_shardings=(batch_sharding, batch_sharding))
    images_spec = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.uint8)
    ids_spec = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    out_shape = jax.eval_shape(encode, params, images_spec, ids_spec)[0].shape
    latent_shape = tuple(int(d) for d in out_shape[3:])

    def run(images: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Placed on this process's devices first: with several processes, jit accepts host
        # arrays only for replicated inputs.
        images, ids = jax.device_put((images, ids.astype(np.int32)), batch_sharding)
        out, sample = jitted(params, images, ids)
        return np.asarray(out), np.asarray(sample)

    return run, latent_shape


def _cropped_batches(
    examples: Iterator[imagenet.Example],
    image_size: int,
    batch_size: int,
    pool: concurrent.futures.Executor,
    first_id: int,
) -> Iterator[tuple[list[tuple[int, imagenet.Example]], list[concurrent.futures.Future]]]:
    """Groups examples into batches whose crops are already submitted to the pool."""
    batch: list[tuple[int, imagenet.Example]] = []
    for offset, example in enumerate(examples):
        batch.append((first_id + offset, example))
        if len(batch) == batch_size:
            yield batch, [pool.submit(imagenet.load_and_crop, e.load, image_size) for _, e in batch]
            batch = []
    if batch:
        yield batch, [pool.submit(imagenet.load_and_crop, e.load, image_size) for _, e in batch]


def encode_shard_records(
    source,
    plan: ShardPlan,
    encode: Callable[[np.ndarray, np.ndarray], np.ndarray],
    *,
    image_size: int,
    batch_size: int,
    pool: concurrent.futures.Executor,
    skipped: list[str],
    stats: ChannelStats | None = None,
    progress=None,
) -> Iterator[bytes]:
    """Serialized records of one shard, in source order; unreadable images go to ``skipped``,
    the unscaled samples of the unflipped images into ``stats``."""
    batches = _cropped_batches(source.examples(plan.start, plan.stop), image_size, batch_size, pool, plan.start)
    pending = next(batches, None)
    while pending is not None:
        batch, futures = pending
        pending = next(batches, None)  # the pool decodes the next batch while this one encodes
        images, ids, labels = [], [], []
        for (example_id, example), future in zip(batch, futures):
            try:
                images.append(future.result())
            except Exception as e:  # any decoder failure means the same thing: skip this image
                logging.warning("skipping unreadable image %s: %s: %s", example.key, type(e).__name__, e)
                skipped.append(example.key)
                continue
            ids.append(example_id)
            labels.append(example.label)
        if images:
            real = len(images)
            pad = batch_size - real  # a full batch keeps one compiled shape
            image_batch = np.stack(images + [images[0]] * pad)
            id_batch = np.array(ids + [ids[0]] * pad)
            out, sample = encode(image_batch, id_batch)
            out = out[:real]
            if stats is not None:
                stats.update(sample[:real])
            for views, label in zip(out, labels):
                if not 0 <= label < source.num_classes:
                    raise ExtractionError(f"{plan.name}: label {label} outside [0, {source.num_classes})")
                yield records.encode_record(views, label)
        if progress is not None:
            progress.update(len(batch))


def encode_shard(source, plan: ShardPlan, out_dir: str, encode, *, channels: int | None = None,
                 **kwargs) -> dict:
    """Writes one shard atomically, then its ``.done.json`` marker (with the shard's latent
    statistics when ``channels`` is given); returns the marker."""
    skipped: list[str] = []
    stats = None if channels is None else ChannelStats(channels)
    info = records.write_shard(
        os.path.join(out_dir, plan.name),
        encode_shard_records(source, plan, encode, skipped=skipped, stats=stats, **kwargs)
    )
    done = {"name": info.name, "count": info.count, "num_bytes": info.num_bytes, "skipped": skipped}
    if stats is not None:
        done["stats"] = stats.to_json()
    marker = os.path.join(out_dir, plan.name + DONE_SUFFIX)
    with open(marker + ".tmp", "w") as f:
        json.dump(done, f)
    os.replace(marker + ".tmp", marker)
    return done


def finalize(
    out_dir: str,
    plans: Sequence[ShardPlan],
    *,
    expected_count: int,
    max_skipped: int,
    manifest_fields: dict,
    latent_stats: bool = False,
) -> records.Manifest:
    """Checks every shard is complete and the counts add up, then writes the manifest (with
    the dataset's per-channel latent mean and std combined from the shards' markers when
    ``latent_stats``)."""
    dones = [read_done_marker(out_dir, p) for p in plans]
    missing = [p.name for p, d in zip(plans, dones) if d is None]
    if missing:
        raise ExtractionError(
            f"{len(missing)} of {len(plans)} shards in {out_dir} are unfinished (first: {missing[:3]}); rerun to complete them"
        )
    written = sum(d["count"] for d in dones)
    skipped = [key for d in dones for key in d["skipped"]]
    if skipped:
        with open(os.path.join(out_dir, SKIPPED_NAME), "w") as f:
            f.write("\n".join(skipped) + "\n")
    if written != expected_count:
        if skipped and written + len(skipped) == expected_count and len(skipped) <= max_skipped:
            logging.warning("accepting %d skipped unreadable images (--max_skipped %d)", len(skipped), max_skipped)
        else:
            raise ExtractionError(
                f"wrote {written} records to {out_dir} but expected {expected_count} (--expected_count); "
                f"{len(skipped)} unreadable images were skipped"
                + (f", listed in {os.path.join(out_dir, SKIPPED_NAME)}" if skipped else "")
                + ". Repair them and delete their shards' .done.json files to re-encode those shards, "
                "or pass --max_skipped to accept the loss. No manifest was written."
            )
    if latent_stats:
        no_stats = [p.name for p, d in zip(plans, dones) if "stats" not in d]
        if no_stats:
            raise ExtractionError(
                f"{len(no_stats)} shards in {out_dir} were encoded without latent statistics "
                f"(first: {no_stats[:3]}); delete their .done.json files and rerun to re-encode them")
        total = ChannelStats(manifest_fields["latent_shape"][-1])
        for d in dones:
            total.merge(ChannelStats.from_json(d["stats"]))
        mean, std = total.mean_std()
        if not all(np.isfinite(mean + std)) or min(std) <= 0:
            raise ExtractionError(f"latent statistics of {out_dir} are degenerate: mean {mean}, std {std}")
        manifest_fields = {**manifest_fields, "latent_mean": mean, "latent_std": std}
    manifest = records.Manifest(
        count=written,
        shards=tuple(records.ShardInfo(d["name"], d["count"], d["num_bytes"]) for d in dones),
        skipped=len(skipped),
        **manifest_fields,
    )
    records.write_manifest(out_dir, manifest)
    return manifest


def extract_latents(
    source,
    out_dir: str,
    *,
    encode_fn: EncodeFn,
    params: Any,
    image_size: int = 256,
    storage: str = "sample",
    scale_factor: float = SD_VAE_SCALE_FACTOR,
    dtype: str = "float32",
    vae_name: str = "sd-vae-ft-ema",
    vae_kind: str = "sd-vae",
    latent_stats: bool = False,
    batch_size: int = 64,
    shard_size: int = 1024,
    expected_count: int | None = None,
    max_skipped: int = 0,
    seed: int = 0,
    prefix: str = "train",
    decode_threads: int | None = None,
    show_progress: bool = True,
) -> records.Manifest | None:
    """Encodes this process's shards of ``source``; process 0 then writes the manifest (the
    other processes return None). ``latent_stats`` adds the per-channel latent mean and std
    (the VA-VAE's normalisation) to it."""
    if storage not in records.STORAGE_PARTS:
        raise ValueError(f"storage must be one of {sorted(records.STORAGE_PARTS)}, got {storage!r}")
    expected_count = source.expected_count if expected_count is None else expected_count
    if len(source) != expected_count:
        raise ExtractionError(f"{source.name} has {len(source)} images but {expected_count} are expected (--expected_count)")
    os.makedirs(out_dir, exist_ok=True)
    plans = plan_shards(len(source), shard_size, prefix)
    index, count = jax.process_index(), jax.process_count()
    mine = [p for p in plans if p.index % count == index]
    todo = [p for p in mine if read_done_marker(out_dir, p) is None]
    logging.info("process %d/%d: %d of its %d shards left to encode", index, count, len(todo), len(mine))
    encode, latent_shape = make_encoder(
        encode_fn, params, storage=storage, scale_factor=scale_factor, dtype=dtype,
        seed=seed, batch_size=batch_size, image_size=image_size,
    )
    progress = None
    if show_progress and todo:
        from tqdm import tqdm

        progress = tqdm(total=sum(p.stop - p.start for p in todo), unit="img", desc=f"extract p{index}", smoothing=0.05)
    with concurrent.futures.ThreadPoolExecutor(decode_threads or os.cpu_count() or 1) as pool:
        for plan in todo:
            done = encode_shard(
                source, plan, out_dir, encode, image_size=image_size, batch_size=batch_size, pool=pool,
                progress=progress, channels=latent_shape[-1] if latent_stats else None,
            )
            if done["skipped"]:
                logging.warning("%s: skipped %d unreadable images", plan.name, len(done["skipped"]))
    if progress is not None:
        progress.close()
    if count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dico_jax.data.extract: shards written")
    if index != 0:
        return None
    return finalize(
        out_dir,
        plans,
        expected_count=expected_count,
        max_skipped=max_skipped,
        latent_stats=latent_stats,
        manifest_fields=dict(
            latent_shape=latent_shape,
            dtype=dtype,
            num_classes=source.num_classes,
            storage=storage,
            scale_factor=scale_factor,
            image_size=image_size,
            vae=vae_name,
            vae_kind=vae_kind,
            views=2,
            source=source.name,
        ),
    )


def vae_encoder(weights_path: str, compute_dtype: str = "float32",
                kind: str = "sd-vae") -> tuple[EncodeFn, Any]:
    """(encode_fn, params) of the AutoencoderKL of `kind` from local weights (diffusers files,
    an LDM checkpoint or a vae-from-torch folder), loaded as `dico_jax.sample` loads it."""
    from dico_jax.convert.vae import load_vae

    vae, params = load_vae(weights_path, compute_dtype, kind)
    # Encoding never touches the decoder; leaving it out saves device memory.
    params = {k: v for k, v in params.items() if not k.startswith(("decoder", "post_quant_conv"))}

    def encode_fn(params, images):
        return vae.apply({"params": params}, images, method="encode")

    return encode_fn, params


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = command.ArgumentParser("dico_jax.data.extract", description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="folder:/path/to/class/tree or tfds:/manual/download/dir")
    parser.add_argument("--split", default="train", help="tfds split; also the shard file prefix")
    parser.add_argument("--tfds_data_dir", default=None, help="where tfds keeps the prepared imagenet2012")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--vae", choices=["sd-vae", "va-vae"], default="sd-vae",
                        help="sd-vae: latents x 0.18215; va-vae: LightningDiT's f16d32, latents "
                             "normalised per channel with the dataset's statistics")
    parser.add_argument("--vae_weights", required=True,
                        help="diffusers AutoencoderKL .safetensors/.bin file or folder, an LDM "
                             ".pt checkpoint, or a vae-from-torch folder")
    parser.add_argument("--vae_dtype", choices=["float32", "bfloat16"], default="float32", help="VAE compute dtype")
    parser.add_argument("--vae_name", default=None, help="recorded in the manifest (default: the weights' folder name)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--storage", choices=sorted(records.STORAGE_PARTS), default="sample")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--batch_size", type=int, default=64, help="per process")
    parser.add_argument("--shard_size", type=int, default=1024)
    parser.add_argument("--expected_count", type=int, default=None,
                        help="default: 1,281,167 for imagenet2012 train, else the number of images found")
    parser.add_argument("--max_skipped", type=int, default=0, help="unreadable images to tolerate")
    parser.add_argument("--seed", type=int, default=0, help="posterior sampling seed")
    parser.add_argument("--decode_threads", type=int, default=None)
    args = parser.parse_args(argv)
    for name in ("image_size", "batch_size", "shard_size", "expected_count", "decode_threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.max_skipped < 0:
        parser.error(f"--max_skipped must be >= 0, got {args.max_skipped}")
    kind, _, where = args.source.partition(":")
    if kind == "folder" and not os.path.isdir(where):
        parser.error(f"--source {args.source}: no such folder {where}")
    if not os.path.exists(args.vae_weights):
        parser.error(f"--vae_weights {args.vae_weights}: no such file or folder")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    runtime.start()  # joins the job's other processes when the runtime has any
    # Only process 0 prepares tfds; the others wait, then read the prepared files.
    if args.source.startswith("tfds:") and jax.process_count() > 1 and jax.process_index() != 0:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dico_jax.data.extract: tfds prepared")
        source = imagenet.open_source(args.source, args.split, args.tfds_data_dir, prepare=False)
    else:
        source = imagenet.open_source(args.source, args.split, args.tfds_data_dir)
        if args.source.startswith("tfds:") and jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("dico_jax.data.extract: tfds prepared")
    encode_fn, params = vae_encoder(args.vae_weights, args.vae_dtype, args.vae)
    va_vae = args.vae == "va-vae"
    weights = os.path.abspath(args.vae_weights)
    vae_name = args.vae_name or os.path.basename(weights if os.path.isdir(weights) else os.path.dirname(weights))
    try:
        manifest = extract_latents(
            source, args.out, encode_fn=encode_fn, params=params, image_size=args.image_size,
            storage=args.storage, dtype=args.dtype, vae_name=vae_name, vae_kind=args.vae,
            scale_factor=1.0 if va_vae else SD_VAE_SCALE_FACTOR, latent_stats=va_vae,
            batch_size=args.batch_size,
            shard_size=args.shard_size, expected_count=args.expected_count, max_skipped=args.max_skipped,
            seed=args.seed, prefix=args.split, decode_threads=args.decode_threads,
        )
    except ExtractionError as e:
        raise UserError(f"extraction into {args.out} failed: {e}") from e
    if manifest is not None:
        print(f"wrote {manifest.count} latents {manifest.latent_shape} in {len(manifest.shards)} shards to {args.out}")


if __name__ == "__main__":
    with errors.cli("dico_jax.data.extract", also=(OSError,)):
        main()
