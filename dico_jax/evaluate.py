"""Sample-quality metrics of an .npz of samples: FID, sFID, IS, precision and recall.

    python -m dico_jax.evaluate --samples SAMPLES.npz --ref VIRTUAL_imagenet256_labeled.npz \
        --inception-weights pt_inception-2015-12-05-6726825d.pth [--out metrics.json]
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
import tempfile

import numpy as np

from dico_jax import host_memory
from dico_jax.evaluation import features as feature_io
from dico_jax.evaluation import inception, metrics

REF_STAT_SHAPES = {
    "mu": (inception.POOL_DIM,),
    "sigma": (inception.POOL_DIM, inception.POOL_DIM),
    "mu_s": (inception.SPATIAL_DIM,),
    "sigma_s": (inception.SPATIAL_DIM, inception.SPATIAL_DIM),
}


def _inception_apply(variables, images):
    return inception.FIDInceptionV3().apply(variables, images)


def _reference_statistics(ref_path: str) -> dict[str, np.ndarray] | None:
    """The stored reference statistics, or None when the file stores none."""
    with np.load(ref_path) as ref:
        stored = [k for k in REF_STAT_SHAPES if k in ref.files]
        if not stored:
            return None
        if len(stored) != len(REF_STAT_SHAPES):
            missing = sorted(set(REF_STAT_SHAPES) - set(stored))
            raise ValueError(f"{ref_path}: reference statistics incomplete, missing {missing}")
        stats = {k: ref[k] for k in REF_STAT_SHAPES}
    for key, shape in REF_STAT_SHAPES.items():
        if stats[key].shape != shape:
            raise ValueError(f"{ref_path}: '{key}' must have shape {shape}, found {stats[key].shape}")
    return stats


def adm_metrics(
    samples_path: str,
    ref_path: str,
    inception_variables,
    batch_size: int = 250,
    mesh=None,
    fid_method: str = "sqrtm",
) -> dict:
    """FID, sFID, IS, precision and recall of ``samples_path`` against an ADM reference batch.

    ``fid_method``: see ``metrics.frechet_distance`` ("sqrtm" is the ADM evaluator's computation).
    """
    mesh = feature_io.device_mesh() if mesh is None else mesh
    samples = feature_io.npz_images(samples_path)
    ref_images = feature_io.npz_images(ref_path)
    ref_stats = _reference_statistics(ref_path)

    def features_of(reader):
        return feature_io.extract_features(
            _inception_apply, inception_variables, reader.batches(batch_size), batch_size, mesh, len(reader)
        )

    sample_features = features_of(samples)
    ref_features = features_of(ref_images)
    if ref_stats is None:
        ref_stats = dict(zip(("mu", "sigma"), metrics.feature_statistics(ref_features["pool"])))
        ref_stats.update(zip(("mu_s", "sigma_s"), metrics.feature_statistics(ref_features["spatial"])))
    precision, recall = metrics.precision_recall(ref_features["pool"], sample_features["pool"])
    return {
        "fid": metrics.frechet_distance(
            *metrics.feature_statistics(sample_features["pool"]), ref_stats["mu"], ref_stats["sigma"],
            method=fid_method,
        ),
        "sfid": metrics.frechet_distance(
            *metrics.feature_statistics(sample_features["spatial"]), ref_stats["mu_s"], ref_stats["sigma_s"],
            method=fid_method,
        ),
        "is": metrics.inception_score_from_logits(sample_features["logits"]),
        "precision": precision,
        "recall": recall,
        "num_samples": len(samples),
        "num_reference": len(ref_images),
    }


def digits_file_metrics(samples_path: str, cache_dir: str | None = None) -> dict:
    """Digits metrics of ``arr_0`` (N, 8, 8[, 1]) samples, with accuracy when ``label`` is stored."""
    from dico_jax.evaluation import digits_features

    reader = feature_io.NpzArrayReader(samples_path, "arr_0")
    samples = reader.read()
    labels = np.load(samples_path)["label"] if "label" in reader.keys else None
    try:
        return digits_features.digits_metrics(samples, labels=labels, cache_dir=cache_dir)
    except ValueError as err:
        raise ValueError(f"{samples_path}: {err}") from err


def write_json(path: str, payload: dict) -> None:
    """Writes JSON atomically, so an interrupted run never leaves a truncated file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(f.name, path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dico_jax.evaluate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--samples", required=True, help=".npz with arr_0 (N, H, W, C) uint8 samples")
    parser.add_argument(
        "--ref", help="ADM reference batch .npz (arr_0 images, optional mu/sigma/mu_s/sigma_s)"
    )
    parser.add_argument(
        "--inception-weights", help="pytorch-fid weights file pt_inception-2015-12-05-6726825d.pth"
    )
    parser.add_argument(
        "--digits", action="store_true", help="score 8x8 digit samples (no --ref, no weights)"
    )
    parser.add_argument("--out", help="write the metrics as JSON here")
    parser.add_argument("--batch-size", type=int, default=250, help="images per feature batch (all devices)")
    parser.add_argument(
        "--fid-method",
        choices=("sqrtm", "eigh"),
        default="sqrtm",
        help="sqrtm: the ADM evaluator's matrix square root; "
        "eigh: the same value from symmetric eigendecompositions, faster",
    )
    parser.add_argument("--cache-dir", help="digits mode: where to cache the trained feature network")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")
    if not args.digits and (args.ref is None or args.inception_weights is None):
        parser.error("--ref and --inception-weights are required (or use --digits)")
    if args.digits and (args.ref or args.inception_weights):
        parser.error("--digits uses its own reference and network; drop --ref/--inception-weights")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    host_memory.retain_freed_memory_on_cpu()  # before JAX starts its backend
    if args.digits:
        result = digits_file_metrics(args.samples, args.cache_dir)
    else:
        for path in (args.samples, args.ref):  # fail on bad inputs before loading 24M weights
            feature_io.npz_images(path)
        variables = inception.load_pytorch_fid_weights(args.inception_weights)
        result = adm_metrics(args.samples, args.ref, variables, args.batch_size, fid_method=args.fid_method)
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result, indent=2, sort_keys=True))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"dico_jax.evaluate: {err}")
