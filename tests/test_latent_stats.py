"""Per-channel latent statistics (the VA-VAE's normalisation): computed exactly during
extraction, stored in the manifest, applied by the input pipeline, undone before decoding,
and a VAE kind that disagrees with the config refused."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dico_jax.data import extract, imagenet, pipeline, records, spec
from dico_jax.errors import UserError

SIZE = 16


def _pool_encode(params, images):
    """A deterministic stand-in encoder (log-variance clipped to -30): 4x average pooling, the
    three colours and their product with a gain, so channels differ in mean and spread."""
    n, h, w, _ = images.shape
    pooled = images.reshape(n, h // 4, 4, w // 4, 4, 3).mean(axis=(2, 4))
    mean = jnp.concatenate([pooled, pooled[..., :1] * pooled[..., 1:2] * params["gain"] + 1.0], -1)
    return mean, jnp.full_like(mean, -100.0)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("stats")
    rng = np.random.default_rng(0)
    images = []
    for c in range(2):
        (tmp_path / "img" / f"c{c}").mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            pixels[..., c] //= 3  # the classes differ in colour
            Image.fromarray(pixels).save(tmp_path / "img" / f"c{c}" / f"{i}.png")
            images.append(pixels)
    root, out = str(tmp_path / "img"), tmp_path / "lat"
    return root, np.stack(images), out, _extract(imagenet.FolderSource(root), out)


def _expected_stats(images):
    x = images.astype(np.float64) / 127.5 - 1.0
    pooled = x.reshape(len(x), SIZE // 4, 4, SIZE // 4, 4, 3).mean(axis=(2, 4))
    z = np.concatenate([pooled, pooled[..., :1] * pooled[..., 1:2] * 3.0 + 1.0], -1).reshape(-1, 4)
    return z.mean(axis=0), z.std(axis=0, ddof=1)


def _extract(source, out, **kwargs):
    return extract.extract_latents(
        source, str(out), encode_fn=_pool_encode, params={"gain": jnp.float32(3.0)},
        image_size=SIZE, batch_size=8, shard_size=3, scale_factor=1.0, vae_name="pool4",
        vae_kind="va-vae", latent_stats=True, show_progress=False, **kwargs)


@pytest.mark.slow
def test_statistics_are_exact_resumable_and_normalise_the_pipeline(tree):
    root, images, out, manifest = tree
    source = imagenet.FolderSource(root)
    want_mean, want_std = _expected_stats(images)
    assert manifest.vae_kind == "va-vae" and len(manifest.shards) == 4  # 10 images, 3 a shard
    np.testing.assert_allclose(manifest.latent_mean, want_mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(manifest.latent_std, want_std, rtol=1e-6)
    assert records.read_manifest(str(out)) == manifest

    # A shard re-encoded on resume: the same statistics.
    os.remove(out / (manifest.shards[1].name + extract.DONE_SUFFIX))
    again = _extract(source, out)
    np.testing.assert_allclose(again.latent_mean, manifest.latent_mean, rtol=1e-12)
    np.testing.assert_allclose(again.latent_std, manifest.latent_std, rtol=1e-12)

    # The pipeline returns (z - mean) / std of the unflipped views: mean 0, std 1 per channel.
    batches = pipeline.create_train_dataset(str(out), global_batch_size=10, seed=0,
                                            random_flip=False, num_epochs=1)
    latents = np.concatenate([b["latent"] for b in batches]).reshape(-1, 4)
    np.testing.assert_allclose(latents.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(latents.std(axis=0, ddof=1), 1.0, rtol=1e-5)

    # Sampling undoes it: to_vae_latents(normalised) gives back the stored latents.
    space = spec.from_manifest(manifest)
    stored = latents * np.asarray(want_std, np.float32) + np.asarray(want_mean, np.float32)
    np.testing.assert_allclose(space.to_vae_latents(latents), stored, rtol=1e-5, atol=1e-6)


def test_vae_kind_mismatch_and_missing_statistics_are_one_error(tree, tmp_path):
    extracted = tree[2]
    out = tmp_path / "lat"
    out.mkdir()
    (out / records.MANIFEST_NAME).write_text((extracted / records.MANIFEST_NAME).read_text())
    config = {"data": {"dir": str(out)}, "vae": "sd-vae", "resolution": SIZE, "model": {}}
    with pytest.raises(UserError, match=r"config.vae='sd-vae' but .*lat holds va-vae latents"):
        spec.from_config(config)
    assert spec.from_config({**config, "vae": "va-vae"}).vae_kind == "va-vae"

    raw = json.loads((out / records.MANIFEST_NAME).read_text())
    raw["latent_mean"] = raw["latent_std"] = None
    (out / records.MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(UserError, match="without the per-channel statistics"):
        spec.from_config({**config, "vae": "va-vae"})
    raw["latent_mean"], raw["latent_std"] = [0.0] * 4, [1.0, 1.0, 0.0, 1.0]
    (out / records.MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(records.DataFormatError, match="'latent_std' must be positive"):
        records.read_manifest(str(out))


def test_channel_stats_merge_in_any_order():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (50, 3, 3, 5))
    whole = extract.ChannelStats(5)
    whole.update(x)
    parts = [extract.ChannelStats(5) for _ in range(3)]
    for part, chunk in zip(parts, np.array_split(x, 3)):
        part.update(chunk)
    merged = extract.ChannelStats(5)
    for part in reversed(parts):
        merged.merge(extract.ChannelStats.from_json(json.loads(json.dumps(part.to_json()))))
    for found in (whole, merged):
        mean, std = found.mean_std()
        np.testing.assert_allclose(mean, x.reshape(-1, 5).mean(0), rtol=1e-12)
        np.testing.assert_allclose(std, x.reshape(-1, 5).std(0, ddof=1), rtol=1e-12)
