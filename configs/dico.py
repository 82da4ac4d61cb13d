"""DiCo on ImageNet latents with the official recipe.

    --config=configs/dico.py:XL            DiCo-XL at 256x256 (32x32x4 latents)
    --config=configs/dico.py:XL,res=512    DiCo-XL at 512x512 (64x64x4 latents)

Scales: S, B, L, XL, H. The run length defaults to 400K steps, the length of the paper's
per-scale comparison; the official DiCo-XL 256 run went on to about 4.06M steps
(`--config.num_train_steps=4060000`).
"""
from configs import default


def parse_arg(arg: str | None) -> tuple[str, int]:
    """"XL" or "XL,res=512" -> ("XL", 512)."""
    values = default.parse_arg(arg, scale="XL", res=256)
    scale, res = values["scale"], values["res"]
    if scale not in default.SCALES:
        raise ValueError(f"unknown scale {scale!r} in config arg {arg!r}; "
                         f"valid: {', '.join(default.SCALES)}")
    if res not in default.RESOLUTIONS:
        raise ValueError(f"unsupported res={res} in config arg {arg!r}; valid: {default.RESOLUTIONS}")
    return scale, res


def get_config(arg: str | None = None):
    scale, res = parse_arg(arg)
    config = default.get_config()  # the official recipe; only the scale and data differ
    config.model.name = f"DiCo-{scale}"
    config.resolution = res
    # Latents from `python -m dico_jax.data.extract` (one dataset per resolution).
    config.data.dir = f"data/imagenet{res}_latents"
    return config
