"""Checkpoints between the official PyTorch DiCo and dico-jax.

    python -m dico_jax.convert from-torch --model DiCo-XL --src 0400000.pt --out ckpt/dico-xl
    python -m dico_jax.convert from-torch --config configs/digits.py --src digits.pt --out ckpt/digits
    python -m dico_jax.convert to-torch --checkpoint WORKDIR --out dico-xl.pt [--safetensors]
    python -m dico_jax.convert vae-from-torch --vae va-vae \
        --src vavae-imagenet256-f16d32-dinov2.pt --out vavae-f16d32
    python -m dico_jax.convert vae-to-torch --src vavae-f16d32 --out vavae.pt [--naming ldm]

from-torch writes an Orbax checkpoint `OUT/<step>/` (step from a file name like 0400000.pt,
else 0) that `python -m dico_jax.sample --checkpoint OUT` reads; with `--config` (the run's
config file, any resolution or dataset) the network and the saved config are that run's.
to-torch writes {"model": ..., "ema": ...} under the official parameter names. vae-from-torch
writes a VAE's Flax params and kind (OUT/params.safetensors, OUT/vae.json) that --vae_weights
reads; vae-to-torch writes them back as a PyTorch state dict under LDM's or diffusers' names.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from dico_jax import command, errors, runtime
from dico_jax.models import MODEL_NAMES


def build_parser() -> argparse.ArgumentParser:
    parser = command.ArgumentParser("dico_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    imp = commands.add_parser("from-torch", help="official .pt -> Orbax checkpoint directory")
    model = imp.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", choices=MODEL_NAMES, help="model the weights are of "
                       "(configs/dico.py's recipe at --resolution)")
    model.add_argument("--config", help="the run's config, FILE.py[:ARG] as given to "
                       "dico_jax.main (e.g. configs/digits.py:flow)")
    imp.add_argument("--src", required=True, help="official checkpoint (.pt/.pth/.safetensors)")
    imp.add_argument("--out", required=True, help="new Orbax checkpoint directory")
    imp.add_argument("--model_overrides", default="{}", type=_json_object,
                     help="JSON of config.model fields, e.g. "
                          "'{\"hidden_size\": 64, \"depths\": [1, 1, 1, 1, 1]}'")
    imp.add_argument("--resolution", type=int, default=None, choices=(256, 512),
                     help="with --model: the image resolution the weights were trained at "
                          "(default 256; a --config says its own)")
    imp.add_argument("--step", type=int, default=None,
                     help="train step to record (default: from the file name, else 0)")

    imp.add_argument("--keep_non_finite", action="store_true",
                     help="convert weights holding NaN or infinite values (refused by default)")

    exp = commands.add_parser("to-torch", help="Orbax checkpoint -> official .pt")
    exp.add_argument("--checkpoint", required=True,
                     help="training workdir, its checkpoints/ folder, or a from-torch directory")
    exp.add_argument("--step", type=int, default=None, help="default: the latest")
    exp.add_argument("--out", required=True, help="output .pt (or the stem with --safetensors)")
    exp.add_argument("--safetensors", action="store_true",
                     help="write STEM.model.safetensors and STEM.ema.safetensors instead of a .pt")
    exp.add_argument("--no_ema", dest="use_ema", action="store_false",
                     help="export the raw weights only (a bare state_dict)")
    exp.add_argument("--keep_non_finite", action="store_true",
                     help="export weights holding NaN or infinite values (refused by default)")

    vae_in = commands.add_parser("vae-from-torch", help="VAE weights (PyTorch) -> Flax VAE folder")
    vae_in.add_argument("--vae", required=True, choices=("sd-vae", "va-vae"), help="which VAE")
    vae_in.add_argument("--src", required=True,
                        help="diffusers file/folder, or an LDM checkpoint (.pt/.ckpt) such as "
                             "vavae-imagenet256-f16d32-dinov2.pt")
    vae_in.add_argument("--out", required=True, help="folder to write")

    vae_out = commands.add_parser("vae-to-torch", help="Flax VAE folder -> PyTorch state dict")
    vae_out.add_argument("--src", required=True, help="a vae-from-torch folder")
    vae_out.add_argument("--out", required=True, help="output .pt (or .safetensors)")
    vae_out.add_argument("--naming", choices=("ldm", "diffusers"), default="ldm",
                         help="key names to write (ldm: the VA-VAE release's)")
    return parser


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runtime.quiet_orbax(logging.ERROR)
    from dico_jax.convert import checkpoints

    try:
        if args.command.startswith("vae-"):
            from dico_jax.convert import vae

            if args.command == "vae-from-torch":
                print(vae.import_vae(args.src, args.out, args.vae))
            else:
                print(vae.export_vae(args.src, args.out, args.naming))
            return 0
        if args.command == "from-torch":
            config = None
            if args.config and args.resolution:
                raise errors.UserError(f"--resolution {args.resolution}: the config "
                                       f"{args.config} sets the resolution; drop --resolution")
            if args.config:
                import configs

                config = configs.load(args.config)
            report = checkpoints.import_torch_checkpoint(
                args.src, args.out, args.model, args.model_overrides, step=args.step,
                resolution=args.resolution or 256, keep_non_finite=args.keep_non_finite,
                config=config)
        else:
            report = checkpoints.export_torch_checkpoint(
                args.checkpoint, args.out, step=args.step, use_ema=args.use_ema,
                safetensors=args.safetensors, keep_non_finite=args.keep_non_finite)
    except (OSError, ValueError, KeyError) as err:  # files and flags the user named
        if errors.show_tracebacks():
            raise
        print(errors.one_line("dico_jax.convert", err), file=sys.stderr)
        return errors.EXIT_USER_ERROR
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
