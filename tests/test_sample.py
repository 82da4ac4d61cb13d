"""Sampling: ADM .npz output, resumption, device-count independence, VAE decoding, bad input.

A tiny DiCo (width 16, one block per level) with random weights on 8x8 one-channel
"digits" samples with 5 DDIM steps; one compile per run.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from dico_jax import checkpoint as ckpt_lib
from dico_jax import sampling as sample_lib
from dico_jax.convert.vae import load_vae
from dico_jax.diffusion import resolve_sampler
from dico_jax.models import abstract_params, get_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import digits as digits_config  # noqa: E402

TINY = dict(hidden_size=16, depths=(1, 1, 1, 1, 1), in_channels=1, out_channels=2, num_classes=10)


def random_params(model, seed, height=8, width=8):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (0.2 * rng.standard_normal(a.shape)).astype(np.float32),
                        abstract_params(model, height, width))


def tiny_digits_config():
    config = digits_config.get_config()
    for key, value in TINY.items():
        config.model[key] = value
    config.sampling.num_samples = 20
    config.sampling.sampler = "ddim"
    config.sampling.respacing = "5"
    return config


def write_run(workdir, config, params, ema_params, step=7):
    """A training workdir's checkpoint as `train` writes it (without the optimizer state)."""
    checkpointer = ckpt_lib.TrainCheckpointer(ckpt_lib.checkpoint_dir(workdir), keep=2,
                                              async_save=False)
    checkpointer.save(step, {"step": np.int32(step), "params": params, "ema_params": ema_params},
                      config=config.to_dict())
    checkpointer.wait_until_finished()
    checkpointer.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("run"))
    model = get_model("DiCo-S", **TINY)
    write_run(path, tiny_digits_config(), random_params(model, 1), random_params(model, 2))
    return path


def settings(**overrides):
    fields = dict(num_samples=20, batch_size=8, seed=0, cfg_scale=3.0, guidance_channels=1,
                  sampler="ddim", respacing="ddim5", labels=None)
    fields.update(overrides)
    return sample_lib.Settings(**fields)


@pytest.fixture(scope="module")
def reference(workdir, tmp_path_factory):
    """An uninterrupted run on all 8 devices: (npz contents, grid path, report)."""
    out = tmp_path_factory.mktemp("ref") / "samples.npz"
    grid = str(out.with_suffix(".png"))
    source = sample_lib.load_source(workdir=workdir)
    report = sample_lib.generate(source, settings(), str(out), grid=grid, progress=False)
    with np.load(out) as f:
        data = {k: f[k] for k in f.files}
    return data, grid, report


def test_writes_adm_npz_and_grid(reference, workdir):
    data, grid, report = reference
    assert set(data) == {"arr_0", "label"}
    images, labels = data["arr_0"], data["label"]
    assert images.shape == (20, 8, 8, 1) and images.dtype == np.uint8
    assert labels.shape == (20,) and labels.min() >= 0 and labels.max() < 10
    assert len(set(labels.tolist())) > 3  # random over the classes, not one class
    assert images.std() > 10  # not a constant image
    assert report.complete and report.batches_computed == (0, 1, 2) and not report.batches_reused
    assert not os.path.exists(report.out + ".parts")  # parts removed once the npz is whole
    with Image.open(grid) as png:
        # 20 samples -> 5 columns x 4 rows of 32x32 cells (8x8 enlarged 4x), 1-pixel gaps,
        # each with its class written under it.
        plain = sample_lib.image_grid(images, rows=4)
        labelled = sample_lib.image_grid(images, rows=4, cell_labels=labels)
        assert png.size == (5 * 33 + 1, labelled.shape[0]) and labelled.shape[0] > 4 * 33 + 1
        np.testing.assert_array_equal(np.asarray(png)[..., None], labelled)
        assert not np.array_equal(labelled[:plain.shape[0]], plain)


def test_ema_is_the_default_and_raw_weights_differ(workdir):
    ema = sample_lib.load_source(workdir=workdir)
    raw = sample_lib.load_source(workdir=workdir, use_ema=False)
    assert ema.weights == "ema_params" and raw.weights == "params" and ema.step == 7
    model = get_model("DiCo-S", **TINY)
    np.testing.assert_array_equal(ema.params["x_embedder"]["kernel"],
                                  random_params(model, 2)["x_embedder"]["kernel"])
    np.testing.assert_array_equal(raw.params["x_embedder"]["kernel"],
                                  random_params(model, 1)["x_embedder"]["kernel"])


def test_resume_computes_only_missing_batches(workdir, reference, tmp_path):
    out = str(tmp_path / "samples.npz")
    source = sample_lib.load_source(workdir=workdir)
    first = []
    report = sample_lib.generate(source, settings(), out, max_batches=2, progress=False,
                                 on_batch=first.append)
    parts = sample_lib.parts_dir(out)
    assert first == [0, 1] and not report.complete and not os.path.exists(out)
    assert sorted(os.listdir(parts)) == ["batch_00000.npz", "batch_00001.npz", "settings.json"]
    os.remove(os.path.join(parts, "batch_00000.npz"))

    second = []
    report = sample_lib.generate(source, settings(), out, progress=False, on_batch=second.append)
    assert second == [0, 2] and report.batches_reused == (1,)
    assert report.complete and not os.path.exists(parts)
    with np.load(out) as f:
        np.testing.assert_array_equal(f["arr_0"], reference[0]["arr_0"])
        np.testing.assert_array_equal(f["label"], reference[0]["label"])


def test_one_device_gives_the_samples_of_eight(workdir, reference, tmp_path):
    out = str(tmp_path / "one.npz")
    source = sample_lib.load_source(workdir=workdir)
    sample_lib.generate(source, settings(), out, devices=jax.devices()[:1], progress=False)
    with np.load(out) as f:
        np.testing.assert_array_equal(f["label"], reference[0]["label"])
        one, eight = f["arr_0"].astype(int), reference[0]["arr_0"].astype(int)
    # Same noise and labels; only float rounding of other per-device batch shapes may differ,
    # which can move a pixel across a uint8 step (another seed would change most pixels).
    assert np.abs(one - eight).max() <= 1
    assert np.mean(one == eight) > 0.99


def test_other_settings_do_not_mix_with_existing_parts(workdir, tmp_path):
    out = str(tmp_path / "samples.npz")
    source = sample_lib.load_source(workdir=workdir)
    # Only the settings check runs before any compile, so this costs no sampling.
    os.makedirs(sample_lib.parts_dir(out))
    record = {**settings(seed=5).record(), "checkpoint": source.directory, "step": 7,
              "weights": "ema_params", "image_shape": [8, 8, 1], "vae_weights": None}
    with open(os.path.join(sample_lib.parts_dir(out), "settings.json"), "w") as f:
        json.dump(record, f)
    with pytest.raises(ValueError, match=r"other settings.*'seed': \(5, 0\)"):
        sample_lib.generate(source, settings(), out, progress=False)


def test_labels_given_are_cycled_and_random_labels_are_per_batch():
    s = settings(labels=(3, 4, 5))
    np.testing.assert_array_equal(sample_lib.batch_labels(s, 10, 1), [5, 3, 4, 5, 3, 4, 5, 3])
    r = settings()
    a, b = sample_lib.batch_labels(r, 10, 0), sample_lib.batch_labels(r, 10, 1)
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, sample_lib.batch_labels(settings(num_samples=999), 10, 0))


def test_sampler_options():
    assert resolve_sampler("ddpm") == ("ddpm", "250")
    assert resolve_sampler("ddim50") == ("ddim", "ddim50")
    assert resolve_sampler("ddim50", "50") == ("ddim", "ddim50")
    assert resolve_sampler("ddim", "25") == ("ddim", "ddim25")
    assert resolve_sampler("ddpm", "100") == ("ddpm", "100")
    with pytest.raises(ValueError, match="conflicts"):
        resolve_sampler("ddim50", "100")
    assert resolve_sampler("heun", "250") == ("heun", "")  # flow samplers take num_steps
    with pytest.raises(ValueError, match="unknown sampler 'dpm'"):
        resolve_sampler("dpm")


def test_bad_input_errors(workdir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no training workdir"):
        sample_lib.load_source(workdir=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        sample_lib.load_source(checkpoint=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 3 .* found \\[7\\]"):
        sample_lib.load_source(workdir=workdir, step=3)
    with pytest.raises(ValueError, match=r"sampling.labels \[10\] out of range: the model has 10 classes"):
        sample_lib.parse_labels("1,10", 10)
    source = sample_lib.load_source(workdir=workdir)
    with pytest.raises(ValueError, match="sampling.batch_size 12 must be a positive multiple of the 8"):
        sample_lib.generate(source, settings(batch_size=12), str(tmp_path / "x.npz"))
    # Pixels need no VAE: weights given for one are named, not ignored.
    with pytest.raises(ValueError, match="--vae_weights vae/: this run's network generates "
                       "pixels .* uses no VAE; drop --vae_weights"):
        sample_lib.generate(source, settings(), str(tmp_path / "x.npz"), vae_weights="vae/")
    # The same weights under an ImageNet-latent config: the VAE is needed.
    source.config = {**source.config, "data": {"dir": "", "builtin": ""}, "resolution": 64}
    with pytest.raises(ValueError, match="latents .*pass --vae_weights"):
        sample_lib.generate(source, settings(), str(tmp_path / "x.npz"))


def test_command_line_uses_config_defaults(workdir, tmp_path):
    out = tmp_path / "cli.npz"
    done = subprocess.run(
        [sys.executable, "-m", "dico_jax.sample", f"--workdir={workdir}", f"--out={out}",
         "--config.sampling.labels=2,7", "--config.sampling.batch_size=8",
         "--config.sampling.num_samples=10"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # Sampler, respacing and CFG come from the saved config (ddim, "5", 3.0).
    assert "ddim ddim5, cfg 3.0" in done.stdout and "images/s" in done.stdout
    with np.load(out) as f:
        assert f["arr_0"].shape == (10, 8, 8, 1) and f["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(f["label"], [2, 7] * 5)


def test_non_finite_settings_and_samples_are_refused(workdir, tmp_path):
    out = tmp_path / "nan.npz"
    done = subprocess.run(
        [sys.executable, "-m", "dico_jax.sample", f"--workdir={workdir}", f"--out={out}",
         "--config.sampling.cfg_scale=nan"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and not out.exists()
    assert done.stderr.strip().splitlines()[-1] == (
        "dico_jax.sample: error: --config.sampling.cfg_scale=nan: must be a finite number")
    # Weights that give NaN: the first batch is refused, naming it and its seed; nothing written.
    model = get_model("DiCo-S", **TINY)
    broken = jax.tree.map(lambda a: np.full(a.shape, np.nan, np.float32), abstract_params(model, 8, 8))
    nan_run = str(tmp_path / "nan_run")
    write_run(nan_run, tiny_digits_config(), broken, broken)
    with pytest.raises(ValueError, match=r"batch 0 \(seed 0\): 8 of 8 samples are NaN or infinite"):
        sample_lib.generate(sample_lib.load_source(workdir=nan_run), settings(), str(out),
                            progress=False)
    assert not out.exists()


def test_command_line_overrides_apply_to_the_saved_config():
    saved = tiny_digits_config().to_dict()  # ddim, respacing "5", cfg 3.0
    config = sample_lib.apply_overrides(saved, {"sampling.cfg_scale": 1.5, "seed": 3})
    s = sample_lib.Settings.from_config(config, num_devices=8)
    assert (s.sampler, s.respacing, s.cfg_scale, s.seed) == ("ddim", "ddim5", 1.5, 3)
    assert s.batch_size == 24 and s.labels is None  # 20 samples on 8 devices, random labels
    assert saved["sampling"]["cfg_scale"] == 3.0  # the saved config itself is left alone
    # A ddimN sampler brings its steps; given together with another respacing, it conflicts.
    s = sample_lib.Settings.from_config(sample_lib.apply_overrides(saved, {"sampling.sampler": "ddim50"}))
    assert (s.sampler, s.respacing) == ("ddim", "ddim50")
    with pytest.raises(ValueError, match="conflicts"):
        sample_lib.Settings.from_config(sample_lib.apply_overrides(
            saved, {"sampling.sampler": "ddim50", "sampling.respacing": "100"}))
    with pytest.raises(ValueError, match="the network is the checkpoint's"):
        sample_lib.apply_overrides(saved, {"model.hidden_size": 64})


def test_training_grid_rows_are_classes_drawn_by_the_same_sampler():
    config = tiny_digits_config()
    config.sampling.grid_classes, config.sampling.grid_per_class = 3, 2
    model = get_model("DiCo-S", **TINY)
    params = random_params(model, 2)
    mesh = jax.make_mesh((8,), ("data",))
    sampler, shape = sample_lib.make_grid_sampler(model, config, (8, 8, 1), mesh)
    key = jax.random.fold_in(jax.random.key(config.seed), 0x5A3F1E)
    images = sampler(params, key)
    assert shape == (3, 2) and images.shape == (6, 8, 8, 1)
    assert images.sharding.is_fully_replicated
    # The .npz sampler's draw for the same labels and key: one sampler behind both.
    draw = sample_lib.make_sample_fn(model, sample_lib.Settings.from_config(config), (8, 8, 1),
                                     config=config)
    same = jax.jit(draw)(params, np.repeat(np.arange(3, dtype=np.int32), 2), key)
    np.testing.assert_allclose(np.asarray(images), np.asarray(same), atol=1e-5)
    grid = sample_lib.image_grid(sample_lib.to_uint8(np.asarray(images)), rows=shape[0])
    assert grid.shape == (3 * 33 + 1, 2 * 33 + 1, 1) and grid.dtype == np.uint8


def test_grids_are_labelled_by_class(tmp_path):
    images = np.full((6, 8, 8, 1), 128, np.uint8)
    plain = sample_lib.image_grid(images, rows=2)
    rows = sample_lib.image_grid(images, rows=2, row_labels=[3, 7])
    assert rows.shape[0] == plain.shape[0] and rows.shape[1] > plain.shape[1]
    np.testing.assert_array_equal(rows[:, -plain.shape[1]:], plain)  # the images untouched
    margin = rows[:, :rows.shape[1] - plain.shape[1]]
    first, second = margin[:34], margin[34:]
    assert (first < 128).any() and (second < 128).any()  # ink beside each row
    assert not np.array_equal(first[:33], second[:33])  # "3" and "7" differ
    same = sample_lib.image_grid(images, rows=2, row_labels=[3, 3])
    np.testing.assert_array_equal(same[1:33, :margin.shape[1]], same[34:66, :margin.shape[1]])
    cols = sample_lib.image_grid(images, rows=2, col_labels=[1, 2, 3])
    assert cols.shape[1] == plain.shape[1] and cols.shape[0] > plain.shape[0]
    assert (cols[:cols.shape[0] - plain.shape[0]] < 128).any()
    cells = sample_lib.image_grid(images, rows=2, cell_labels=range(6))
    assert cells.shape[1] == plain.shape[1] and cells.shape[0] > plain.shape[0]
    with pytest.raises(ValueError, match="row_labels: 1 labels for 2 rows"):
        sample_lib.image_grid(images, rows=2, row_labels=[1])
    # An .npz preview of a cycled label list: one class per column, named above it.
    path = str(tmp_path / "by_column.png")
    sample_lib.write_grid(images, path, cols=3, labels=np.array([2, 7, 4] * 2),
                          class_per_column=True)
    np.testing.assert_array_equal(np.asarray(Image.open(path))[..., None], sample_lib.image_grid(
        images, rows=2, col_labels=[2, 7, 4]))


# ---------------------------------------------------------------------------------------------
# Latent-space runs: an official-format checkpoint converted, decoded by a (tiny) diffusers VAE.

TINY_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                latent_channels=4)


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, **TINY_VAE).eval()
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)  # config.json + diffusion_pytorch_model.safetensors
    return str(path), vae


@pytest.mark.torch
def test_vae_decoding_matches_diffusers(tiny_vae_dir):
    import torch

    path, torch_vae = tiny_vae_dir
    module, params = load_vae(path)
    assert tuple(module.block_out_channels) == (32, 64) and module.norm_num_groups == 8
    latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    ours = np.asarray(jax.jit(lambda p, z: sample_lib.to_uint8_images(z, module, p, 0.18215))(
        params, latents))
    with torch.no_grad():
        decoded = torch_vae.decode(torch.from_numpy(latents / 0.18215).permute(0, 3, 1, 2)).sample
    # The DiT sampling script's conversion.
    ref = torch.clamp(127.5 * decoded.clamp(-1, 1) + 128.0, 0, 255).permute(0, 2, 3, 1)
    ref = ref.to(torch.uint8).numpy()
    assert ours.shape == ref.shape == (2, 16, 16, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
    assert ref.std() > 5


@pytest.mark.torch
def test_samples_a_converted_checkpoint_through_the_vae(tiny_vae_dir, tmp_path):
    import torch

    from dico_jax.convert.checkpoints import import_torch_checkpoint
    from dico_jax.convert.torch_reference import TorchDiCo, randomize_

    net = randomize_(TorchDiCo(16, (1, 1, 1, 1, 1), in_channels=4, num_classes=10), seed=0)
    src = str(tmp_path / "0000050.pt")
    torch.save(net.state_dict(), src)  # a bare state_dict, as the released weights
    ckpt = str(tmp_path / "converted")
    import_torch_checkpoint(src, ckpt, "DiCo-S", {"hidden_size": 16, "depths": [1] * 5})

    source = sample_lib.load_source(checkpoint=ckpt)
    assert source.step == 50 and source.config["model"]["in_channels"] == 4
    with pytest.raises(ValueError, match="--vae_weights"):
        sample_lib.generate(source, settings(num_samples=8, guidance_channels=3),
                            str(tmp_path / "x.npz"))
    out = str(tmp_path / "samples.npz")
    # Resolution 256 -> 32x32x4 latents; this VAE upsamples 2x.
    sample_lib.generate(source, settings(num_samples=8, guidance_channels=3, sampler="ddpm",
                                         respacing="5", cfg_scale=1.5),
                        out, vae_weights=tiny_vae_dir[0], progress=False)
    with np.load(out) as f:
        assert f["arr_0"].shape == (8, 64, 64, 3) and f["arr_0"].dtype == np.uint8
        assert f["label"].shape == (8,) and 0 <= f["label"].min() and f["label"].max() < 10
