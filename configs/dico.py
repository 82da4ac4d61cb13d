"""DiCo on ImageNet latents with the paper's recipe for each scale.

    --config=configs/dico.py:XL            DiCo-XL at 256x256 (32x32x4 latents)
    --config=configs/dico.py:XL,res=512    DiCo-XL at 512x512 (64x64x4 latents)
    --config=configs/dico.py:XL,long       the long run of the released DiCo-XL (3.75M steps
                                           at 256, 3M at 512; sampled with guidance 1.4)

Scales: S, B, L, XL, H. S to XL train with the official recipe (AdamW 1e-4, batch 256) for
400K steps, the length of the paper's per-scale comparison (its Table 8). DiCo-H trains as
the paper's Table 7 says: AdamW betas (0.99, 0.99), learning rate 2e-4 after 5K warmup steps,
global batch 1024, 1M steps. Every scale trains in float32 on SD-VAE (ft-EMA) latents with
random flips.
"""
from configs import default

# The long runs (arXiv 2505.11196, Table 7): DiCo-XL to 3.75M steps at 256, 3M at 512.
LONG_RUN_STEPS = {("XL", 256): 3_750_000, ("XL", 512): 3_000_000}

# Every argument this file documents: each one's config passes the trainer's start-up checks
# (tests/test_configs.py).
PRESETS = tuple(f"{scale}{'' if res == 256 else f',res={res}'}"
                for res in default.RESOLUTIONS for scale in default.SCALES) + tuple(
    f"{scale},res={res},long" for scale, res in LONG_RUN_STEPS)


def parse_arg(arg: str | None) -> tuple[str, int, bool]:
    """"XL" or "XL,res=512" or "XL,long" -> ("XL", 512, False)."""
    values = default.parse_arg(arg, scale="XL", res=256, long=False)
    scale, res, long = values["scale"], values["res"], values["long"]
    if scale not in default.SCALES:
        raise ValueError(f"unknown scale {scale!r} in config arg {arg!r}; "
                         f"valid: {', '.join(default.SCALES)}")
    if res not in default.RESOLUTIONS:
        raise ValueError(f"unsupported res={res} in config arg {arg!r}; valid: {default.RESOLUTIONS}")
    if long and (scale, res) not in LONG_RUN_STEPS:
        raise ValueError(f"config arg {arg!r}: the paper's long runs are "
                         f"{', '.join(f'{s},res={r}' for s, r in LONG_RUN_STEPS)}")
    return scale, res, long


def get_config(arg: str | None = None):
    scale, res, long = parse_arg(arg)
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
    return config
