"""The Flax Stable Diffusion VAE against diffusers' PyTorch AutoencoderKL, and its weight conversion."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dico_jax.convert.vae import load_vae_weights, vae_torch_to_flax
from dico_jax.models.vae import SD_VAE_SCALING_FACTOR, AutoencoderKL, sample_latents

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4)
# sd-vae-ft-ema / sd-vae-ft-mse: 83,653,863 parameters.
SD_VAE_PARAM_COUNT = 83_653_863


def relative_error(found, reference):
    found, reference = np.asarray(found, np.float64), np.asarray(reference, np.float64)
    return np.linalg.norm(found - reference) / np.linalg.norm(reference)


def nchw_to_nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def torch_vae():
    """A randomly initialized tiny diffusers AutoencoderKL, norms and biases perturbed too."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, **TINY
    ).eval()
    with torch.no_grad():
        # Default init leaves norm scales at 1 and shifts at 0, which would hide a swapped mapping.
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def tiny_params(torch_vae):
    return vae_torch_to_flax(torch_vae.state_dict(), AutoencoderKL(**TINY))


@pytest.mark.torch
def test_encode_and_decode_match_diffusers(torch_vae, tiny_params):
    import torch

    vae = AutoencoderKL(**TINY)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    latents = np.random.default_rng(1).normal(size=(2, 16, 16, 4)).astype(np.float32)
    with torch.no_grad():
        posterior = torch_vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
        decoded = torch_vae.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)).sample

    mean, logvar = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))(tiny_params, images)
    out = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))(tiny_params, latents)

    assert mean.shape == logvar.shape == (2, 16, 16, 4)
    assert out.shape == (2, 32, 32, 3)
    assert relative_error(mean, nchw_to_nhwc(posterior.mean)) < 1e-4
    assert relative_error(logvar, nchw_to_nhwc(posterior.logvar)) < 1e-4
    assert relative_error(out, nchw_to_nhwc(decoded)) < 1e-4


@pytest.mark.torch
def test_old_attention_names_convert_to_the_same_params(torch_vae, tiny_params):
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in torch_vae.state_dict().items():
        for new, old in old_names.items():
            key = key.replace(f".{new}.", f".{old}.")
        renamed[key] = value
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in renamed
    params = vae_torch_to_flax(renamed, AutoencoderKL(**TINY))
    jax.tree.map(np.testing.assert_array_equal, params, tiny_params)


@pytest.mark.torch
def test_full_sd_vae_shapes_and_parameter_count():
    diffusers = pytest.importorskip("diffusers")
    torch_vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        sample_size=256,
    )
    params = vae_torch_to_flax(torch_vae.state_dict())

    vae = AutoencoderKL()
    assert vae.scaling_factor == SD_VAE_SCALING_FACTOR == 0.18215
    abstract = jax.eval_shape(lambda x: vae.init(jax.random.key(0), x), jnp.zeros((1, 256, 256, 3)))
    expected = jax.tree.map(lambda a: a.shape, abstract["params"])
    assert jax.tree.map(lambda a: a.shape, params) == expected
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    torch_count = sum(p.numel() for p in torch_vae.parameters())
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == torch_count == SD_VAE_PARAM_COUNT


@pytest.mark.torch
def test_missing_key_is_named_with_its_shape(torch_vae):
    state = dict(torch_vae.state_dict())
    del state["encoder.mid_block.attentions.0.to_q.weight"]
    with pytest.raises(ValueError, match=r"1 missing keys.*\n  encoder\.mid_block\.attentions\.0\.to_q\.weight \(64, 64\)"):
        vae_torch_to_flax(state, AutoencoderKL(**TINY))


@pytest.mark.torch
def test_unexpected_key_is_named_with_its_shape(torch_vae):
    state = dict(torch_vae.state_dict())
    state["encoder.extra_conv.weight"] = np.zeros((5, 2, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"1 unexpected keys.*\n  encoder\.extra_conv\.weight \(5, 2, 3, 3\)"):
        vae_torch_to_flax(state, AutoencoderKL(**TINY))


@pytest.mark.torch
def test_misshaped_key_reports_expected_and_found(torch_vae):
    state = dict(torch_vae.state_dict())
    state["decoder.conv_in.weight"] = np.zeros((64, 3, 3, 3), np.float32)
    state["quant_conv.bias"] = np.zeros((8, 1), np.float32)
    with pytest.raises(ValueError) as info:
        vae_torch_to_flax(state, AutoencoderKL(**TINY))
    message = str(info.value)
    assert "2 mis-shaped keys" in message
    assert "decoder.conv_in.weight: expected (64, 4, 3, 3), found (64, 3, 3, 3)" in message
    assert "quant_conv.bias: expected (8,), found (8, 1)" in message
    assert "missing" not in message and "unexpected" not in message


@pytest.mark.torch
def test_wrong_configuration_lists_problems_and_truncates(torch_vae):
    # Tiny weights against the full SD configuration: every key is wrong somehow.
    with pytest.raises(ValueError) as info:
        vae_torch_to_flax(torch_vae.state_dict())
    message = str(info.value)
    assert "block_out_channels=(128, 256, 512, 512)" in message
    assert "encoder.conv_in.weight: expected (128, 3, 3, 3), found (32, 3, 3, 3)" in message
    assert "126 missing keys" in message  # the third resnet of each decoder block, blocks 2-3, ...
    assert "\n  decoder.up_blocks.0.resnets.2.conv1.weight (512, 512, 3, 3)\n" in message
    assert "\n  ... and 106 more\n" in message  # only the first 20 of each kind are listed
    assert "decoder.up_blocks.1.resnets.0.conv_shortcut.weight (32, 64, 1, 1)" in message  # unexpected


@pytest.mark.torch
def test_same_tensor_under_old_and_new_name_is_rejected(torch_vae):
    state = dict(torch_vae.state_dict())
    state["encoder.mid_block.attentions.0.query.weight"] = state["encoder.mid_block.attentions.0.to_q.weight"]
    with pytest.raises(ValueError, match=r"old and the new attention names.*\n  encoder\.mid_block\.attentions\.0\."):
        vae_torch_to_flax(state, AutoencoderKL(**TINY))


@pytest.mark.torch
@pytest.mark.parametrize("filename", ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"])
def test_load_vae_weights_reads_file_and_folder(torch_vae, tmp_path, filename):
    import torch
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in torch_vae.state_dict().items()}
    folder = tmp_path / "sd-vae" / "vae"
    folder.mkdir(parents=True)
    if filename.endswith(".safetensors"):
        save_file(state, str(folder / filename))
    else:
        torch.save(state, folder / filename)

    for path in (folder / filename, folder, folder.parent):
        loaded = load_vae_weights(path)
        assert loaded.keys() == state.keys()
        for key, value in state.items():
            np.testing.assert_array_equal(loaded[key], value.numpy(), err_msg=key)


@pytest.mark.torch
def test_load_vae_weights_widens_bf16_safetensors(tmp_path):
    import torch
    from safetensors.torch import save_file

    weights = torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16)
    save_file({"quant_conv.bias": weights}, str(tmp_path / "w.safetensors"))
    loaded = load_vae_weights(tmp_path / "w.safetensors")
    assert loaded["quant_conv.bias"].dtype == np.float32
    np.testing.assert_array_equal(loaded["quant_conv.bias"], [1.5, -2.25, 3.0])


def test_load_vae_weights_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no VAE weights in folder"):
        load_vae_weights(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_vae_weights(tmp_path / "nope.safetensors")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"weights\.npz.*\.safetensors or \.bin"):
        load_vae_weights(tmp_path / "weights.npz")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="broken.safetensors"):
        load_vae_weights(tmp_path / "broken.safetensors")


@pytest.fixture(scope="module")
def flax_tiny():
    """Random tiny params drawn with numpy: compiling Flax's initializers takes ~20 s on CPU."""
    vae = AutoencoderKL(**TINY)
    shapes = jax.eval_shape(vae.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = np.prod(leaf.shape[:-1])
            return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), jnp.float32)
        return jnp.asarray((name == "scale") + 0.1 * rng.normal(size=leaf.shape), jnp.float32)

    return vae, jax.tree_util.tree_map_with_path(draw, shapes)


def encode(vae, params, images):
    return jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))(params, images)


def test_logvar_is_clipped_like_diffusers(flax_tiny):
    vae, params = flax_tiny
    params = dict(params)
    # Zero kernel: the moments are the quant_conv bias, far outside diffusers' [-30, 20] range.
    params["quant_conv"]["kernel"] = jnp.zeros_like(params["quant_conv"]["kernel"])
    params["quant_conv"]["bias"] = jnp.array([0.5, -1.0, 2.0, 0.0, 100.0, 100.0, -100.0, -100.0])
    mean, logvar = encode(vae, params, jnp.zeros((1, 32, 32, 3)))
    np.testing.assert_allclose(mean[0, 3, 5], [0.5, -1.0, 2.0, 0.0])
    np.testing.assert_array_equal(logvar[..., :2], 20.0)
    np.testing.assert_array_equal(logvar[..., 2:], -30.0)


def test_encode_needs_only_encoder_params(flax_tiny):
    vae, params = flax_tiny
    images = jnp.linspace(-1, 1, 32 * 32 * 3).reshape(1, 32, 32, 3)
    encoder_only = {k: v for k, v in params.items() if k in ("encoder", "quant_conv")}
    for full, partial in zip(encode(vae, params, images), encode(vae, encoder_only, images)):
        np.testing.assert_array_equal(full, partial)


def test_bf16_compute_stays_close_to_fp32(flax_tiny):
    vae, params = flax_tiny
    images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
    mean32, _ = encode(vae, params, images)
    vae16 = AutoencoderKL(**TINY, dtype=jnp.bfloat16)
    mean16, logvar16 = encode(vae16, params, images)
    decoded16 = jax.jit(lambda p, z: vae16.apply({"params": p}, z, method="decode"))(params, mean16)
    assert mean16.dtype == logvar16.dtype == decoded16.dtype == jnp.float32
    assert decoded16.shape == images.shape
    assert relative_error(mean16, mean32) < 3e-2


def test_bad_input_shapes_are_rejected(flax_tiny):
    vae, params = flax_tiny
    with pytest.raises(ValueError, match=r"images must be \(N, H, W, 3\) NHWC, got shape \(1, 3, 32, 32\)"):
        encode(vae, params, jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="multiples of 2"):
        encode(vae, params, jnp.zeros((1, 31, 32, 3)))
    with pytest.raises(ValueError, match=r"latents must be \(N, H, W, 4\)"):
        vae.apply({"params": params}, jnp.zeros((1, 8, 8, 3)), method="decode")


def test_sample_latents_follows_the_posterior():
    mean = jnp.array([0.0, 1.0, -2.0, 3.0])[None].repeat(20000, axis=0)
    logvar = jnp.log(jnp.array([1.0, 0.25, 4.0, 1e-4]))[None].repeat(20000, axis=0)
    key = jax.random.key(0)
    samples = sample_latents(mean, logvar, key, 0.5)
    np.testing.assert_allclose(samples.mean(axis=0), 0.5 * mean[0], atol=0.03)
    np.testing.assert_allclose(samples.std(axis=0), 0.5 * jnp.array([1.0, 0.5, 2.0, 0.01]), rtol=0.03)
    np.testing.assert_array_equal(samples, sample_latents(mean, logvar, key, 0.5))
    assert not np.allclose(samples, sample_latents(mean, logvar, jax.random.key(1), 0.5))
    default = sample_latents(mean[:2], jnp.full((2, 4), -30.0), key)
    np.testing.assert_allclose(default, SD_VAE_SCALING_FACTOR * mean[:2], atol=1e-5)


def test_the_vae_loader_lives_with_the_vae():
    """Data extraction, sampling and evaluation take the VAE from `convert.vae`, which depends
    on the network only: no package reaches into `sampling` for it."""
    import ast
    import pathlib

    from dico_jax.convert import vae as convert_vae

    assert callable(convert_vae.load_vae)
    root = pathlib.Path(convert_vae.__file__).parents[1]
    for path in [*(root / "data").glob("*.py"), *(root / "models").glob("*.py"),
                 root / "convert" / "vae.py"]:
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
        reaching = sorted(m for m in imported if m.startswith(("dico_jax.sampling",
                                                               "dico_jax.evaluation")))
        assert not reaching, f"{path.relative_to(root)} imports {reaching}"
