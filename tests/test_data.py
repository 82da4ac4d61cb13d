"""Latent record format, manifest validation, the digits dataset and the Grain pipeline."""
import json
import os
import subprocess
import sys

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dico_jax.data import digits, pipeline, records


def _marked_dataset(out_dir, count=96, shape=(4, 4, 2), storage="sample", dtype=np.float32, shard_size=40, num_classes=10):
    """Record i holds +i in its image view and -(i + 0.5) in its flip view; label i % classes."""
    parts = records.STORAGE_PARTS[storage]
    ids = np.arange(count, dtype=np.float32)
    views = np.empty((count, 2, parts, *shape), np.float32)
    views[:, 0] = ids[:, None, None, None, None]
    views[:, 1] = -(ids[:, None, None, None, None] + 0.5)
    return records.write_dataset(
        str(out_dir), views.astype(dtype), np.arange(count) % num_classes, num_classes=num_classes,
        storage=storage, scale_factor=1.0, vae="test", image_size=None, shard_size=shard_size,
    )


def _record_ids(batch):
    """Recovers each example's record id from its marked latent (and whether it is the flip)."""
    value = batch["latent"][:, 0, 0, 0]
    flipped = value < 0
    return np.where(flipped, -value - 0.5, value).astype(int), flipped


def _edit_manifest(data_dir, **changes):
    path = os.path.join(data_dir, records.MANIFEST_NAME)
    with open(path) as f:
        raw = json.load(f)
    raw.update(changes)
    with open(path, "w") as f:
        json.dump(raw, f)


# ----- record format -----

@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_record_roundtrip_keeps_array_and_label(dtype):
    np_dtype = records.storage_dtype(dtype)
    views = np.random.default_rng(0).standard_normal((2, 2, 3, 5, 4)).astype(np_dtype)
    data = records.encode_record(views, 7)
    assert len(data) == records.HEADER_SIZE + views.nbytes
    manifest = records.Manifest(
        count=1, latent_shape=(3, 5, 4), dtype=dtype, num_classes=10, storage="moments", scale_factor=1.0,
        image_size=None, vae="test", shards=(records.ShardInfo("x", 1, 0),),
    )
    decoded, label = records.decode_record(data, manifest)
    assert label == 7
    np.testing.assert_array_equal(decoded, views)


def test_record_against_wrong_manifest_names_the_field():
    data = records.encode_record(np.zeros((2, 1, 4, 4, 2), np.float32), 3)
    base = dict(count=1, num_classes=10, storage="sample", scale_factor=1.0, image_size=None, vae="t",
                shards=(records.ShardInfo("x", 1, 0),))
    with pytest.raises(records.DataFormatError, match="latent_shape"):
        records.check_record(data, records.Manifest(latent_shape=(8, 8, 2), dtype="float32", **base), "r")
    with pytest.raises(records.DataFormatError, match="'dtype' says bfloat16"):
        records.check_record(data, records.Manifest(latent_shape=(4, 4, 2), dtype="bfloat16", **base), "r")
    with pytest.raises(records.DataFormatError, match="label 3 is outside"):
        records.check_record(data, records.Manifest(latent_shape=(4, 4, 2), dtype="float32", **{**base, "num_classes": 3}), "r")
    with pytest.raises(records.DataFormatError, match="not a dico-jax latent record"):
        records.decode_header(b"x" * 40)


# ----- validation of datasets on disk -----

def test_validate_accepts_written_dataset_and_reports_layout(tmp_path):
    written = _marked_dataset(tmp_path, count=96, shard_size=40)
    manifest = records.validate_dataset(str(tmp_path), deep=True)
    assert manifest == written
    assert [s.count for s in manifest.shards] == [40, 40, 16]
    assert manifest.record_shape == (2, 1, 4, 4, 2)


def test_missing_shard_is_named(tmp_path):
    manifest = _marked_dataset(tmp_path)
    os.remove(tmp_path / manifest.shards[1].name)
    with pytest.raises(records.DataFormatError, match=f"{manifest.shards[1].name}.*does not exist"):
        records.validate_dataset(str(tmp_path))


def test_truncated_shard_is_named(tmp_path):
    manifest = _marked_dataset(tmp_path)
    path = tmp_path / manifest.shards[0].name
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(records.DataFormatError, match=f"{manifest.shards[0].name}.*truncated"):
        records.validate_dataset(str(tmp_path))


def _corrupt_middle(path, manifest, shard):
    """Flips bytes in the middle of a shard's records, keeping its size (a damaged disk block)."""
    data = bytearray(path.read_bytes())
    at = shard.count * manifest.record_nbytes // 2  # records first; the file is padded after
    data[at:at + 16] = bytes(b ^ 0xFF for b in data[at:at + 16])
    path.write_bytes(bytes(data))


def test_corrupted_shard_names_the_file_and_record(tmp_path):
    manifest = _marked_dataset(tmp_path)
    name = manifest.shards[1].name
    _corrupt_middle(tmp_path / name, manifest, manifest.shards[1])
    with pytest.raises(records.DataFormatError, match=f"shard .*{name} record \\d+ cannot be read"):
        records.validate_dataset(str(tmp_path), deep=True)
    # Training names the shard and record too, wherever the damaged record falls in a batch.
    it = pipeline.create_train_iterator(str(tmp_path), global_batch_size=96, seed=0)
    with pytest.raises(records.DataFormatError, match=f"shard .*{name} record \\d+ cannot be read"):
        next(it)
    proc = subprocess.run([sys.executable, "-m", "dico_jax.data.records", str(tmp_path), "--deep"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith("dico_jax.data.records: error: shard ")
    assert name in last[0] and "Traceback" not in proc.stderr


def test_manifest_shape_or_dtype_disagreeing_with_records_is_named(tmp_path):
    _marked_dataset(tmp_path)
    _edit_manifest(tmp_path, latent_shape=[4, 4, 3])
    with pytest.raises(records.DataFormatError, match="latent_shape"):
        records.validate_dataset(str(tmp_path))
    _edit_manifest(tmp_path, latent_shape=[4, 4, 2], dtype="float16")
    with pytest.raises(records.DataFormatError, match="'dtype'"):
        records.validate_dataset(str(tmp_path))


def test_manifest_count_disagreeing_with_records_is_named(tmp_path):
    manifest = _marked_dataset(tmp_path)
    _edit_manifest(tmp_path, count=manifest.count + 1)
    with pytest.raises(records.DataFormatError, match="'count' is 97 but the shards' counts sum to 96"):
        records.read_manifest(str(tmp_path))
    shards = [dict(name=s.name, count=s.count, num_bytes=s.num_bytes) for s in manifest.shards]
    shards[0]["count"] += 1
    _edit_manifest(tmp_path, shards=shards)
    with pytest.raises(records.DataFormatError, match=f"{manifest.shards[0].name} holds 40 records.*says 41"):
        records.validate_dataset(str(tmp_path))


def test_label_out_of_range_is_caught_by_deep_validation_and_pipeline(tmp_path):
    _marked_dataset(tmp_path, count=48, num_classes=10)
    _edit_manifest(tmp_path, num_classes=5)  # records carry labels up to 9
    records.validate_dataset(str(tmp_path))  # the first record of each shard (label 0) is fine
    with pytest.raises(records.DataFormatError, match=r"record 5: label 5 is outside \[0, 5\)"):
        records.validate_dataset(str(tmp_path), deep=True)
    it = pipeline.create_train_iterator(str(tmp_path), global_batch_size=48, seed=0)
    with pytest.raises(records.DataFormatError, match=r"shard .*train-0000[01]-of-00002.array_record record \d+: label \d is outside \[0, 5\)"):
        next(it)


def test_missing_manifest_says_how_to_build_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="dico_jax.data.extract"):
        records.read_manifest(str(tmp_path))


# ----- the built-in digits -----

def test_digits_dataset_matches_sklearn_and_is_idempotent(tmp_path):
    manifest = digits.build_digits_dataset(str(tmp_path))
    assert (manifest.count, manifest.latent_shape, manifest.num_classes) == (1797, (8, 8, 1), 10)
    assert (manifest.storage, manifest.scale_factor, manifest.views) == ("sample", 1.0, 2)
    assert records.read_manifest(str(tmp_path)) == manifest
    images, labels = digits.digits_arrays()
    assert images.min() == -1.0 and images.max() == 1.0
    path = os.path.join(tmp_path, manifest.shards[0].name)
    from array_record.python import array_record_module

    reader = array_record_module.ArrayRecordReader(path)
    views, label = records.decode_record(reader.read([5])[0], manifest)
    reader.close()
    assert label == labels[5]
    np.testing.assert_array_equal(views[0, 0], images[5])
    np.testing.assert_array_equal(views[1, 0], images[5][:, ::-1])
    mtime = os.path.getmtime(path)
    assert digits.build_digits_dataset(str(tmp_path)) == manifest
    assert os.path.getmtime(path) == mtime
    with open(path, "r+b") as f:  # a damaged copy is rebuilt, not trusted
        f.truncate(1000)
    assert digits.build_digits_dataset(str(tmp_path)) == manifest
    records.validate_dataset(str(tmp_path), deep=True)


def test_digits_default_dir_uses_workdir(tmp_path):
    assert digits.default_digits_dir(str(tmp_path)) == os.path.join(str(tmp_path), "digits")
    assert digits.default_digits_dir().endswith(os.path.join("dico_jax", "digits"))


def test_data_spec_from_the_manifest_or_the_config(tmp_path):
    from configs import default as default_config
    from dico_jax.data import spec
    from dico_jax.models.vae import SD_VAE_SCALING_FACTOR
    from dico_jax.sampling import image_space

    config = default_config.get_config()
    config.data.builtin, config.data.dir = "digits", ""
    digits_spec = spec.DataSpec((8, 8, 1), 10, False, 1.0)
    assert spec.from_config(config) == digits_spec
    # The sampler's fallback (no manifest, no run record) agrees: one channel, not four.
    assert image_space(config.to_dict()) == digits_spec
    config.data.builtin, config.resolution = "", 512
    assert spec.from_config(config) == spec.DataSpec((64, 64, 4), 1000, True,
                                                     SD_VAE_SCALING_FACTOR)
    config.model.in_channels = 16
    assert spec.from_config(config).latent_shape == (64, 64, 16)
    # A dataset directory's manifest wins over the config.
    digits.build_digits_dataset(str(tmp_path))
    config.data.dir = str(tmp_path)
    assert spec.from_config(config) == digits_spec
    config.data.dir, config.data.builtin = "", "cifar"
    with pytest.raises(ValueError, match="config.data.builtin='cifar'"):
        spec.from_config(config)


# ----- the Grain pipeline -----

def test_pipeline_epoch_is_a_fresh_permutation_with_labels_and_flips(tmp_path):
    _marked_dataset(tmp_path, count=96)
    it = pipeline.create_train_iterator(str(tmp_path), global_batch_size=32, seed=3)
    epochs = []
    for _ in range(2):
        ids, flips = [], []
        for _ in range(3):
            batch = next(it)
            assert batch["latent"].shape == (32, 4, 4, 2) and batch["latent"].dtype == np.float32
            assert batch["label"].dtype == np.int32
            batch_ids, flipped = _record_ids(batch)
            np.testing.assert_array_equal(batch["label"], batch_ids % 10)
            ids.append(batch_ids)
            flips.append(flipped)
        ids = np.concatenate(ids)
        assert sorted(ids) == list(range(96))
        assert 0.25 < np.mean(np.concatenate(flips)) < 0.75
        epochs.append(ids)
    assert not np.array_equal(epochs[0], epochs[1])
    same_seed = pipeline.create_train_iterator(str(tmp_path), global_batch_size=32, seed=3)
    np.testing.assert_array_equal(_record_ids(next(same_seed))[0], epochs[0][:32])


def test_pipeline_without_random_flip_reads_only_the_image_view(tmp_path):
    _marked_dataset(tmp_path, count=64)
    it = pipeline.create_train_iterator(str(tmp_path), global_batch_size=64, seed=0, random_flip=False)
    for _ in range(2):
        assert not _record_ids(next(it))[1].any()


def test_pipeline_draws_fresh_posterior_samples_from_moments(tmp_path):
    count, shape = 32, (8, 8, 4)
    views = np.zeros((count, 2, 2, *shape), np.float32)
    views[:, :, 0] = 3.0  # mean
    views[:, :, 1] = np.log(4.0)  # logvar: std 2
    records.write_dataset(str(tmp_path), views, np.zeros(count, int), num_classes=1, storage="moments",
                          scale_factor=0.5, vae="test", image_size=None, shard_size=16)
    it = pipeline.create_train_iterator(str(tmp_path), global_batch_size=32, seed=0)
    first, second = next(it)["latent"], next(it)["latent"]
    # scale 0.5 * N(3, 2^2) = N(1.5, 1)
    assert abs(first.mean() - 1.5) < 0.05 and abs(first.std() - 1.0) < 0.05
    assert not np.allclose(first, second)  # the same records, a new sample each epoch


@pytest.mark.parametrize("storage", ["sample", "moments"])
def test_process_parts_make_the_same_global_batch_whatever_the_process_count(tmp_path, storage):
    # Records, order, flip views and posterior noise of a position depend on (seed, step,
    # position) only: the parts read by 2 or 4 processes concatenate to 1 process's batch.
    count, shape = 48, (4, 4, 2)
    rng = np.random.default_rng(0)
    parts = 2 if storage == "moments" else 1
    views = rng.normal(size=(count, 2, parts, *shape)).astype(np.float32)
    records.write_dataset(str(tmp_path), views, np.arange(count) % 3, num_classes=3, storage=storage,
                          scale_factor=0.5, vae="test", image_size=None, shard_size=16)

    def batches(index, processes):
        it = iter(pipeline.create_train_dataset(str(tmp_path), global_batch_size=16, seed=3,
                                                random_flip=True, process=(index, processes)))
        return [next(it) for _ in range(5)]  # crosses an epoch boundary

    whole = batches(0, 1)
    for processes in (2, 4):
        split = [batches(i, processes) for i in range(processes)]
        for step, want in enumerate(whole):
            for key in ("latent", "label"):
                got = np.concatenate([split[i][step][key] for i in range(processes)])
                np.testing.assert_array_equal(got, want[key])
    assert not np.array_equal(whole[0]["latent"], whole[3]["latent"])


@pytest.mark.parametrize("worker_count", [0, 2])
def test_iterator_state_restores_the_same_batches(tmp_path, worker_count):
    _marked_dataset(tmp_path, count=96)
    kwargs = dict(global_batch_size=16, seed=1, worker_count=worker_count)
    it = pipeline.create_train_iterator(str(tmp_path), **kwargs)
    for _ in range(4):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]  # crosses into the second epoch
    fresh = pipeline.create_train_iterator(str(tmp_path), **kwargs)
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        np.testing.assert_array_equal(got["latent"], want["latent"])
        np.testing.assert_array_equal(got["label"], want["label"])


def test_iterator_state_saves_and_restores_with_orbax(tmp_path):
    data_dir = tmp_path / "data"
    _marked_dataset(data_dir, count=64)
    it = pipeline.create_train_iterator(str(data_dir), global_batch_size=16, seed=2)
    next(it)
    params = {"w": np.arange(4.0)}
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(params),
                                             data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = [next(it) for _ in range(3)]

    fresh = pipeline.create_train_iterator(str(data_dir), global_batch_size=16, seed=2)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(params), data=grain.checkpoint.CheckpointRestore(fresh)))
    np.testing.assert_array_equal(restored["state"]["w"], params["w"])
    for want in expected:
        np.testing.assert_array_equal(next(restored["data"])["latent"], want["latent"])


def test_pipeline_rejects_batch_larger_than_dataset(tmp_path):
    _marked_dataset(tmp_path, count=24, shard_size=24)
    with pytest.raises(ValueError, match="global batch 32 exceeds the 24 records"):
        pipeline.create_train_dataset(str(tmp_path), global_batch_size=32, seed=0)


def test_make_global_batch_splits_rows_over_the_batch_axes():
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    local = {"latent": np.arange(16 * 2 * 2 * 1, dtype=np.float32).reshape(16, 2, 2, 1),
             "label": np.arange(16, dtype=np.int32)}
    batch = pipeline.make_global_batch(local, mesh)
    assert batch["latent"].shape == (16, 2, 2, 1)
    assert batch["latent"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    rows = sorted(tuple(np.asarray(s.data).ravel()) for s in batch["label"].addressable_shards)
    assert rows == [(2 * k, 2 * k + 1) for k in range(8)]
    np.testing.assert_array_equal(np.asarray(batch["latent"]), local["latent"])
    data_only = pipeline.make_global_batch(local, mesh, batch_axes="data")
    assert {s.data.shape[0] for s in data_only["label"].addressable_shards} == {4}
    with pytest.raises(ValueError, match="not divisible by the 8 batch shards"):
        pipeline.make_global_batch({"label": np.arange(12)}, mesh)
    with pytest.raises(ValueError, match="not axes of the mesh"):
        pipeline.make_global_batch(local, mesh, batch_axes=("batch",))
