"""Metrics of sample files: an ADM-style `.npz` of samples against an ADM reference batch
(FID, sFID, IS, precision, recall), or samples of the built-in digits; the library of
`python -m dico_jax.evaluate`."""
from __future__ import annotations

import json
import os

import numpy as np

from dico_jax import storage
from dico_jax.evaluation import features as feature_io
from dico_jax.evaluation import inception, metrics

REF_STAT_SHAPES = {
    "mu": (inception.POOL_DIM,),
    "sigma": (inception.POOL_DIM, inception.POOL_DIM),
    "mu_s": (inception.SPATIAL_DIM,),
    "sigma_s": (inception.SPATIAL_DIM, inception.SPATIAL_DIM),
}


def inception_apply(variables, images):
    return inception.FIDInceptionV3().apply(variables, images)


def reference_statistics(ref_path: str) -> dict[str, np.ndarray] | None:
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
    pr_distances: str = "adm_float16",
) -> dict:
    """FID, sFID, IS, precision and recall of ``samples_path`` against an ADM reference batch.

    ``fid_method``: see ``metrics.frechet_distance`` ("sqrtm" is the ADM evaluator's computation);
    ``pr_distances``: see ``metrics.precision_recall`` ("adm_float16" is the ADM evaluator's).
    """
    mesh = feature_io.device_mesh() if mesh is None else mesh
    samples = feature_io.npz_images(samples_path)
    ref_images = feature_io.npz_images(ref_path)
    ref_stats = reference_statistics(ref_path)

    def features_of(reader):
        return feature_io.extract_features(
            inception_apply, inception_variables, reader.batches(batch_size), batch_size, mesh, len(reader)
        )

    sample_features = features_of(samples)
    ref_features = features_of(ref_images)
    if ref_stats is None:
        ref_stats = dict(zip(("mu", "sigma"), metrics.feature_statistics(ref_features["pool"])))
        ref_stats.update(zip(("mu_s", "sigma_s"), metrics.feature_statistics(ref_features["spatial"])))
    precision, recall = metrics.precision_recall(
        ref_features["pool"], sample_features["pool"], distances=pr_distances)
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
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    storage.atomic_write(path, lambda f: f.write(text.encode()))
