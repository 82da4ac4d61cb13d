"""LightningDiT's recipe: the Table 13 preset, the velocity-direction (cosine) loss term and the
sampling-only timestep shift."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dico_jax import builders
from dico_jax.diffusion.flow import FlowMatching, cosine_similarity
from dico_jax.diffusion.flow_sampling import time_grid


def test_lightningdit_preset_builds_the_table13_network():
    from configs import lightningdit
    from dico_jax import builders
    from dico_jax.data import spec
    from dico_jax.models import abstract_params, count_params

    config = lightningdit.get_config()
    assert spec.from_config(config).latent_shape == (16, 16, 32)
    config.model.in_channels = config.model.out_channels = 32
    config.model.num_classes = 1000
    model = builders.build_model(config)
    params = count_params(abstract_params(model, 16, 16))
    assert abs(params / 679e6 - 1) < 0.001, params  # the paper's 679M
    assert builders.build_flow(config).time_sampling == "logit_normal"
    assert (config.adam_b2, config.learning_rate, config.global_batch_size) == (0.95, 2e-4, 1024)
    flow = builders.build_flow(config)
    assert (flow.cosine_weight, flow.shift) == (1.0, 1.0)
    assert flow.sampling_shift == pytest.approx(1 / 0.3)


@pytest.mark.slow
@pytest.mark.torch
def test_cosine_term_matches_torch_and_adds_to_the_loss():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    a, b = (rng.normal(size=(3, 4, 5, 6)).astype(np.float32) for _ in range(2))
    a[0, 0, 0] = 0.0  # a zero vector: torch floors the norm at eps
    want = torch.nn.functional.cosine_similarity(torch.from_numpy(a).permute(0, 3, 1, 2),
                                                 torch.from_numpy(b).permute(0, 3, 1, 2), dim=1)
    np.testing.assert_allclose(cosine_similarity(a, b), want.numpy(), rtol=1e-5, atol=1e-6)

    x, noise = jnp.asarray(a), jnp.asarray(b)
    t = jnp.array([0.2, 0.5, 0.9])
    model_fn = lambda x_t, _: 0.5 * x_t + 0.1  # noqa: E731
    plain = FlowMatching(time_sampling="logit_normal").training_losses(model_fn, x, t, noise)
    terms = FlowMatching(time_sampling="logit_normal", cosine_weight=0.5).training_losses(model_fn, x, t, noise)
    out, target = model_fn(x * t[:, None, None, None] + (1 - t[:, None, None, None]) * noise, None), x - noise
    cos = np.mean(1 - np.asarray(cosine_similarity(out, target)), axis=(1, 2))
    np.testing.assert_allclose(terms["cos"], cos, rtol=1e-5)
    np.testing.assert_allclose(terms["mse"], plain["mse"], rtol=1e-6)
    np.testing.assert_allclose(terms["loss"], plain["loss"] + 0.5 * cos, rtol=1e-5)
    # At a zero output (the zero-initialised output layer) the gradient stays finite.
    grad = jax.grad(lambda o: jnp.sum(1 - cosine_similarity(o, target)))(jnp.zeros_like(target))
    assert np.isfinite(np.asarray(grad)).all()
    with pytest.raises(ValueError, match="needs velocity prediction"):
        FlowMatching(prediction="noise", cosine_weight=1.0)


def test_sampling_shift_is_lightningdits_timestep_shift():
    """LightningDiT maps its Euler grid t_n to 0.3 t_n / (1 + (0.3 - 1) t_n)
    (transport/integrators.py); training times stay unshifted."""
    flow = FlowMatching(sample_shift=1 / 0.3)
    grid = np.linspace(0, 1, 251)
    np.testing.assert_allclose(time_grid(250, shift=flow.sampling_shift), 0.3 * grid / (1 - 0.7 * grid),
                               rtol=1e-12, atol=1e-15)
    key = jax.random.key(0)
    np.testing.assert_array_equal(flow.sample_time(key, 64), FlowMatching().sample_time(key, 64))
    assert FlowMatching(shift=2.0).sampling_shift == 2.0


# A tiny VA-VAE with the real one's five levels (so 16x downsampling: 64x64 digits images ->
# 4x4x4 latents) and attention at the last level.
TINY_VAVAE = dict(block_out_channels=(4, 4, 4, 4, 8), layers_per_block=1, latent_channels=4,
                  norm_num_groups=2)


def _digits_tree(root, per_class=8, classes=2):
    """The first digits of each class as 64x64 RGB PNGs in class folders."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    for c in range(classes):
        (root / f"digit{c}").mkdir(parents=True)
        for i, image in enumerate(bunch.images[bunch.target == c][:per_class]):
            pixels = np.uint8(np.round(image * 255 / 16)).repeat(8, 0).repeat(8, 1)
            Image.fromarray(np.stack([pixels] * 3, -1)).save(root / f"digit{c}" / f"{i}.png")
    return str(root)


def _tiny_vavae_folder(path):
    """Random tiny VA-VAE params, drawn with numpy (no initializer compile), saved as a
    vae-from-torch folder of kind va-vae."""
    from dico_jax.convert.vae import ARCHITECTURE_FIELDS
    from dico_jax.models.vae import va_vae
    from dico_jax.convert.vae import save_converted

    vae = va_vae(**TINY_VAVAE)
    shapes = jax.eval_shape(vae.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        if path[-1].key == "kernel":
            return rng.normal(size=leaf.shape).astype(np.float32) / np.sqrt(np.prod(leaf.shape[:-1]))
        return ((path[-1].key == "scale") + 0.1 * rng.normal(size=leaf.shape)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    save_converted(str(path), params, "va-vae", {f: getattr(vae, f) for f in ARCHITECTURE_FIELDS})
    return str(path)


# Minutes on a loaded 2-core host (extraction, a train step, the sampler and the VA-VAE
# decoder each compiled); the default suite covers its parts: extraction with statistics and
# the normalising pipeline (test_latent_stats.py), the preset, cosine term and shift above.
@pytest.mark.long
def test_tiny_vavae_and_dico_train_sample_decode_and_evaluate_end_to_end(tmp_path, compilation_cache):
    """Digits images -> VA-VAE latents with their statistics -> the LightningDiT recipe on a
    tiny DiCo (normalised latents, cosine term) -> samples denormalised and decoded (the
    end-of-run grid goes through the sampler and decode that sampling and evaluation use) ->
    the evaluation during training scores the trained weights."""
    from configs import lightningdit
    from dico_jax import sampling as sample_lib
    from dico_jax import train
    from dico_jax.data import extract, imagenet
    from PIL import Image

    vae_dir = _tiny_vavae_folder(tmp_path / "vavae")
    encode_fn, vae_params = extract.vae_encoder(vae_dir, "float32", "va-vae")
    manifest = extract.extract_latents(
        imagenet.FolderSource(_digits_tree(tmp_path / "digits")), str(tmp_path / "latents"),
        encode_fn=encode_fn, params=vae_params, image_size=64, scale_factor=1.0,
        vae_name="tiny-vavae", vae_kind="va-vae", latent_stats=True, batch_size=8,
        shard_size=8, show_progress=False)
    assert manifest.latent_shape == (4, 4, 4) and manifest.kind == "va-vae"
    assert min(manifest.latent_std) > 0

    config = lightningdit.get_config()
    config.model.hidden_size = 16
    config.model.depths = (1, 1, 1, 1, 1)
    config.resolution = 64
    config.dtype = "float32"
    config.data.dir = str(tmp_path / "latents")
    config.vae_weights = vae_dir
    config.global_batch_size = 8
    config.num_train_steps = 3
    config.log_every_steps = 1
    config.checkpoint_every_steps = 3
    config.keep_every_steps = 0
    config.sample_at_end = True
    config.sampling.num_steps = 2
    config.sampling.grid_classes = 2
    config.sampling.grid_per_class = 2
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    grid = np.asarray(Image.open(os.path.join(workdir, "samples.png")))
    assert grid.ndim == 3 and grid.shape[-1] == 3 and grid.std() > 0

    # Sampling a checkpoint without the dataset: the statistics come with the run.
    source = sample_lib.load_source(workdir=workdir)
    config_only = {**source.config, "data": {**source.config["data"], "dir": ""}}
    space = sample_lib.image_space(config_only, workdir)
    assert (space.vae_kind, space.latent_shape) == ("va-vae", (4, 4, 4))
    assert space.latent_std == pytest.approx(manifest.latent_std)
    assert space.latent_mean == pytest.approx(manifest.latent_mean)

    # Evaluation of the trained weights as evaluation during training does it: samples drawn
    # with the run's sampler, denormalised with the run's statistics, decoded by the VA-VAE and
    # scored with an Inception network (random weights, drawn on the host) against images.
    from dico_jax.convert.vae import load_vae
    from dico_jax.evaluation import during_training, inception

    shapes = jax.eval_shape(inception.FIDInceptionV3().init, jax.random.key(2),
                            jnp.zeros((1, 64, 64, 3), jnp.uint8))
    rng = np.random.default_rng(2)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            return (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(s.dtype)
        return (np.ones if "var" in name or "scale" in name else np.zeros)(s.shape, s.dtype)

    reference = tmp_path / "reference.npz"
    np.savez(reference, arr_0=rng.integers(0, 256, (12, 64, 64, 3), np.uint8))
    import ml_collections

    config = ml_collections.ConfigDict(source.config)  # the run's, as resolved from its data
    config.eval.reference = str(reference)
    config.eval.num_samples = 8
    config.eval.batch_size = 8
    config.eval.num_steps = 2
    evaluator = during_training.Evaluator.from_config(
        config, workdir, space, vae=load_vae(vae_dir, "float32", "va-vae"),
        inception_variables=jax.tree_util.tree_map_with_path(draw, shapes))
    result = evaluator.evaluate(source.params, 3)
    for key in ("fid", "sfid", "is", "precision", "recall"):
        assert np.isfinite(result[key]), key
    assert result["num_samples"] == 8
