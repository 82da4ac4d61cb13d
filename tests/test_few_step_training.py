"""The few-step objectives (`config.diffusion.kind` "meanflow" and "shortcut") through the
project: training on the digits with a tiny DiCo on the 8 fake CPU devices, bit-exact
resumption, evaluation during training and sampling in 1, 2 and 4 network evaluations by the
project's one sampler, and the config errors of the new fields.

One short run per objective is shared by the module's tests (quality is measured by
longer runs: docs/fewstep.md). Compiling a train step with the JVP through the network takes
most of a minute on two cores, so the tests on a run are `long`; the config checks and the
objectives' maths (tests/test_meanflow.py, tests/test_shortcut.py) run by default.
"""
import json
import os
import sys

import jax
import numpy as np
import pytest

from dico_jax import builders, errors, train
from dico_jax import sampling as sample_lib
from dico_jax.data import digits

from tests.test_train import TINY, assert_trees_equal, host, read_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import digits as digits_config  # noqa: E402

NUM_STEPS = 12
KINDS = ("meanflow", "shortcut")


@pytest.fixture(scope="module", autouse=True)
def _compile_once(compilation_cache):
    yield compilation_cache


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("digits"))
    digits.build_digits_dataset(path)
    return path


def tiny_config(kind, data_dir, **overrides):
    config = digits_config.get_config(kind)
    fields = {**TINY, "num_train_steps": NUM_STEPS, "data.dir": data_dir, "warmup_steps": 0,
              # The run evaluates itself once at its end, with the objective's sampler.
              "eval.every_steps": NUM_STEPS, "keep_every_steps": NUM_STEPS,
              "eval.num_samples": 32, "eval.batch_size": 32, **overrides}
    config.update_from_flattened_dict(fields)
    return config


@pytest.fixture(scope="module", params=KINDS)
def straight_run(request, digits_dir, tmp_path_factory):
    kind = request.param
    workdir = str(tmp_path_factory.mktemp(f"{kind}_straight"))
    state = train.train_and_evaluate(tiny_config(kind, digits_dir), workdir)
    return kind, workdir, host(state.to_dict()), read_losses(workdir)


@pytest.mark.long
def test_resume_is_bitwise_exact(digits_dir, straight_run, tmp_path):
    kind, _, ref_state, ref_losses = straight_run
    assert sorted(ref_losses) == list(range(1, NUM_STEPS + 1))
    assert all(np.isfinite(v) for values in ref_losses.values() for v in values)
    workdir = str(tmp_path)
    train.train_and_evaluate(tiny_config(kind, digits_dir, num_train_steps=6,
                                         **{"eval.every_steps": 0}), workdir)
    state = train.train_and_evaluate(tiny_config(kind, digits_dir), workdir)
    assert read_losses(workdir) == ref_losses, kind
    assert_trees_equal(host(state.to_dict()), ref_state)


@pytest.mark.long
def test_the_network_takes_the_second_time_and_no_variance(straight_run):
    kind, workdir, state, _ = straight_run
    source = sample_lib.load_source(workdir=workdir)
    assert source.config["diffusion"]["kind"] == kind
    assert source.config["model"]["out_channels"] == 1
    assert builders.build_model(source.config).second_time
    assert {"h_embedder_1", "h_embedder_2", "h_embedder_3"} <= set(state["params"])


@pytest.mark.long
def test_the_run_evaluates_itself_in_one_step(straight_run):
    kind, workdir, _, _ = straight_run
    with open(os.path.join(workdir, "eval", f"{NUM_STEPS}.json")) as f:
        result = json.load(f)
    assert (result["sampling"]["sampler"], result["sampling"]["num_steps"]) == (kind, 1)
    assert result["num_samples"] == 32 and np.isfinite(result["fid"])


@pytest.mark.long
def test_samples_in_one_two_and_four_evaluations(straight_run, tmp_path):
    kind, workdir, _, _ = straight_run
    # The online weights: after a few steps the EMA is still near the zero-initialised output.
    source = sample_lib.load_source(workdir=workdir, use_ema=False)
    images = {}
    for steps, cfg_scale in ((1, 1.0), (2, 1.0), (4, 1.0), (1, 2.0)):
        settings = sample_lib.Settings(
            num_samples=16, batch_size=16, seed=0, cfg_scale=cfg_scale, guidance_channels=None,
            sampler=kind, respacing="", labels=tuple(range(10)), num_steps=steps)
        out = tmp_path / f"{steps}_{cfg_scale}.npz"
        sample_lib.generate(source, settings, str(out), progress=False)
        with np.load(out) as f:
            assert f["arr_0"].shape == (16, 8, 8, 1) and f["arr_0"].dtype == np.uint8
            images[steps, cfg_scale] = f["arr_0"]
    # Each step count and the guided sampler give other images from the same noise.
    keys = list(images)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not np.array_equal(images[a], images[b]), (a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_config_errors_name_the_field(kind, digits_dir):
    def check(message, **overrides):
        with pytest.raises(errors.UserError, match=message):
            train.validate_config(tiny_config(kind, digits_dir, **overrides), num_devices=8)

    check("config.diffusion.learn_sigma", **{"diffusion.learn_sigma": True,
                                             "model.in_channels": 1})
    check("config.sampling.guidance_interval", **{"sampling.guidance_interval": (0.2, 0.8)})
    check("config.eval.sampler", **{"eval.sampler": "heun"})
    if kind == "shortcut":
        check("config.sampling.num_steps=3", **{"sampling.num_steps": 3})
        check("config.diffusion.shortcut.denoise_steps", **{"diffusion.shortcut.denoise_steps": 96})
    else:
        check("config.diffusion.meanflow.ratio_r_neq_t",
              **{"diffusion.meanflow.ratio_r_neq_t": 1.5})
