"""Evaluation during training: a digits run scores itself as it trains, a run killed during an
evaluation redoes it once after the restart, a latent run's evaluation runs end to end on tiny
random networks, `tools.evaluate_run` and `tools.scaling` read the results.

The digits runs use a width-16 DiCo on the 8 fake CPU devices of conftest.py.
"""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from dico_jax import errors, train
from dico_jax.evaluation import during_training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import default as default_config  # noqa: E402
from configs import digits as digits_config  # noqa: E402

EVAL_STEPS = (100, 200, 300)
DIGITS = {  # command-line form, shared by the in-process run and the subprocesses
    "model.hidden_size": 16,
    "global_batch_size": 32,
    "num_train_steps": EVAL_STEPS[-1],
    "log_every_steps": 50,
    "checkpoint_every_steps": 100,
    "keep_checkpoints": 1,
    "keep_every_steps": 100,
    "ema_decay": 0.99,
    "sample_at_end": False,
    "eval.every_steps": 100,
    "eval.num_samples": 400,
    "eval.batch_size": 400,
    "eval.respacing": "25",
}


def digits_run_config(**overrides):
    config = digits_config.get_config()
    config.update_from_flattened_dict({**DIGITS, **overrides})
    return config


@pytest.fixture(scope="module", autouse=True)
def _compile_once(compilation_cache):
    """This module's runs and subprocesses share one compilation cache (conftest.py), set up
    before any of them."""
    yield compilation_cache


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("digits_eval"))
    train.train_and_evaluate(digits_run_config(), workdir)
    return workdir


def read_results(workdir):
    results = {}
    for name in os.listdir(during_training.eval_dir(workdir)):
        if name.endswith(".json"):
            with open(os.path.join(during_training.eval_dir(workdir), name)) as f:
                results[int(name[:-5])] = json.load(f)
    return results


def count_scalar_events(workdir, tag):
    """(step -> how many times `tag` was written), over every event file of the run."""
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    from dico_jax.tools import scaling

    counts = {}
    for path in scaling._event_files(workdir):
        for raw in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(raw.numpy())
            if any(v.tag == tag for v in event.summary.value):
                counts[event.step] = counts.get(event.step, 0) + 1
    return counts


@pytest.mark.slow
def test_digits_run_evaluates_itself_and_fid_falls(digits_run):
    from dico_jax.tools import scaling

    results = read_results(digits_run)
    assert sorted(results) == list(EVAL_STEPS)
    for step, result in results.items():
        assert result["step"] == step and result["num_samples"] == DIGITS["eval.num_samples"]
        for key in ("fid", "is", "precision", "recall", "accuracy", "seconds"):
            assert np.isfinite(result[key]), (step, key)
        assert result["sampling"]["cfg_scale"] == 1.0 and result["weights"] == "ema"
    fids = [results[s]["fid"] for s in EVAL_STEPS]
    assert fids[-1] < 0.8 * fids[0], fids
    steps, values = scaling.read_tensorboard_scalars(digits_run, "eval/fid")
    assert list(steps) == list(EVAL_STEPS)
    np.testing.assert_allclose(values, fids, rtol=1e-5)
    for tag in ("eval/is", "eval/precision", "eval/recall", "eval/seconds"):
        assert list(scaling.read_tensorboard_scalars(digits_run, tag)[0]) == list(EVAL_STEPS)


@pytest.mark.slow
def test_evaluate_run_redoes_only_missing_steps(digits_run):
    from dico_jax.tools import evaluate_run

    os.remove(during_training.result_path(digits_run, 200))
    before = read_results(digits_run)
    done = evaluate_run.evaluate_run(digits_run, {})
    assert done == [200]
    after = read_results(digits_run)
    assert sorted(after) == list(EVAL_STEPS)
    assert after[100] == before[100] and after[300] == before[300]
    assert evaluate_run.evaluate_run(digits_run, {}) == []
    with pytest.raises(errors.UserError, match="--config.model.name"):
        evaluate_run.evaluate_run(digits_run, {"model.name": "DiCo-B"})
    # Other settings than the stored results': reported, never silently reused; --force
    # redoes the chosen steps with them.
    fewer = {"eval.respacing": "10"}
    with pytest.raises(errors.UserError, match=r"step\(s\) \[100, 200, 300\].*"
                                               r"sampling.respacing: '25' -> '10'.*--force"):
        evaluate_run.evaluate_run(digits_run, fewer)
    assert evaluate_run.evaluate_run(digits_run, fewer, steps=[300], force=True) == [300]
    redone = read_results(digits_run)
    assert redone[300]["sampling"]["respacing"] == "10" and redone[200] == after[200]
    with pytest.raises(errors.UserError, match=r"step\(s\) \[300\]"):
        evaluate_run.evaluate_run(digits_run, {}, steps=[200, 300])


@pytest.mark.slow
def test_scaling_draws_the_digits_curve(digits_run, tmp_path, capsys):
    from dico_jax.tools import scaling

    out = str(tmp_path / "plots")
    assert scaling.main(["--runs", digits_run, "--no_official", "--out", out]) == 0
    for name in ("eval_vs_step.png", "fid_vs_train_flops.png", "eval.csv"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "eval.csv")) as f:
        rows = f.read().splitlines()
    assert len(rows) == 1 + len(EVAL_STEPS)
    assert "ours vs the paper" in capsys.readouterr().out
    # With the official logs, the paper's Table 8 of their scales comes along.
    with_official = str(tmp_path / "with_official")
    assert scaling.main(["--runs", digits_run, "--out", with_official]) == 0
    assert "the paper's Table 8" in capsys.readouterr().out
    assert os.path.getsize(os.path.join(with_official, "eval_vs_step.png")) > 0


def _main_command(workdir, **overrides):
    flags = {**DIGITS, **overrides}
    return [sys.executable, "-m", "dico_jax.main", "--config=configs/digits.py",
            f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in flags.items()]


# A minute on 2 cores; test_evaluate_run_redoes_only_missing_steps covers redoing missing
# evaluations, the gs:// kill tests a killed run's resume.
@pytest.mark.long
def test_killed_during_evaluation_redoes_it_once(tmp_path, compilation_cache):
    """SIGKILL while step 100 is evaluated; the restart evaluates it from that checkpoint."""
    workdir = str(tmp_path / "run")
    # Several batches make the evaluation long enough to be killed inside it.
    command = _main_command(workdir, num_train_steps=100, **{
        "eval.num_samples": 800, "eval.batch_size": 80, "eval.respacing": "50"})
    env = {**os.environ, **compilation_cache, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    killed = False
    for line in proc.stderr:
        if "evaluation of step 100: 80/800 img" in line:  # its first batch done
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
    proc.wait(timeout=300)
    assert killed, "the run ended before its evaluation"
    assert not os.path.exists(during_training.result_path(workdir, 100))
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "100"))

    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "left unevaluated by an earlier run" in done.stderr
    assert sorted(read_results(workdir)) == [100]
    assert count_scalar_events(workdir, "eval/fid") == {100: 1}
    # A third start finds nothing left to evaluate.
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and "left unevaluated" not in again.stderr
    assert count_scalar_events(workdir, "eval/fid") == {100: 1}


def tiny_latent_config():
    config = default_config.get_config()
    config.model.name = "DiCo-S"
    config.model.hidden_size = 16
    config.model.depths = (1, 1, 1, 1, 1)
    config.model.in_channels = 4
    config.model.out_channels = 8
    config.model.num_classes = 10
    config.resolution = 64
    config.checkpoint_every_steps = 100
    config.eval.every_steps = 100
    config.eval.num_samples = 8
    config.eval.batch_size = 8
    config.eval.respacing = "2"
    return config


def test_latent_run_without_evaluation_files_fails_at_start(tmp_path):
    config = tiny_latent_config()
    with pytest.raises(errors.UserError, match="config.eval.reference is empty"):
        during_training.validate(config, latent=True)
    config.eval.reference = str(tmp_path / "missing.npz")
    with pytest.raises(errors.MissingFile, match="config.eval.reference="):
        during_training.validate(config, latent=True)
    config.eval.every_steps = 150  # not a multiple of the checkpoints
    with pytest.raises(errors.UserError, match="multiple of config.checkpoint_every_steps"):
        during_training.validate(config, latent=True)

    from dico_jax.data import spec as data_spec
    from dico_jax.sampling import grid

    config.sample_every_steps = 1000
    with pytest.raises(errors.UserError, match="config.vae_weights is empty"):
        grid.check_grid_config(config, data_spec.from_config(config))


@pytest.mark.long  # two Inception compilations; the digits evaluation covers the loop by default
def test_latent_evaluation_end_to_end_on_random_networks(tmp_path):
    import jax.numpy as jnp

    from dico_jax import builders
    from dico_jax.data import spec as data_spec
    from dico_jax.evaluation import inception
    from dico_jax.models.vae import AutoencoderKL

    config = tiny_latent_config()
    space = data_spec.from_config(config)
    assert space.vae and space.latent_shape == (8, 8, 4)
    vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    vae_params = vae.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))["params"]
    # Random Inception weights drawn on the host: initialising through the network would
    # compile it once more.
    shapes = jax.eval_shape(inception.FIDInceptionV3().init, jax.random.key(2),
                            jnp.zeros((1, 16, 16, 3), jnp.uint8))
    rng = np.random.default_rng(2)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:  # variance-preserving: unit-scale features through 90 layers
            fan_in = int(np.prod(s.shape[:-1]))
            return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(s.dtype)
        return (np.ones if "var" in name or "scale" in name else np.zeros)(s.shape, s.dtype)

    inception_variables = jax.tree_util.tree_map_with_path(draw, shapes)
    reference = tmp_path / "reference.npz"
    np.savez(reference, arr_0=np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), np.uint8))
    config.eval.reference = str(reference)
    workdir = str(tmp_path / "run")

    model = builders.build_model(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
                        jnp.zeros((1,), jnp.int32))["params"]
    evaluator = during_training.Evaluator.from_config(
        config, workdir, space, vae=(vae, vae_params), inception_variables=inception_variables)
    result = evaluator.evaluate(params, 100)
    for key in ("fid", "sfid", "is", "precision", "recall"):
        assert np.isfinite(result[key]), key
    assert result["num_samples"] == 8 and result["num_reference"] == 12
    with open(during_training.result_path(workdir, 100)) as f:
        assert json.load(f)["fid"] == pytest.approx(result["fid"])
    cache = os.path.join(during_training.eval_dir(workdir), during_training.REFERENCE_CACHE)
    stamp = os.stat(cache).st_mtime_ns
    during_training.reference_cache(str(reference), inception_variables, workdir)
    assert os.stat(cache).st_mtime_ns == stamp  # computed once per run


# A minute on 2 cores; test_sample's VAE tests decode the same sampler's latents, and the
# LightningDiT end-to-end test trains on latents.
@pytest.mark.long
def test_latent_training_grid_is_decoded_with_the_vae(tmp_path):
    import jax.numpy as jnp
    from PIL import Image

    from dico_jax import builders
    from dico_jax.data import spec as data_spec
    from dico_jax.models.vae import AutoencoderKL
    from dico_jax.sampling import grid, sampler

    config = tiny_latent_config()
    config.sampling.respacing = "2"
    config.sampling.grid_classes = 2
    config.sampling.grid_per_class = 3
    space = data_spec.from_config(config)
    vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    vae_params = vae.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))["params"]
    model = builders.build_model(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
                        jnp.zeros((1,), jnp.int32))["params"]
    training_grid = grid.TrainingGrid(model, config, space, sampler.sampling_mesh(),
                                      (vae, vae_params))
    path = training_grid.write(params, str(tmp_path), 7)
    image = np.asarray(Image.open(path))
    # 2 rows x 3 columns of 16x16 RGB images, enlarged to 32x32 cells with 1-pixel gaps,
    # their classes written left of the rows.
    assert image.shape[0] == 2 * 33 + 1 and image.shape[1] > 3 * 33 + 1 and image.shape[2] == 3
    assert (image[:, :image.shape[1] - (3 * 33 + 1)] < 128).any()
    assert os.path.isfile(tmp_path / "samples_00000007.png")
