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
    from dico_jax.sampling import Settings

    s = Settings.from_config(c)
    assert (s.sampler, s.respacing, s.guidance_channels) == ("ddpm", "250", 3)
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


def config_files():
    """Every training config file of configs/ (sweep.py describes runs of dico.py)."""
    return sorted(f for f in os.listdir(os.path.join(ROOT, "configs"))
                  if f.endswith(".py") and f not in ("__init__.py", "sweep.py"))


def test_every_config_file_lists_its_presets():
    import importlib

    assert {"default.py", "dico.py", "digits.py"} <= set(config_files())
    for name in config_files():
        module = importlib.import_module(f"configs.{name[:-3]}")
        assert getattr(module, "PRESETS", None), f"configs/{name} lists no PRESETS"


@pytest.mark.parametrize("name", config_files())
def test_every_preset_passes_the_start_up_checks(name):
    """The checks the trainer runs before building anything (8 devices, as on a v5p-16 or a
    GPU host), for every preset of every config file, and for every run of the sweep."""
    import importlib

    from dico_jax import train

    module = importlib.import_module(f"configs.{name[:-3]}")
    for preset in module.PRESETS:
        train.validate_config(parse(f"--config={os.path.join(ROOT, 'configs', name)}"
                                    + (f":{preset}" if preset else "")), num_devices=8)
    if name == "dico.py":
        from configs import sweep

        for variant in ("paper", "smoke"):
            for run in sweep.run_specs(sweep.get_config(variant), "gs://b/sweep"):
                train.validate_config(parse(f"--config={ROOT}/{run['config']}",
                                            *run["overrides"]), num_devices=8)


def test_evaluation_and_sampling_follow_the_objective():
    """A flow run samples and evaluates with an ODE solver and its step count unless told
    otherwise; a sampler of the other objective, or no steps, is refused naming the field."""
    from dico_jax import train
    from dico_jax.evaluation import during_training
    from dico_jax.errors import UserError
    from dico_jax.sampling import sampler as sampler_lib

    flow = parse(f"--config={DIGITS}:flow")
    e = during_training.settings_from_config(flow, 8)
    assert (e.sampler, e.num_steps) == ("heun", flow.eval.num_steps) and e.num_steps >= 1
    flow_xl = parse(f"--config={DICO}:XL", "--config.diffusion.kind=flow",
                    "--config.diffusion.learn_sigma=False")
    train.validate_config(flow_xl, num_devices=8)
    assert sampler_lib.Settings.from_config(flow_xl).sampler == "heun"
    assert during_training.settings_from_config(flow_xl, 8).sampler == "heun"
    ddpm = during_training.settings_from_config(parse(f"--config={DIGITS}"), 8)
    assert (ddpm.sampler, ddpm.respacing) == ("ddpm", "25")
    for args, field in [(("--config.eval.sampler=ddpm",), "config.eval.sampler"),
                        (("--config.eval.num_steps=0",), "config.eval.num_steps"),
                        (("--config.sampling.sampler=ddim50",), "config.sampling.sampler"),
                        (("--config.sampling.num_steps=0",), "config.sampling.num_steps"),
                        (("--config.eval.sampler=rk4",), "config.eval.sampler")]:
        with pytest.raises(UserError, match=rf"^{field}="):
            train.validate_config(parse(f"--config={DIGITS}:flow", *args), num_devices=8)
    with pytest.raises(UserError, match=r"^config.eval.sampler='heun'.*kind='ddpm'"):
        train.validate_config(parse(f"--config={DIGITS}", "--config.eval.sampler=heun"),
                              num_devices=8)


def test_load_reads_a_config_as_the_trainer_does(tmp_path):
    import configs
    from dico_jax.errors import MissingFile, UserError

    assert configs.load(f"{DIGITS}:flow").to_dict() == parse(f"--config={DIGITS}:flow").to_dict()
    assert configs.load(DICO).model.name == "DiCo-XL"
    with pytest.raises(MissingFile, match="nope.py does not exist"):
        configs.load(str(tmp_path / "nope.py"))
    with pytest.raises(UserError, match="unknown scale 'XXL'"):
        configs.load(f"{DICO}:XXL")


def test_presets_of_the_papers_tables():
    from dico_jax import builders
    from dico_jax.diffusion import FlowMatching

    t8 = parse(f"--config={DICO}:L,table8")
    assert (t8.eval.every_steps, t8.eval.num_samples, t8.eval.cfg_scale) == (50_000, 50_000, 1.0)
    assert (t8.eval.sampler, t8.eval.respacing, t8.num_train_steps) == ("ddpm", "250", 400_000)
    assert t8.keep_every_steps == 50_000
    big = parse(f"--config={DICO}:S,res=1024")
    assert big.resolution == 1024 and big.data.dir == "data/imagenet1024_latents"
    flow = parse(f"--config={DICO}:S,flow")
    assert isinstance(builders.build_diffusion(flow), FlowMatching)
    assert (flow.sampling.sampler, flow.sampling.num_steps) == ("euler_maruyama", 250)
    for bad, message in [("H,table8", "Table 8"), ("XL,res=512,table8", "Table 8"),
                         ("XL,long,flow", "own preset")]:
        with pytest.raises(Exception, match=message):
            parse(f"--config={DICO}:{bad}")
