"""Weight conversion: official names and shapes, PyTorch parity, round trips, bad input."""
import argparse

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dico_jax.convert import (flax_to_torch, load_torch_checkpoint, official_shapes,  # noqa: E402
                              torch_to_flax)
from dico_jax.models import MODEL_NAMES, get_model  # noqa: E402
from tests.test_models import official_rows, random_params  # noqa: E402
from dico_jax.convert.torch_reference import TorchDiCo, randomize_  # noqa: E402

pytestmark = pytest.mark.torch
TINY = dict(hidden_size=16, depths=(1, 2, 1, 2, 1), in_channels=4, num_classes=10)


@pytest.fixture(scope="module")
def torch_model():
    m = TorchDiCo(16, (1, 2, 1, 2, 1), in_channels=4, num_classes=10)
    return randomize_(m, seed=0).eval()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_names_and_shapes_are_official(name):
    expected = {r["key"]: tuple(int(s) for s in r["shape"].strip("()").split(",") if s.strip())
                for r in official_rows(name)}
    assert official_shapes(name) == expected


def test_torch_reference_has_official_names(torch_model):
    ours = official_shapes("DiCo-S", **TINY)
    theirs = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    assert list(ours) == list(theirs)
    assert ours == theirs


@pytest.mark.parametrize("depthwise_impl", ["conv", "shift"])
def test_forward_parity_with_pytorch(torch_model, depthwise_impl):
    """Same weights (zero-init layers randomized too), fp32, random inputs: 1e-5 relative."""
    params = torch_to_flax(torch_model.state_dict(), "DiCo-S", **TINY)
    model = get_model("DiCo-S", **TINY, depthwise_impl=depthwise_impl)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 16, 16, 4)).astype(np.float32)
    t = np.array([0, 417, 999])
    y = np.array([2, 10, 7])  # 10 = null label
    ours = np.asarray(jax.jit(model.apply)({"params": params}, x, t, y))
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                          torch.from_numpy(y)).permute(0, 2, 3, 1).numpy()
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert np.abs(ref).mean() > 0.1  # the comparison sees a non-trivial output
    assert rel < 1e-5, rel


def test_round_trip_is_bit_exact(torch_model):
    params = torch_to_flax(torch_model.state_dict(), "DiCo-S", **TINY)
    back = flax_to_torch(params, "DiCo-S", **TINY)
    again = torch_to_flax(back, "DiCo-S", **TINY)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(a, b)
    for k, v in torch_model.state_dict().items():
        assert torch.equal(back[k], v), k
    # Exported weights load strictly into the PyTorch model.
    fresh = TorchDiCo(16, (1, 2, 1, 2, 1), in_channels=4, num_classes=10)
    fresh.load_state_dict(back, strict=True)


def test_load_official_checkpoint_formats(tmp_path, torch_model):
    sd = torch_model.state_dict()
    ema = {k: v + 1.0 for k, v in sd.items()}
    full = tmp_path / "0050000.pt"
    torch.save({"model": sd, "ema": ema, "opt": {"state": {}}, "args": argparse.Namespace(model="DiCo-S")},
               full)
    p_ema = load_torch_checkpoint(full, "DiCo-S", **TINY)
    p_model = load_torch_checkpoint(full, "DiCo-S", use_ema=False, **TINY)
    np.testing.assert_array_equal(p_ema["x_embedder"]["bias"], sd["x_embedder.proj.bias"].numpy() + 1)
    np.testing.assert_array_equal(p_model["x_embedder"]["bias"], sd["x_embedder.proj.bias"].numpy())

    bare = tmp_path / "bare.pt"
    torch.save({f"module.{k}": v for k, v in sd.items()}, bare)
    np.testing.assert_array_equal(load_torch_checkpoint(bare, "DiCo-S", **TINY)["latent"]["conv2"]["kernel"],
                                  p_model["latent"]["conv2"]["kernel"])

    from safetensors.torch import save_file

    st = tmp_path / "w.safetensors"
    save_file(dict(sd), str(st))
    np.testing.assert_array_equal(load_torch_checkpoint(st, "DiCo-S", **TINY)["final_layer"]["out_proj"]["kernel"],
                                  p_model["final_layer"]["out_proj"]["kernel"])

    no_ema = tmp_path / "no_ema.pt"
    torch.save({"model": sd, "opt": {}}, no_ema)
    with pytest.raises(KeyError, match="no 'ema'"):
        load_torch_checkpoint(no_ema, "DiCo-S", **TINY)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_torch_checkpoint(tmp_path / "missing.pt", "DiCo-S", **TINY)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_torch_checkpoint(junk, "DiCo-S", **TINY)


def test_mismatched_state_dict_names_offenders(torch_model):
    sd = dict(torch_model.state_dict())
    del sd["latent.0.ca.1.weight"]
    sd["latent.0.extra.weight"] = torch.zeros(3)
    sd["encoder_level_1.0.conv4.weight"] = torch.zeros(5, 16, 1, 1)
    with pytest.raises(ValueError) as err:
        torch_to_flax(sd, "DiCo-S", **TINY)
    msg = str(err.value)
    assert "1 missing keys (expected shape):\n  latent.0.ca.1.weight (64, 64, 1, 1)" in msg
    assert "1 unexpected keys (found shape):\n  latent.0.extra.weight (3,)" in msg
    assert "encoder_level_1.0.conv4.weight: expected (32, 16, 1, 1), found (5, 16, 1, 1)" in msg


def test_wrong_model_size_is_reported(torch_model):
    with pytest.raises(ValueError, match="state_dict for DiCo-S"):
        torch_to_flax(torch_model.state_dict(), "DiCo-S")
    with pytest.raises(ValueError, match="valid names"):
        torch_to_flax(torch_model.state_dict(), "DiCo-M")


def test_flax_to_torch_rejects_wrong_tree():
    params = jax.tree_util.tree_map(np.asarray, random_params(get_model("DiCo-S", **TINY)))
    params["latent"]["conv1"]["kernel"] = np.zeros((1, 3, 3))
    with pytest.raises(ValueError, match="latent/conv1/kernel: expected"):
        flax_to_torch(params, "DiCo-S", **TINY)
