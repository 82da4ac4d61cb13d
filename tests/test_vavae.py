"""The Flax VA-VAE (LightningDiT's f16d32 tokenizer) against a PyTorch LDM AutoencoderKL, and
the conversion of its release's state dict in both directions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dico_jax.convert.vae import load_vae_weights, vae_flax_to_torch, vae_torch_to_flax
from dico_jax.models.vae import va_vae

# LDM arguments of a tiny VA-VAE and the same network as our module's fields: three levels
# at a 32x32 input, attention at resolution 8 (the last level), as the release has it at 16
# of 256.
TINY_LDM = dict(embed_dim=8, ch=16, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,),
                resolution=32, groups=8)
TINY = dict(latent_channels=8, block_out_channels=(16, 32, 32), layers_per_block=2,
            norm_num_groups=8, attention_levels=(2,))


def relative_error(found, reference):
    found, reference = np.asarray(found, np.float64), np.asarray(reference, np.float64)
    return np.linalg.norm(found - reference) / np.linalg.norm(reference)


@pytest.fixture(scope="module")
def torch_ldm():
    torch = pytest.importorskip("torch")
    from tests.ldm_reference import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(**TINY_LDM).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms at 1/0 and default inits would hide a swap
            p.add_(0.2 * torch.randn_like(p) if p.ndim == 1 else 0.0 * p)
    return model


@pytest.mark.torch
def test_encode_and_decode_match_ldm_reference(torch_ldm):
    import torch

    vae = va_vae(**TINY)
    params = vae_torch_to_flax(torch_ldm.state_dict(), vae)
    assert "attentions_1" in params["encoder"]["down_blocks_2"]  # attention after each resnet
    assert "attentions_2" in params["decoder"]["up_blocks_0"]
    assert "attentions_0" not in params["encoder"]["down_blocks_1"]
    images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    latents = np.random.default_rng(1).normal(size=(2, 8, 8, 8)).astype(np.float32)
    with torch.no_grad():
        mean_ref, logvar_ref = torch_ldm.encode(torch.from_numpy(images).permute(0, 3, 1, 2))
        decoded_ref = torch_ldm.decode(torch.from_numpy(latents).permute(0, 3, 1, 2))
    mean, logvar = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))(params, images)
    decoded = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))(params, latents)
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    assert mean.shape == (2, 8, 8, 8) and decoded.shape == (2, 32, 32, 3)
    assert relative_error(mean, nhwc(mean_ref)) < 1e-4
    assert relative_error(logvar, nhwc(logvar_ref)) < 1e-4
    assert relative_error(decoded, nhwc(decoded_ref)) < 1e-4

    # And back: the same keys, shapes and values under LDM's names.
    back = vae_flax_to_torch(params, "ldm")
    state = torch_ldm.state_dict()
    assert back.keys() == state.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


@pytest.mark.torch
def test_release_keys_and_shapes_convert(tmp_path):
    """The full f16d32 key set (the release's names and shapes), wrapped as a Lightning
    checkpoint with its training-only entries, loads and converts; a missing key is named."""
    torch = pytest.importorskip("torch")
    from tests.ldm_reference import AutoencoderKL

    reference = AutoencoderKL()  # the release's ddconfig
    state = reference.state_dict()
    assert {"encoder.down.4.attn.1.q.weight", "decoder.up.4.attn.2.proj_out.weight",
            "decoder.up.3.block.0.nin_shortcut.weight", "encoder.mid.attn_1.norm.weight",
            "quant_conv.weight", "post_quant_conv.bias"} <= state.keys()
    assert "encoder.down.3.attn.0.q.weight" not in state
    training_only = {"loss.logvar": torch.zeros(()), "linear_proj.weight": torch.zeros(768, 32, 1, 1),
                     "foundation_model.model.cls_token": torch.zeros(1, 1, 768)}
    path = tmp_path / "vavae-imagenet256-f16d32-dinov2.pt"
    torch.save({"state_dict": {**state, **training_only}, "global_step": 1}, path)

    loaded = load_vae_weights(path)
    assert loaded.keys() == state.keys()
    vae = va_vae()
    params = vae_torch_to_flax(loaded, vae)
    abstract = jax.eval_shape(lambda x: vae.init(jax.random.key(0), x), jnp.zeros((1, 256, 256, 3)))
    assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, abstract["params"])
    count = sum(p.numel() for p in reference.parameters())
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == count

    del loaded["decoder.up.4.attn.2.k.weight"]
    with pytest.raises(ValueError, match=r"1 missing keys.*\n  decoder\.up\.4\.attn\.2\.k\.weight \(512, 512, 1, 1\)"):
        vae_torch_to_flax(loaded, vae)


@pytest.mark.slow
@pytest.mark.torch
def test_release_converts_with_one_command_and_back(tmp_path, capsys):
    """vae-from-torch on a random state dict with the release's names and shapes, then
    vae-to-torch: the same tensors come back; --vae_weights reads the folder as a va-vae only."""
    torch = pytest.importorskip("torch")
    from dico_jax.convert.__main__ import main
    from dico_jax.errors import UserError
    from dico_jax.convert.vae import load_vae
    from tests.ldm_reference import AutoencoderKL

    torch.manual_seed(1)
    state = AutoencoderKL().state_dict()
    src, folder, back = tmp_path / "vavae.pt", tmp_path / "vavae-f16d32", tmp_path / "back.pt"
    torch.save({"state_dict": {**state, "loss.logvar": torch.zeros(())}}, src)
    assert main(["vae-from-torch", "--vae", "va-vae", "--src", str(src), "--out", str(folder)]) == 0
    assert "va-vae" in capsys.readouterr().out
    module, params = load_vae(str(folder), kind="va-vae")
    assert (module.latent_channels, module.downsample_factor, tuple(module.attention_levels)) == (32, 16, (4,))
    with pytest.raises(UserError, match="holds a va-vae but the data are sd-vae latents"):
        load_vae(str(folder), kind="sd-vae")

    assert main(["vae-to-torch", "--src", str(folder), "--out", str(back)]) == 0
    restored = torch.load(back, weights_only=True)
    assert restored.keys() == state.keys()
    for key in ("encoder.down.4.attn.0.q.weight", "decoder.up.1.block.0.nin_shortcut.weight", "quant_conv.bias"):
        np.testing.assert_array_equal(restored[key].numpy(), state[key].numpy(), err_msg=key)
    assert main(["vae-to-torch", "--src", str(tmp_path), "--out", str(back)]) == 2
    assert "not a converted VAE folder" in capsys.readouterr().err

