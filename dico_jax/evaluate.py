"""Sample-quality metrics of an .npz of samples: FID, sFID, IS, precision and recall.

    python -m dico_jax.evaluate --samples SAMPLES.npz --ref VIRTUAL_imagenet256_labeled.npz
        --inception_weights pt_inception-2015-12-05-6726825d.pth [--out metrics.json]
    python -m dico_jax.evaluate --digits --samples SAMPLES.npz [--out metrics.json]

The first form follows the ADM evaluator: Inception-v3 features of ``arr_0`` (N, H, W, 3)
uint8 samples against the reference batch (its ``arr_0`` images and, when stored, its
``mu``/``sigma``/``mu_s``/``sigma_s`` statistics). The second scores samples of the built-in
8x8 digits with a small classifier trained on the real digits (no files needed); with a
``label`` array in the samples file it also reports the accuracy of the requested classes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from dico_jax import command, errors, runtime
from dico_jax.evaluation import features as feature_io
from dico_jax.evaluation import files, inception


def parse_args(argv=None) -> argparse.Namespace:
    parser = command.ArgumentParser("dico_jax.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--samples", required=True, help=".npz with arr_0 (N, H, W, C) uint8 samples")
    parser.add_argument(
        "--ref", help="ADM reference batch .npz (arr_0 images, optional mu/sigma/mu_s/sigma_s)"
    )
    parser.add_argument(
        "--inception_weights", help="pytorch-fid weights file pt_inception-2015-12-05-6726825d.pth"
    )
    parser.add_argument(
        "--digits", action="store_true", help="score 8x8 digit samples (no --ref, no weights)"
    )
    parser.add_argument("--out", help="write the metrics as JSON here")
    parser.add_argument("--batch_size", type=int, default=250, help="images per feature batch (all devices)")
    parser.add_argument(
        "--fid_method",
        choices=("sqrtm", "eigh"),
        default="sqrtm",
        help="sqrtm: the ADM evaluator's matrix square root; "
        "eigh: the same value from symmetric eigendecompositions, faster",
    )
    parser.add_argument(
        "--pr_distances",
        choices=("adm_float16", "float32"),
        default="adm_float16",
        help="precision/recall distances: adm_float16 rounds as ADM's evaluator (its digits); "
        "float32 computes them in float32",
    )
    parser.add_argument("--cache_dir", help="digits mode: where to cache the trained feature network")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be positive")
    if not args.digits and (args.ref is None or args.inception_weights is None):
        parser.error("--ref and --inception_weights are required (or use --digits)")
    for flag in ("samples", "ref", "inception_weights"):
        path = getattr(args, flag)
        if path and not os.path.exists(path):
            parser.error(f"--{flag} {path}: no such file")
    if args.digits and (args.ref or args.inception_weights):
        parser.error("--digits uses its own reference and network; drop --ref/--inception_weights")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    runtime.start(orbax_level=logging.ERROR)
    if args.digits:
        result = files.digits_file_metrics(args.samples, args.cache_dir)
    else:
        for path in (args.samples, args.ref):  # fail on bad inputs before loading 24M weights
            feature_io.npz_images(path)
        variables = inception.load_pytorch_fid_weights(args.inception_weights)
        result = files.adm_metrics(args.samples, args.ref, variables, args.batch_size, fid_method=args.fid_method,
                                   pr_distances=args.pr_distances)
    if args.out:
        files.write_json(args.out, result)
    print(json.dumps(result, indent=2, sort_keys=True))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # The files it reads are the ones the user named: their errors are the user's to fix.
    with errors.cli("dico_jax.evaluate", also=(OSError, ValueError)):
        main()
