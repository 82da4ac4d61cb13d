"""Configs: scale/resolution selection, the official recipe, command-line overrides."""
import os

import pytest
from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DICO = os.path.join(ROOT, "configs", "dico.py")
DIGITS = os.path.join(ROOT, "configs", "digits.py")


def parse(*args):
    """Parses `args` with a fresh flag set holding `--config`, as `dico_jax.main` defines it."""
    argv = ["prog", *args]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    return fv.config


def test_dico_scales_and_resolution():
    for scale in ("S", "B", "L", "XL", "H"):
        config = parse(f"--config={DICO}:{scale}")
        assert config.model.name == f"DiCo-{scale}"
        assert config.resolution == 256
        assert config.data.dir.endswith("imagenet256_latents")
    config = parse(f"--config={DICO}:XL,res=512")
    assert (config.model.name, config.resolution) == ("DiCo-XL", 512)
    assert config.data.dir.endswith("imagenet512_latents")


def test_dico_official_recipe():
    c = parse(f"--config={DICO}:XL")
    assert (c.learning_rate, c.adam_b1, c.adam_b2, c.adam_eps, c.weight_decay) == (
        1e-4, 0.9, 0.999, 1e-8, 0.0)
    assert (c.global_batch_size, c.ema_decay, c.dtype) == (256, 0.9999, "float32")
    assert (c.checkpoint_every_steps, c.log_every_steps, c.num_train_steps) == (50_000, 100, 400_000)
    assert (c.diffusion.steps, c.diffusion.noise_schedule, c.diffusion.learn_sigma) == (
        1000, "linear", True)
    assert (c.sampling.sampler, c.sampling.respacing, c.sampling.guidance_channels) == (
        "ddpm", "250", 3)
    assert dict(c.mesh) == {"slice": 0, "data": -1, "fsdp": 1}


def test_per_scale_recipes():
    h = parse(f"--config={DICO}:H")
    assert (h.adam_b1, h.adam_b2, h.learning_rate, h.warmup_steps) == (0.99, 0.99, 2e-4, 5_000)
    assert (h.global_batch_size, h.num_train_steps, h.dtype) == (1024, 1_000_000, "float32")
    for scale in ("S", "B", "L", "XL"):
        c = parse(f"--config={DICO}:{scale}")
        assert (c.global_batch_size, c.num_train_steps, c.learning_rate) == (256, 400_000, 1e-4)
        assert c.data.random_flip and c.dtype == "float32"
    long256, long512 = parse(f"--config={DICO}:XL,long"), parse(f"--config={DICO}:XL,res=512,long")
    assert (long256.num_train_steps, long512.num_train_steps) == (3_750_000, 3_000_000)
    assert long256.sampling.cfg_scale == 1.4 and long512.resolution == 512
    with pytest.raises(Exception, match="long runs"):
        parse(f"--config={DICO}:S,long")


@pytest.mark.parametrize("arg, message", [
    ("XXL", "unknown scale"),
    ("XL,res=384", "unsupported res"),
    ("XL,res=abc", "not an integer"),
    ("XL,foo=1", "unknown config arg"),
])
def test_dico_bad_args(arg, message):
    with pytest.raises(Exception, match=message):
        parse(f"--config={DICO}:{arg}")


def test_command_line_overrides():
    c = parse(f"--config={DICO}:B", "--config.learning_rate=2e-4", "--config.mesh.fsdp=4",
              "--config.model.hidden_size=64", "--config.model.depths=(1,2,3,2,1)",
              "--config.dtype=bfloat16", "--config.data.dir=/data/latents")
    assert c.learning_rate == 2e-4
    assert c.mesh.fsdp == 4 and c.mesh.data == -1
    assert c.model.hidden_size == 64
    assert tuple(c.model.depths) == (1, 2, 3, 2, 1)
    assert c.dtype == "bfloat16"
    assert c.data.dir == "/data/latents"


def test_locked_config_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(Exception, match="learning_rat"):
        parse(f"--config={DICO}:B", "--config.learning_rat=2e-4")
    with pytest.raises(Exception):
        parse(f"--config={DICO}:B", "--config.global_batch_size=lots")


def test_digits_config_is_small_and_pixel_space():
    c = parse(f"--config={DIGITS}")
    assert c.data.builtin == "digits" and c.data.dir == ""
    assert c.resolution == 8 and not c.data.random_flip
    assert tuple(c.model.depths) == (1, 1, 1, 1, 1) and c.model.hidden_size <= 64
    assert c.sample_at_end and c.sampling.guidance_channels == 1


def test_digits_flow_config_and_the_objective_fields():
    from dico_jax import builders
    from dico_jax.diffusion import FlowMatching, GaussianDiffusion

    c = parse(f"--config={DIGITS}:flow")
    assert c.diffusion.kind == "flow" and not c.diffusion.learn_sigma
    assert c.sampling.sampler in ("euler", "heun") and c.sampling.num_steps <= 50
    assert c.num_train_steps == parse(f"--config={DIGITS}").num_train_steps
    assert isinstance(builders.build_diffusion(c), FlowMatching) and not builders.learn_sigma(c)
    assert isinstance(builders.build_diffusion(parse(f"--config={DIGITS}")), GaussianDiffusion)
    c.model.in_channels, c.model.out_channels = 1, 2
    with pytest.raises(ValueError, match=r"config.model.out_channels=2.*learn_sigma=False"):
        builders.build_diffusion(c)
    bad = parse(f"--config={DIGITS}", "--config.diffusion.kind=flows")
    with pytest.raises(ValueError, match=r"config.diffusion.kind='flows'"):
        builders.build_diffusion(bad)
    with pytest.raises(Exception, match="unknown config arg"):
        parse(f"--config={DIGITS}:flwo=1")
