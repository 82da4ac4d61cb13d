"""Flow matching through the project: training, every sampler by name, guidance intervals,
refusal of a sampler of the other objective, export to the PyTorch reference.

The end-to-end test trains the digits flow config (`configs/digits.py:flow`) for a few hundred
steps on the 8 fake CPU devices, samples with Heun and scores the samples with the digits
feature network; an untrained network must fail the same floor.
"""
import dataclasses
import json
import math
import os
import sys

import jax
import numpy as np
import pytest

from dico_jax import builders, train
from dico_jax import sampling as sample_lib
from dico_jax.data import digits
from dico_jax.diffusion import SAMPLERS
from dico_jax.evaluation import digits_features
from dico_jax.models import abstract_params, get_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import digits as digits_config  # noqa: E402

NUM_STEPS = 400
NUM_SAMPLES = 400
# Floors on the digits metrics of NUM_SAMPLES Heun samples after NUM_STEPS steps: a trained
# network clears them with a wide margin, the untrained one (zero output layer: the samples
# are the starting noise) misses both by far.
MAX_FID = 60.0
MIN_ACCURACY = 0.8


def set_fields(config, **fields):
    """`model__hidden_size=16` sets config.model.hidden_size."""
    config.update_from_flattened_dict({k.replace("__", "."): v for k, v in fields.items()})
    return config


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("digits"))
    digits.build_digits_dataset(data_dir)
    workdir = str(tmp_path_factory.mktemp("flow_run"))
    # The demo's settings, shorter, with a shorter EMA to match the shorter run.
    config = set_fields(digits_config.get_config("flow"), data__dir=data_dir,
                        num_train_steps=NUM_STEPS, log_every_steps=100,
                        checkpoint_every_steps=NUM_STEPS, sample_at_end=False,
                        ema_decay=0.98, debug_log_losses=True,
                        # The run evaluates itself once, with the config's own evaluation
                        # sampler (Heun: the objective's), on fewer samples.
                        eval__every_steps=NUM_STEPS, eval__num_samples=200,
                        eval__batch_size=200)
    train.train_and_evaluate(config, workdir)
    return workdir


def heun_settings(**overrides):
    fields = dict(num_samples=NUM_SAMPLES, batch_size=200, seed=0, cfg_scale=3.0,
                  guidance_channels=None, sampler="heun", respacing="", labels=None,
                  num_steps=10)
    fields.update(overrides)
    return sample_lib.Settings(**fields)


def digit_scores(source, out):
    sample_lib.generate(source, heun_settings(), str(out), progress=False)
    with np.load(out) as f:
        return digits_features.digits_metrics(f["arr_0"], labels=f["label"])


def test_trained_flow_model_clears_the_quality_floor(flow_run, tmp_path):
    source = sample_lib.load_source(workdir=flow_run)
    assert source.config["diffusion"]["kind"] == "flow"
    assert source.config["model"]["out_channels"] == 1  # in_channels: no learned variance
    scores = digit_scores(source, tmp_path / "trained.npz")
    assert scores["fid"] < MAX_FID and scores["accuracy"] > MIN_ACCURACY, scores

    model = builders.build_model(source.config)
    untrained = model.init({"params": jax.random.key(0)}, np.zeros((1, 8, 8, 1), np.float32),
                           np.zeros((1,), np.float32), np.zeros((1,), np.int32))["params"]
    scores = digit_scores(dataclasses.replace(source, params=untrained), tmp_path / "untrained.npz")
    assert scores["fid"] > MAX_FID and scores["accuracy"] < MIN_ACCURACY, scores


def test_flow_run_evaluates_itself_with_an_ode_sampler(flow_run):
    with open(os.path.join(flow_run, "eval", f"{NUM_STEPS}.json")) as f:
        result = json.load(f)
    steps = digits_config.get_config("flow").eval.num_steps
    assert (result["sampling"]["sampler"], result["sampling"]["num_steps"]) == ("heun", steps)
    assert result["num_samples"] == 200 and math.isfinite(result["fid"])
    assert result["fid"] < 2 * MAX_FID  # 200 samples, Heun-13: a looser floor than below


def test_flow_metrics_have_no_vb(flow_run):
    with open(os.path.join(flow_run, "losses.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert len(records) == NUM_STEPS
    assert {k for k in records[-1] if k != "step"} == {"loss", "mse", "grad_norm", "lr"}
    assert all(math.isfinite(r["loss"]) for r in records)
    # Velocity prediction: the loss is the MSE, and it falls well below its start.
    assert records[-1]["loss"] == records[-1]["mse"]
    assert np.mean([r["loss"] for r in records[-50:]]) < 0.6 * records[0]["loss"]


def test_flow_checkpoint_exports_to_the_reference_with_in_channels_outputs(flow_run, tmp_path):
    torch = pytest.importorskip("torch")
    from dico_jax.convert import checkpoints
    from dico_jax.convert.torch_reference import TorchDiCo

    report = checkpoints.export_torch_checkpoint(flow_run, str(tmp_path / "flow.pt"))
    state = torch.load(report.files[0], weights_only=True)
    assert state["ema"]["final_layer.out_proj.weight"].shape[0] == 1
    config = sample_lib.load_source(workdir=flow_run).config
    reference = TorchDiCo(config["model"]["hidden_size"], tuple(config["model"]["depths"]),
                          in_channels=1, num_classes=10, learn_sigma=False)
    reference.load_state_dict(state["ema"], strict=True)
    with pytest.raises(RuntimeError, match="size mismatch"):
        TorchDiCo(config["model"]["hidden_size"], tuple(config["model"]["depths"]),
                  in_channels=1, num_classes=10).load_state_dict(state["ema"], strict=True)

    # Back with the run's config (8x8 digits, flow matching): the checkpoint samples as the
    # run does, the same images from the same settings.
    from dico_jax.convert.__main__ import main as convert_main

    back = str(tmp_path / "back")
    assert convert_main(["from-torch", "--config", f"{ROOT}/configs/digits.py:flow", "--src",
                         report.files[0], "--out", back]) == 0
    run, converted = sample_lib.load_source(workdir=flow_run), sample_lib.load_source(
        checkpoint=back)
    assert converted.config["diffusion"]["kind"] == "flow"
    assert converted.config["resolution"] == 8 and converted.config["data"]["builtin"] == "digits"
    settings = heun_settings(num_samples=16, batch_size=16, num_steps=2)
    sample_lib.generate(run, settings, str(tmp_path / "run.npz"), progress=False)
    sample_lib.generate(converted, settings, str(tmp_path / "back.npz"), progress=False)
    with np.load(tmp_path / "run.npz") as a, np.load(tmp_path / "back.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    assert convert_main(["from-torch", "--config", f"{ROOT}/configs/digits.py", "--resolution",
                         "256", "--src", report.files[0], "--out", str(tmp_path / "x")]) == 2


# ---------------------------------------------------------------------------------------------
# Every sampler by name, on tiny random networks (no training).

TINY = dict(hidden_size=16, depths=(1, 1, 1, 1, 1), in_channels=1, num_classes=10)


def tiny_config(kind, sampler, **sampling):
    config = digits_config.get_config("" if kind == "ddpm" else kind)
    for key, value in TINY.items():
        config.model[key] = value
    config.model.out_channels = 2 if kind == "ddpm" else 1
    config.sampling.sampler = sampler
    config.sampling.respacing = "5" if kind == "ddpm" else config.sampling.respacing
    config.sampling.num_steps = 4
    config.sampling.num_samples = 4
    for key, value in sampling.items():
        config.sampling[key] = value
    return config


def draw(config, seed=1):
    model = builders.build_model(config)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: (0.2 * rng.standard_normal(a.shape)).astype(np.float32),
                          abstract_params(model, 8, 8))
    settings = sample_lib.Settings.from_config(config)
    fn = jax.jit(sample_lib.make_sample_fn(model, settings, (8, 8, 1), config=config))
    return np.asarray(fn(params, np.arange(4, dtype=np.int32), sample_lib.batch_key(0, 0)))


KINDS = {name: entry.objective for name, entry in SAMPLERS.items()}
# The samplers of the multi-step objectives (the few-step ones refuse guidance intervals and
# have their own tests: test_shortcut.py, test_few_step_training.py).
MULTI_STEP = sorted(name for name, kind in KINDS.items() if kind in ("ddpm", "flow"))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_dispatches_by_name(name):
    x = draw(tiny_config(KINDS[name], name))
    assert x.shape == (4, 8, 8, 1) and np.isfinite(x).all()


@pytest.mark.parametrize("name", MULTI_STEP)
def test_sampler_of_the_other_objective_is_refused(name):
    other = "ddpm" if KINDS[name] == "flow" else "flow"
    config = tiny_config(other, name)
    with pytest.raises(ValueError, match=rf"config.sampling.sampler='{name}'.*"
                                         rf"config.diffusion.kind='{other}'"):
        sample_lib.Settings.from_config(config)
    settings = sample_lib.Settings.from_config(tiny_config(KINDS[name], name))
    with pytest.raises(ValueError, match=r"config.sampling.sampler"):
        sample_lib.make_sample_fn(builders.build_model(config), settings, (8, 8, 1),
                                  config=config)


def _interval_between_used_steps(config):
    """A flow-time interval whose DDPM steps fall strictly between the sampler's first two."""
    settings = sample_lib.Settings.from_config(config)
    used = np.asarray(builders.build_diffusion(config, settings.respacing).timestep_map)
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    snr = abar / (1.0 - abar)
    flow_time = lambda k: math.sqrt(snr[k]) / (1.0 + math.sqrt(snr[k]))  # noqa: E731 (linear)
    return flow_time(used[1] - 1), flow_time(used[0] + 1)


# One ODE and one DDPM sampler by default; the others compile the same guidance path.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.long)
                                  if n in ("ddim", "heun", "euler_maruyama") else n
                                  for n in MULTI_STEP])
def test_guidance_interval_reaches_every_sampler(name):
    """(0, 1) guides every step; an interval holding none of the sampler's evaluation times
    gives the unguided (cfg 1) samples; guidance does change them."""
    kind = KINDS[name]
    guided = draw(tiny_config(kind, name, cfg_scale=3.0))
    everywhere = draw(tiny_config(kind, name, cfg_scale=3.0, guidance_interval=(0.0, 1.0)))
    unguided = draw(tiny_config(kind, name, cfg_scale=1.0))
    # Flow samplers evaluate at t = 0, 0.25 (Euler-Maruyama 0.32), ...: none in (0.1, 0.2).
    empty = (0.1, 0.2) if kind == "flow" else _interval_between_used_steps(
        tiny_config(kind, name))
    nowhere = draw(tiny_config(kind, name, cfg_scale=3.0, guidance_interval=empty))
    # Equal up to float rounding: the interval's branch compiles to differently fused code.
    scale = np.abs(guided).max()
    np.testing.assert_allclose(everywhere, guided, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(nowhere, unguided, rtol=1e-4, atol=1e-5 * scale)
    assert np.abs(guided - unguided).max() > 1e-2 * scale


def test_guidance_interval_is_checked():
    config = tiny_config("flow", "euler", guidance_interval=(0.7, 0.2))
    with pytest.raises(ValueError, match=r"config.sampling.guidance_interval"):
        sample_lib.Settings.from_config(config)


def test_sampling_overrides_reach_the_flow_settings():
    saved = tiny_config("flow", "heun").to_dict()
    config = sample_lib.apply_overrides(saved, {
        "sampling.sampler": "euler_maruyama", "sampling.num_steps": 30,
        "sampling.guidance_interval": (0.2, 0.9), "sampling.sde.last_step": "none",
        "sampling.sde.diffusion_form": "linear"})
    s = sample_lib.Settings.from_config(config)
    assert (s.sampler, s.num_steps, s.guidance_interval) == ("euler_maruyama", 30, (0.2, 0.9))
    assert s.sde == ("linear", 1.0, None, 0.04)
    assert saved["sampling"]["sde"]["last_step"] == "mean"  # the saved config is left alone
    assert "sde" not in sample_lib.Settings.from_config(saved).record()
    with pytest.raises(ValueError, match=r"config.sampling.sampler='ddim50'.*kind='flow'"):
        sample_lib.Settings.from_config(sample_lib.apply_overrides(
            saved, {"sampling.sampler": "ddim50"}))
