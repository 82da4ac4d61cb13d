"""Image preprocessing and latent extraction end to end on a tiny generated image tree."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dico_jax.data import extract, imagenet, pipeline, records

IMAGE_SIZE = 32
LOGVAR = -2.0


def _pool_encode(params, images):
    """A stand-in encoder with the VAE's contract: 8x average pooling, 4 channels."""
    n, h, w, _ = images.shape
    pooled = images.reshape(n, h // 8, 8, w // 8, 8, 3).mean(axis=(2, 4))
    mean = jnp.concatenate([pooled, pooled[..., :1] * params["gain"]], axis=-1)
    return mean, jnp.full_like(mean, LOGVAR)


def _pool_reference(image_uint8):
    x = image_uint8.astype(np.float32) / 127.5 - 1.0
    pooled = x.reshape(IMAGE_SIZE // 8, 8, IMAGE_SIZE // 8, 8, 3).mean(axis=(1, 3))
    return np.concatenate([pooled, pooled[..., :1] * 2.0], axis=-1)


@pytest.fixture
def image_tree(tmp_path):
    """Two classes; RGB PNGs of assorted sizes, a grayscale PNG, a CMYK JPEG and a corrupt file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    sizes = [(40, 32), (64, 90), (33, 70), (128, 128)]
    for c, name in enumerate(["n01_cat", "n02_dog"]):
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"img{i}.png")
    Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8), "L").save(root / "n01_cat" / "gray.png")
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).convert("CMYK").save(root / "n02_dog" / "cmyk.jpg")
    (root / "n02_dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "n02_dog" / "notes.txt").write_text("not an image")
    return str(root)


def _extract(source, out, **kwargs):
    kwargs = dict(encode_fn=_pool_encode, params={"gain": jnp.float32(2.0)}, image_size=IMAGE_SIZE,
                  batch_size=8, shard_size=4, scale_factor=0.5, vae_name="pool8", show_progress=False) | kwargs
    return extract.extract_latents(source, str(out), **kwargs)


def test_adm_center_crop_halves_resizes_and_keeps_the_center():
    # 600x300 -> box halving to 300x150 -> bicubic to 200x100 -> crop x in [50, 150):
    # original columns [150, 450), painted red, the rest blue.
    pixels = np.zeros((300, 600, 3), np.uint8)
    pixels[:, :, 2] = 255
    pixels[:, 150:450] = (255, 0, 0)
    out = imagenet.adm_center_crop(Image.fromarray(pixels), 100)
    assert out.size == (100, 100)
    arr = np.asarray(out).astype(int)
    assert (arr[:, 3:-3, 0] > 240).all() and (arr[:, 3:-3, 2] < 15).all()
    tall = imagenet.adm_center_crop(Image.fromarray(np.zeros((513, 256, 3), np.uint8)), 256)
    assert tall.size == (256, 256)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16"])
def test_to_rgb_gives_three_channels(mode):
    image = Image.new("RGB", (6, 4), (10, 200, 30)).convert(mode)
    rgb = imagenet.to_rgb(image)
    assert rgb.mode == "RGB" and np.asarray(rgb).shape == (4, 6, 3)


def test_folder_source_lists_classes_in_sorted_order(image_tree):
    source = imagenet.FolderSource(image_tree)
    assert source.class_names == ["n01_cat", "n02_dog"]
    assert len(source) == source.expected_count == 11  # notes.txt is not an image
    labels = [e.label for e in source.examples(0, len(source))]
    assert labels == [0] * 5 + [1] * 6
    with pytest.raises(ValueError, match="folder:/path"):
        imagenet.open_source("imagenet", "train")


def test_tfds_source_names_the_missing_manual_archive(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_train.tar not found"):
        imagenet.open_source(f"tfds:{tmp_path}", "train", str(tmp_path / "tfds"))


def test_extraction_skips_the_corrupt_image_and_refuses_to_finish_short(image_tree, tmp_path):
    source = imagenet.FolderSource(image_tree)
    out = tmp_path / "latents"
    with pytest.raises(extract.ExtractionError, match=r"wrote 10 records.*expected 11.*1 unreadable.*skipped.txt"):
        _extract(source, out, storage="moments")
    assert not (out / records.MANIFEST_NAME).exists()
    assert (out / extract.SKIPPED_NAME).read_text().strip().endswith("broken.jpg")
    shard_files = sorted(p for p in os.listdir(out) if p.endswith(records.SHARD_SUFFIX))
    assert len(shard_files) == 3
    mtimes = {p: os.path.getmtime(out / p) for p in shard_files}

    manifest = _extract(source, out, storage="moments", max_skipped=1)  # finalizes without re-encoding
    assert {p: os.path.getmtime(out / p) for p in shard_files} == mtimes
    assert (manifest.count, manifest.skipped, manifest.num_classes) == (10, 1, 2)
    assert (manifest.latent_shape, manifest.storage, manifest.image_size) == ((4, 4, 4), "moments", IMAGE_SIZE)
    assert records.validate_dataset(str(out), deep=True) == manifest

    # Every stored mean is the encoder applied to the ADM crop (and its flip) of the source image.
    from array_record.python import array_record_module

    readable = [e for e in source.examples(0, len(source)) if not e.key.endswith("broken.jpg")]
    stored = []
    for shard in manifest.shards:
        reader = array_record_module.ArrayRecordReader(str(out / shard.name))
        stored += [records.decode_record(r, manifest) for r in reader.read_all()]
        reader.close()
    for example, (views, label) in zip(readable, stored):
        crop = imagenet.load_and_crop(example.load, IMAGE_SIZE)
        assert label == example.label
        np.testing.assert_allclose(views[0, 0], _pool_reference(crop), atol=1e-5)
        np.testing.assert_allclose(views[1, 0], _pool_reference(crop[:, ::-1]), atol=1e-5)
        np.testing.assert_array_equal(views[:, 1], LOGVAR)


def test_interrupted_extraction_resumes_with_finished_shards(image_tree, tmp_path):
    source = imagenet.FolderSource(image_tree)
    out = tmp_path / "latents"

    class FailingOnThirdShard:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __len__(self):
            return len(self.inner)

        def examples(self, start, stop):
            if start >= 8:
                raise KeyboardInterrupt
            return self.inner.examples(start, stop)

    with pytest.raises(KeyboardInterrupt):
        _extract(FailingOnThirdShard(source), out, max_skipped=1)
    names = sorted(os.listdir(out))
    assert names == sorted(
        [f"train-0000{k}-of-00003.array_record{s}" for k in (0, 1) for s in ("", extract.DONE_SUFFIX)]
    )  # no partial or temporary file left behind
    mtimes = {n: os.path.getmtime(out / n) for n in names}
    manifest = _extract(source, out, max_skipped=1)
    assert {n: os.path.getmtime(out / n) for n in names} == mtimes
    assert manifest.count == 10 and manifest.storage == "sample"


def test_sampled_latents_are_scaled_deterministic_and_train_ready(image_tree, tmp_path):
    source = imagenet.FolderSource(image_tree)
    first = _extract(source, tmp_path / "a", max_skipped=1, storage="sample", dtype="bfloat16")
    second = _extract(source, tmp_path / "b", max_skipped=1, storage="sample", dtype="bfloat16", batch_size=16, shard_size=8)
    assert first.dtype == "bfloat16" and first.scale_factor == 0.5

    def all_records(out, manifest):
        from array_record.python import array_record_module

        result = []
        for shard in manifest.shards:
            reader = array_record_module.ArrayRecordReader(str(out / shard.name))
            result += [records.decode_record(r, manifest)[0].astype(np.float32) for r in reader.read_all()]
            reader.close()
        return np.stack(result)

    a, b = all_records(tmp_path / "a", first), all_records(tmp_path / "b", second)
    np.testing.assert_array_equal(a, b)  # same samples whatever the batch and shard layout
    # sample = 0.5 * (mean + exp(LOGVAR / 2) * noise): standardized noise is N(0, 1)
    example = next(source.examples(0, 1))
    mean = _pool_reference(imagenet.load_and_crop(example.load, IMAGE_SIZE))
    noise = (a[0, 0, 0] / 0.5 - mean) / np.exp(LOGVAR / 2)
    assert abs(noise.mean()) < 0.6 and 0.5 < noise.std() < 1.5
    assert not np.allclose(a[0, 0, 0] / 0.5, mean, atol=0.01)

    it = pipeline.create_train_iterator(str(tmp_path / "a"), global_batch_size=8, seed=0)
    batch = next(it)
    assert batch["latent"].shape == (8, 4, 4, 4) and set(batch["label"]) <= {0, 1}


def test_extraction_fails_early_on_a_count_mismatch(image_tree, tmp_path):
    source = imagenet.FolderSource(image_tree)
    with pytest.raises(extract.ExtractionError, match="has 11 images but 1281167 are expected"):
        _extract(source, tmp_path / "out", expected_count=imagenet.IMAGENET_TRAIN_COUNT)
    assert not (tmp_path / "out").exists()


def test_cli_arguments(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    args = extract.parse_args(["--source", f"folder:{tmp_path}", "--vae_weights", str(weights),
                               "--out", "o", "--storage", "moments", "--shard-size", "10"])
    assert (args.storage, args.shard_size, args.batch_size, args.image_size, args.expected_count) == (
        "moments", 10, 64, 256, None)
    with pytest.raises(SystemExit):
        extract.parse_args(["--source", "folder:/x", "--out", "o"])  # --vae_weights is required


@pytest.mark.slow
@pytest.mark.torch
def test_cli_encodes_with_the_stable_diffusion_vae(image_tree, tmp_path, capsys):
    """The command line end to end: diffusers weights on disk -> Flax VAE -> dataset whose
    stored means match diffusers' own encoder."""
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
    ).half().float()  # stored in float16 below: keep the reference on the same weights
    weights_dir = tmp_path / "sd-vae-test"
    weights_dir.mkdir()
    save_file({k: v.half() for k, v in vae.state_dict().items()}, str(weights_dir / "diffusion_pytorch_model.safetensors"))

    out = tmp_path / "latents"
    extract.main(["--source", f"folder:{image_tree}", "--vae_weights", str(weights_dir / "diffusion_pytorch_model.safetensors"),
                  "--out", str(out), "--image_size", str(IMAGE_SIZE), "--batch_size", "8", "--shard_size", "8",
                  "--storage", "moments", "--max_skipped", "1"])
    assert "wrote 10 latents (4, 4, 4) in 2 shards" in capsys.readouterr().out
    manifest = records.validate_dataset(str(out), deep=True)
    assert (manifest.vae, manifest.scale_factor, manifest.image_size) == ("sd-vae-test", 0.18215, IMAGE_SIZE)

    from array_record.python import array_record_module

    reader = array_record_module.ArrayRecordReader(str(out / manifest.shards[0].name))
    views, _ = records.decode_record(reader.read([0])[0], manifest)
    reader.close()
    example = next(imagenet.FolderSource(image_tree).examples(0, 1))
    crop = imagenet.load_and_crop(example.load, IMAGE_SIZE).astype(np.float32) / 127.5 - 1.0
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(crop).permute(2, 0, 1)[None]).latent_dist
    np.testing.assert_allclose(views[0, 0], dist.mean[0].permute(1, 2, 0).numpy(), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(views[0, 1], dist.logvar[0].permute(1, 2, 0).numpy(), atol=2e-3, rtol=2e-3)


def test_command_line_mistakes_are_one_line(tmp_path):
    """A representative mistake on the file-reading commands: one line, exit status 2."""
    import subprocess
    import sys

    commands = {
        "dico_jax.data.extract": ["--source", f"folder:{tmp_path / 'missing'}", "--vae_weights",
                                  str(tmp_path / "vae.safetensors"), "--out", str(tmp_path / "o")],
        "dico_jax.tools.roofline": [str(tmp_path / "missing.hlo")],
    }
    for module, args in commands.items():
        done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 2, (module, done.stderr[-2000:])
        last = done.stderr.strip().splitlines()[-1]
        assert "error: " in last and "missing" in last and "Traceback" not in done.stderr, last
