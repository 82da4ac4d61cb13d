"""Whole-checkpoint import/export: official .pt -> Orbax -> official .pt, and bad input."""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dico_jax import checkpoint as ckpt_lib  # noqa: E402
from dico_jax.convert import checkpoints  # noqa: E402
from dico_jax.convert.dico import official_shapes  # noqa: E402
from dico_jax.convert.torch_reference import TorchDiCo, randomize_  # noqa: E402

pytestmark = pytest.mark.torch
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = dict(hidden_size=16, depths=[1, 2, 1, 1, 1])
OVERRIDES = {"hidden_size": 16, "depths": [1, 2, 1, 1, 1]}


def tiny_torch(seed):
    return randomize_(TorchDiCo(16, (1, 2, 1, 1, 1), in_channels=4, num_classes=10), seed=seed)


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """An official training checkpoint: {"model", "ema", "opt", "args"} named by its step."""
    model, ema = tiny_torch(0), tiny_torch(1)
    path = str(tmp_path_factory.mktemp("official") / "0001234.pt")
    opt = torch.optim.AdamW(model.parameters())
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "args": argparse.Namespace(model="DiCo-S", image_size=256)}, path)
    return path, model.state_dict(), ema.state_dict()


@pytest.fixture(scope="module")
def imported(official_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("imported") / "ckpt")
    report = checkpoints.import_torch_checkpoint(official_file[0], out, "DiCo-S", OVERRIDES)
    return out, report


def assert_state_dicts_equal(found, expected, ordered=True):
    if ordered:
        assert list(found) == list(expected)  # the official order too
    assert set(found) == set(expected)
    for key, value in expected.items():
        assert found[key].dtype == value.dtype, key
        assert torch.equal(found[key], value), key


def test_from_torch_writes_a_training_checkpoint(imported):
    out, report = imported
    assert report.step == 1234 and ckpt_lib.saved_steps(out) == [1234]
    assert report.params_from == "'model'" and report.ema_from == "'ema'"
    state, step = ckpt_lib.restore_to_host(out)
    assert step == 1234 and int(state["step"]) == 1234
    config = ckpt_lib.read_config(out)
    assert config["model"]["name"] == "DiCo-S" and config["model"]["hidden_size"] == 16
    assert list(config["model"]["depths"]) == [1, 2, 1, 1, 1]
    assert (config["model"]["in_channels"], config["model"]["out_channels"],
            config["model"]["num_classes"]) == (4, 8, 10)
    assert config["diffusion"]["learn_sigma"] is True and config["resolution"] == 256
    # The stacked level of two blocks holds both layers.
    assert state["params"]["encoder_level_2"]["conv1"]["kernel"].shape[0] == 2


def test_round_trip_is_bit_exact_and_loads_strictly(official_file, imported, tmp_path):
    _, model_sd, ema_sd = official_file
    out = str(tmp_path / "exported.pt")
    done = subprocess.run([sys.executable, "-m", "dico_jax.convert", "to-torch",
                           f"--checkpoint={imported[0]}", f"--out={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DiCo-S step 1234 (model + ema)" in done.stdout
    exported = torch.load(out, map_location="cpu", weights_only=True)
    assert set(exported) == {"model", "ema"}
    assert_state_dicts_equal(exported["model"], model_sd)
    assert_state_dicts_equal(exported["ema"], ema_sd)
    # The official loader's path: take "ema", load strictly into the official module.
    fresh = TorchDiCo(16, (1, 2, 1, 1, 1), in_channels=4, num_classes=10)
    fresh.load_state_dict(exported["ema"], strict=True)


def test_safetensors_and_raw_exports(official_file, imported, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    _, model_sd, ema_sd = official_file
    report = checkpoints.export_torch_checkpoint(imported[0], str(tmp_path / "dico.pt"),
                                                 safetensors=True)
    assert report.files == (str(tmp_path / "dico.model.safetensors"),
                            str(tmp_path / "dico.ema.safetensors"))
    # safetensors files store their tensors sorted by name.
    assert_state_dicts_equal(load_file(report.files[1]), ema_sd, ordered=False)
    with safe_open(report.files[0], framework="pt") as f:
        assert f.metadata() == {"model": "DiCo-S", "step": "1234", "weights": "model"}
    TorchDiCo(16, (1, 2, 1, 1, 1), in_channels=4, num_classes=10).load_state_dict(
        load_file(report.files[0]), strict=True)

    raw = checkpoints.export_torch_checkpoint(os.path.join(imported[0], "1234"),
                                              str(tmp_path / "raw.pt"), use_ema=False)
    assert raw.weights == ("model",)
    assert_state_dicts_equal(torch.load(raw.files[0], weights_only=True), model_sd)


def test_bare_state_dict_becomes_params_and_ema(tmp_path):
    sd = tiny_torch(3).state_dict()
    src = str(tmp_path / "weights.pt")
    torch.save(sd, src)
    report = checkpoints.import_torch_checkpoint(src, str(tmp_path / "ckpt"), "DiCo-S", OVERRIDES)
    assert report.step == 0 and report.params_from == report.ema_from == "the bare state_dict"
    assert "params and ema_params are equal" in report.summary()
    state, _ = ckpt_lib.restore_to_host(str(tmp_path / "ckpt"))
    np.testing.assert_array_equal(state["params"]["x_embedder"]["kernel"],
                                  state["ema_params"]["x_embedder"]["kernel"])
    np.testing.assert_array_equal(state["params"]["x_embedder"]["kernel"],
                                  sd["x_embedder.proj.weight"].numpy().transpose(2, 3, 1, 0))


def test_model_of_another_size_names_both(official_file, tmp_path):
    with pytest.raises(ValueError, match=r"0001234.pt holds a DiCo with hidden_size=16.* but "
                                         r"DiCo-XL has hidden_size=416"):
        checkpoints.import_torch_checkpoint(official_file[0], str(tmp_path / "x"), "DiCo-XL")
    # Official shapes of DiCo-S (never allocated: describe_state_dict reads shapes only).
    official_s = {k: np.broadcast_to(np.float32(0), shape)
                  for k, shape in official_shapes("DiCo-S").items()}
    arch = checkpoints.describe_state_dict(official_s)
    assert checkpoints.identify_model(arch) == "DiCo-S"
    assert arch["depths"] == (5, 4, 4, 4, 4) and arch["num_classes"] == 1000
    with pytest.raises(ValueError, match=r"x.pt holds DiCo-S \(hidden_size=128.*\), but DiCo-XL "
                                         r"has hidden_size=416.*use --model DiCo-S"):
        checkpoints.check_model_size(arch, "DiCo-XL", {}, "x.pt")


def test_files_that_are_not_checkpoints(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pt is not a PyTorch checkpoint"):
        checkpoints.import_torch_checkpoint(str(text), str(tmp_path / "a"), "DiCo-S")
    as_json = tmp_path / "config.pt"
    as_json.write_text('{"model": "DiCo-S"}')
    done = subprocess.run([sys.executable, "-m", "dico_jax.convert", "from-torch", "--model=DiCo-S",
                           f"--src={as_json}", f"--out={tmp_path / 'j'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("dico_jax.convert: error: ") and "config.pt is not a PyTorch" in lines[-1]
    assert "weights_only" not in done.stderr and "Traceback" not in done.stderr
    other = tmp_path / "resnet.pt"
    torch.save(torch.nn.Conv2d(3, 8, 3).state_dict(), other)
    with pytest.raises(ValueError, match=r"resnet.pt holds no DiCo weights.*found 2 entries "
                                         r"\(bias, weight\)"):
        checkpoints.import_torch_checkpoint(str(other), str(tmp_path / "b"), "DiCo-S")
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        checkpoints.import_torch_checkpoint(str(tmp_path / "gone.pt"), str(tmp_path / "c"), "DiCo-S")
    with pytest.raises(NotADirectoryError, match="notes.pt is a file"):
        checkpoints.export_torch_checkpoint(str(text), str(tmp_path / "d.pt"))


def test_non_finite_weights_are_refused_unless_kept(tmp_path):
    model = tiny_torch(2)
    state = model.state_dict()
    state["final_layer.out_proj.weight"][0, 0] = float("nan")
    src = str(tmp_path / "0000010.pt")
    torch.save({"model": state, "ema": state}, src)
    with pytest.raises(ValueError, match=r"parameter arrays hold NaN.*--keep_non_finite"):
        checkpoints.import_torch_checkpoint(src, str(tmp_path / "a"), "DiCo-S", OVERRIDES)
    assert not os.path.exists(tmp_path / "a")
    report = checkpoints.import_torch_checkpoint(src, str(tmp_path / "a"), "DiCo-S", OVERRIDES,
                                                 keep_non_finite=True)
    with pytest.raises(ValueError, match=r"a/10: .*NaN or infinite"):
        checkpoints.export_torch_checkpoint(report.directory, str(tmp_path / "back.pt"))


def test_missing_ema_and_occupied_output(official_file, imported, tmp_path):
    # A checkpoint with raw weights only.
    state, _ = ckpt_lib.restore_to_host(imported[0])
    directory = str(tmp_path / "raw_only")
    manager = ckpt_lib.TrainCheckpointer(directory, keep=1, async_save=False)
    manager.save(5, {"step": np.int32(5), "params": state["params"]},
                 config=ckpt_lib.read_config(imported[0]))
    manager.wait_until_finished()
    manager.close()
    with pytest.raises(KeyError, match=r"no state items \['ema_params'\]; found \['params', "
                                       r"'step'\].*--no_ema"):
        checkpoints.export_torch_checkpoint(directory, str(tmp_path / "e.pt"))
    report = checkpoints.export_torch_checkpoint(directory, str(tmp_path / "e.pt"), use_ema=False)
    assert_state_dicts_equal(torch.load(report.files[0], weights_only=True), official_file[1])

    with pytest.raises(FileExistsError, match=r"already holds checkpoints of steps \[1234\]"):
        checkpoints.import_torch_checkpoint(official_file[0], imported[0], "DiCo-S", OVERRIDES)


def test_converted_checkpoint_initializes_a_fine_tuning_run(imported, official_file):
    """`config.init_from` takes params and EMA from a from-torch directory; shapes are checked."""
    import jax
    import optax

    from dico_jax import sharding
    from dico_jax.convert import torch_to_flax
    from dico_jax.models import abstract_params, get_model
    from dico_jax.train import load_initial_weights
    from dico_jax.train_step import TrainState

    model = get_model("DiCo-S", in_channels=4, num_classes=10, **OVERRIDES)
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(model, 8, 8))
    fresh = TrainState(step=np.zeros((), np.int32), params=zeros, ema_params=zeros,
                       opt_state=optax.adamw(1e-4).init(zeros))
    mesh = sharding.create_mesh({"data": -1, "fsdp": 1})
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), fresh)
    state = load_initial_weights(fresh, imported[0], shardings)
    expected = torch_to_flax(official_file[2], "DiCo-S", in_channels=4, num_classes=10, **OVERRIDES)
    np.testing.assert_array_equal(state.ema_params["latent"]["conv2"]["kernel"],
                                  expected["latent"]["conv2"]["kernel"])
    assert int(state.step) == 0

    other = get_model("DiCo-S", in_channels=4, num_classes=10, hidden_size=16, depths=(1, 1, 1, 1, 1))
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(other, 8, 8))
    wrong = TrainState(step=np.zeros((), np.int32), params=zeros, ema_params=zeros, opt_state=())
    with pytest.raises(ValueError, match="do not match this config's model"):
        load_initial_weights(wrong, imported[0], jax.tree.map(lambda _: sharding.replicated(mesh), wrong))
