"""DiCo on ImageNet latents with the paper's recipe for each scale.

    --config=configs/dico.py:XL            DiCo-XL at 256x256 (32x32x4 latents)
    --config=configs/dico.py:XL,res=512    DiCo-XL at 512x512 (64x64x4 latents)
    --config=configs/dico.py:XL,long       the long run of the released DiCo-XL (3.75M steps
                                           at 256, 3M at 512; sampled with guidance 1.4)
    --config=configs/dico.py:S,table8      the paper's Table 8 protocol: the run evaluates
                                           itself every 50K steps (FID-50K, no guidance)
    --config=configs/dico.py:S,res=1024    DiCo-S at 1024x1024 (128x128x4 latents, Table 11)
    --config=configs/dico.py:S,flow        DiCo-S trained by flow matching as SiT trains
                                           (linear path, velocity; the nearest preset to the
                                           paper's Table 12, which uses FlowDCN's network)
    --config=configs/dico.py:XL,meanflow   DiCo-XL trained by MeanFlow (arXiv 2505.13447,
                                           its ImageNet 256 settings), sampled in 1 step
    --config=configs/dico.py:XL,shortcut   DiCo-XL trained as a shortcut model (arXiv
                                           2410.12557), sampled in 1 step

Scales: S, B, L, XL, H. S to XL train with the official recipe (AdamW 1e-4, batch 256) for
400K steps, the length of the paper's per-scale comparison (its Table 8). DiCo-H trains as
the paper's Table 7 says: AdamW betas (0.99, 0.99), learning rate 2e-4 after 5K warmup steps,
global batch 1024, 1M steps. Every scale trains in float32 on SD-VAE (ft-EMA) latents with
random flips.
"""
from configs import default

# The long runs (arXiv 2505.11196, Table 7): DiCo-XL to 3.75M steps at 256, 3M at 512.
LONG_RUN_STEPS = {("XL", 256): 3_750_000, ("XL", 512): 3_000_000}
# Table 11 trains DiCo-S at 1024x1024; only this preset goes past the sweep's resolutions.
EXTRA_RESOLUTIONS = (1024,)
# The evaluation of Table 8: every 50K steps, 50K samples, iDDPM 250 steps, no guidance.
TABLE8_EVAL_EVERY = 50_000
TABLE8_EVAL_SAMPLES = 50_000

# Every argument this file documents: each one's config passes the trainer's start-up checks
# (tests/test_configs.py).
PRESETS = tuple(f"{scale}{'' if res == 256 else f',res={res}'}"
                for res in default.RESOLUTIONS for scale in default.SCALES) + tuple(
    f"{scale},res={res},long" for scale, res in LONG_RUN_STEPS) + ("XL,meanflow", "XL,shortcut")


def parse_arg(arg: str | None) -> dict:
    """"XL,res=512,long" -> {"scale": "XL", "res": 512, "long": True, "table8": False, ...}."""
    values = default.parse_arg(arg, scale="XL", res=256, long=False, table8=False, flow=False,
                               meanflow=False, shortcut=False)
    scale, res, long = values["scale"], values["res"], values["long"]
    if scale not in default.SCALES:
        raise ValueError(f"unknown scale {scale!r} in config arg {arg!r}; "
                         f"valid: {', '.join(default.SCALES)}")
    if res not in default.RESOLUTIONS + EXTRA_RESOLUTIONS:
        raise ValueError(f"unsupported res={res} in config arg {arg!r}; "
                         f"valid: {default.RESOLUTIONS + EXTRA_RESOLUTIONS}")
    if long and (scale, res) not in LONG_RUN_STEPS:
        raise ValueError(f"config arg {arg!r}: the paper's long runs are "
                         f"{', '.join(f'{s},res={r}' for s, r in LONG_RUN_STEPS)}")
    objectives = [k for k in ("flow", "meanflow", "shortcut") if values[k]]
    if len(objectives) > 1 or (objectives and (values["table8"] or long)):
        raise ValueError(f"config arg {arg!r}: {', '.join(objectives)} is its own preset (one "
                         "objective; no table8, no long)")
    if values["table8"] and (res != 256 or scale == "H" or long):
        raise ValueError(f"config arg {arg!r}: Table 8 covers S, B, L and XL at res=256, "
                         "400K steps")
    return values


def get_config(arg: str | None = None):
    values = parse_arg(arg)
    scale, res, long = values["scale"], values["res"], values["long"]
    config = default.get_config()  # the official recipe; only what differs is set below
    config.model.name = f"DiCo-{scale}"
    config.resolution = res
    # Latents from `python -m dico_jax.data.extract` (one dataset per resolution).
    config.data.dir = f"data/imagenet{res}_latents"
    if scale == "H":
        config.adam_b1 = 0.99
        config.adam_b2 = 0.99
        config.learning_rate = 2e-4
        config.warmup_steps = 5_000
        config.global_batch_size = 1024
        config.num_train_steps = 1_000_000
    if long:
        config.num_train_steps = LONG_RUN_STEPS[(scale, res)]
        # The released DiCo-XL's guidance scale (FID 2.05 at 256 in the official README).
        config.sampling.cfg_scale = 1.4
    if values["table8"]:
        # Needs config.eval.reference and config.eval.inception_weights (docs/evaluation.md).
        config.eval.every_steps = TABLE8_EVAL_EVERY
        config.eval.num_samples = TABLE8_EVAL_SAMPLES
        config.eval.sampler = "ddpm"
        config.eval.respacing = "250"
        config.eval.cfg_scale = 1.0
    if values["flow"]:
        # SiT's objective and sampler: linear path, velocity, uniform time; SDE, 250 steps.
        default.use_flow(config)
        config.sampling.sampler = "euler_maruyama"
        config.sampling.num_steps = 250
    if values["meanflow"]:
        # Guidance folded into the target with omega = 0.2, kappa = 0.92 (Eq. 21; an effective
        # scale omega / (1 - kappa) = 2.5), the DiT-XL setting of NVIDIA FastGen's MeanFlow
        # config, which also limits guidance to t <= 0.75 (not done here); the (r, t)
        # sampling and weighting keep the paper's ImageNet 256 defaults. One step, no
        # guidance at sampling (it is trained in).
        default.use_few_step(config, "meanflow")
        config.diffusion.meanflow.cfg_omega = 0.2
        config.diffusion.meanflow.cfg_kappa = 0.92
        config.sampling.cfg_scale = 1.0
    if values["shortcut"]:
        # The paper's ImageNet 256 evaluation: one step, guidance 1.5 at sampling.
        default.use_few_step(config, "shortcut")
        config.sampling.cfg_scale = 1.5
    return config
