"""DiCo on ImageNet latents with the official recipe.

    --config=configs/dico.py:XL            DiCo-XL at 256x256 (32x32x4 latents)
    --config=configs/dico.py:XL,res=512    DiCo-XL at 512x512 (64x64x4 latents)

Scales: S, B, L, XL, H. The run length defaults to 400K steps, the length of the paper's
per-scale comparison; the official DiCo-XL 256 run went on to about 4.06M steps
(`--config.num_train_steps=4060000`).
"""
import os
import sys

# Config files are loaded by path; make the repository root importable for the shared base.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from configs import default  # noqa: E402

SCALES = ("S", "B", "L", "XL", "H")
RESOLUTIONS = (256, 512)


def parse_arg(arg: str | None) -> tuple[str, int]:
    """"XL" or "XL,res=512" -> ("XL", 512)."""
    scale, res = "XL", 256
    for part in filter(None, (p.strip() for p in (arg or "").split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            scale = part
        elif key == "res":
            try:
                res = int(value)
            except ValueError:
                raise ValueError(f"config arg res={value!r} is not an integer") from None
        else:
            raise ValueError(f"unknown config arg {key!r} in {arg!r}; valid: a scale and res=")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r} in config arg {arg!r}; valid: {', '.join(SCALES)}")
    if res not in RESOLUTIONS:
        raise ValueError(f"unsupported res={res} in config arg {arg!r}; valid: {RESOLUTIONS}")
    return scale, res


def get_config(arg: str | None = None):
    scale, res = parse_arg(arg)
    config = default.get_config()
    config.model.name = f"DiCo-{scale}"
    config.resolution = res
    config.global_batch_size = 256
    config.num_train_steps = 400_000
    config.checkpoint_every_steps = 50_000
    config.log_every_steps = 100
    # Latents from `python -m dico_jax.data.encode_imagenet` (one dataset per resolution).
    config.data.dir = f"data/imagenet{res}_latents"
    config.data.random_flip = True
    # Latent datasets need the VAE to show images, so no grids during training.
    config.sample_every_steps = 0
    return config
