"""Evaluation of a run's EMA weights: during training, and afterwards over its kept checkpoints.

`Evaluator.from_config(config, workdir, space)` builds everything once: the compiled sampler
of `dico_jax.sampling.sampler` under `config.eval`, and the scorer of the data: for SD-VAE
latents the VAE decode plus Inception features against the ADM reference batch (its
statistics computed once and cached in `workdir/eval/`), for the built-in digits their
feature network. `evaluate(ema_params, step)` samples `eval.num_samples` images split over
every device of every process, scores them on process 0 and writes `workdir/eval/<step>.json`.

Every evaluation of a run draws the same labels (sample i has class i mod num_classes) and the
same noise (batch b keyed by the run's seed and b), so the points of a curve differ only by
the weights.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from dico_jax import storage
from dico_jax.errors import MissingFile, UserError
from dico_jax.progress import Progress
from dico_jax.sampling import parts
from dico_jax.sampling import sampler as sampler_lib

EVAL_DIR = "eval"
REFERENCE_CACHE = "reference_stats.npz"
# TensorBoard tags of the result keys (eval/seconds: the wall time of the evaluation).
SCALARS = ("fid", "sfid", "is", "precision", "recall", "accuracy", "seconds")


def eval_dir(workdir: str) -> str:
    return os.path.join(workdir, EVAL_DIR)


def result_path(workdir: str, step: int) -> str:
    return os.path.join(eval_dir(workdir), f"{int(step)}.json")


def evaluated_steps(workdir: str) -> list[int]:
    """Steps with a result in `workdir/eval/` (read by process 0, agreed by every process)."""
    steps = []
    folder = epath.Path(eval_dir(workdir))
    if jax.process_index() == 0 and folder.is_dir():
        steps = sorted(int(p.stem) for p in folder.glob("*.json") if p.stem.isdigit())
    if jax.process_count() == 1:
        return steps
    from jax.experimental import multihost_utils

    count = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
    padded = np.zeros((count,), np.int64)
    padded[:len(steps)] = steps
    return [int(s) for s in multihost_utils.broadcast_one_to_all(padded)]


def settings_from_config(config: Mapping[str, Any], num_devices: int) -> sampler_lib.Settings:
    """The sampler settings of `config.eval` (labels are set per batch, not here)."""
    e = config["eval"]
    num_samples = int(e["num_samples"])
    if num_samples < 1:
        raise UserError(f"config.eval.num_samples must be >= 1, got {num_samples}")
    batch = int(e.get("batch_size", 0) or 0) or sampler_lib.default_batch_size(num_samples,
                                                                               num_devices)
    if batch % num_devices:
        raise UserError(f"config.eval.batch_size={batch} must be a multiple of the "
                        f"{num_devices} devices")
    sampler, respacing, num_steps = sampler_lib.sampler_settings(config, "eval")
    guidance = e.get("guidance_channels", 3)
    return sampler_lib.Settings(
        num_samples=num_samples, batch_size=batch, seed=int(config.get("seed", 0)),
        cfg_scale=float(e.get("cfg_scale", 1.0)),
        guidance_channels=None if guidance is None else int(guidance),
        sampler=sampler, respacing=respacing, labels=None, num_steps=num_steps,
        dtype=str(config.get("dtype", "float32")))


LABELS_RULE = "sample i: class i mod num_classes"


def result_settings(config: Mapping[str, Any], settings: sampler_lib.Settings) -> dict:
    """What decides an evaluation's result besides the weights, as its `eval/<step>.json`
    records it: the sampler's settings, the number of samples and the reference batch."""
    record = settings.record()
    record["labels"] = LABELS_RULE
    return {"sampling": record, "num_samples": settings.num_samples,
            "reference": os.path.basename(str(config["eval"].get("reference") or ""))}


def read_result(workdir: str, step: int) -> dict:
    with epath.Path(result_path(workdir, step)).open("r") as f:
        return json.load(f)


def settings_differences(stored: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """"field: stored -> expected" for each setting of a stored result that differs (a setting
    the result does not record, from before it was recorded, is not compared)."""
    diffs = []
    for key, want in expected.items():
        if key not in stored:
            continue
        have = stored[key]
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            diffs += [f"{key}.{k}: {have.get(k)!r} -> {v!r}" for k, v in want.items()
                      if k in have and have[k] != v]
            diffs += [f"{key}.{k}: {have[k]!r} -> (none)" for k in have if k not in want]
        elif have != want:
            diffs.append(f"{key}: {have!r} -> {want!r}")
    return diffs


def validate(config: Mapping[str, Any], latent: bool) -> None:
    """Clear errors, before any training, for an evaluation that could not run later."""
    every = int(config["eval"]["every_steps"])
    if every < 0:
        raise UserError(f"config.eval.every_steps must be >= 0, got {every}")
    if not active(config):
        return
    # An evaluation follows a finished checkpoint of its step: a restart then redoes it from
    # that checkpoint instead of skipping it.
    if every % int(config["checkpoint_every_steps"]):
        raise UserError(f"config.eval.every_steps={every} must be a multiple of "
                        f"config.checkpoint_every_steps={config['checkpoint_every_steps']}")
    settings_from_config(config, jax.device_count())
    if latent:
        for field, path in required_files(config).items():
            check_file(field, path, f"a latent run that evaluates itself "
                                    f"(config.eval.every_steps={every}) needs it")


def active(config: Mapping[str, Any]) -> bool:
    """Whether the run reaches an evaluation step."""
    every = int(config["eval"]["every_steps"])
    return 0 < every <= int(config.get("num_train_steps", every))


def check_file(field: str, path: str, why: str) -> str:
    if not path:
        raise UserError(f"{field} is empty: {why}")
    if not os.path.exists(path):
        raise MissingFile(f"{field}={path}: no such file or folder")
    return path


def required_files(config: Mapping[str, Any]) -> dict[str, str]:
    e = config["eval"]
    vae_field = "config.eval.vae_weights" if e.get("vae_weights") else "config.vae_weights"
    return {"config.eval.reference": e.get("reference", ""),
            "config.eval.inception_weights": e.get("inception_weights", ""),
            vae_field: e.get("vae_weights") or config.get("vae_weights", "")}


# ---------------------------------------------------------------------------------------------
# Scoring the images of one evaluation.


class DigitsScorer:
    """The digits' feature-network metrics of uint8 (N, 8, 8, 1) samples (process 0)."""

    def __init__(self, workdir: str):
        from dico_jax.evaluation import digits_features

        self.cache_dir = os.path.join(eval_dir(workdir), "cache")
        if jax.process_index() == 0:  # trains (a few seconds) or reads the network once
            digits_features.digits_feature_params(self.cache_dir)

    def features(self, images: jax.Array) -> jax.Array:
        return images  # 8x8 digits: the images themselves go to the host

    def score(self, gathered: np.ndarray, labels: np.ndarray) -> dict:
        from dico_jax.evaluation import digits_features

        return digits_features.digits_metrics(gathered, labels=labels, cache_dir=self.cache_dir)


class InceptionScorer:
    """FID, sFID, IS, precision and recall against an ADM reference batch.

    The Inception features of each batch are computed where its images are, so only the
    features (not the decoded images) reach the host.
    """

    def __init__(self, variables: Any, reference: Mapping[str, np.ndarray], mesh):
        from dico_jax.evaluation import files

        batch = NamedSharding(mesh, P(sampler_lib.BATCH_AXIS))
        replicated = NamedSharding(mesh, P())
        self.variables = jax.device_put(variables, replicated)
        self._apply = jax.jit(files.inception_apply, in_shardings=(replicated, batch),
                              out_shardings=batch)
        self.reference = reference

    def features(self, images: jax.Array) -> dict:
        return self._apply(self.variables, images)

    def score(self, gathered: Mapping[str, np.ndarray], labels: np.ndarray) -> dict:
        from dico_jax.evaluation import metrics

        del labels
        ref = self.reference
        precision, recall = metrics.precision_recall(ref["pool"], gathered["pool"])
        return {
            "fid": metrics.frechet_distance(*metrics.feature_statistics(gathered["pool"]),
                                            ref["mu"], ref["sigma"]),
            "sfid": metrics.frechet_distance(*metrics.feature_statistics(gathered["spatial"]),
                                             ref["mu_s"], ref["sigma_s"]),
            "is": metrics.inception_score_from_logits(gathered["logits"]),
            "precision": precision, "recall": recall,
            "num_reference": int(len(ref["pool"])),
        }


def reference_cache(ref_path: str, variables: Any, workdir: str,
                    batch_size: int = 250) -> dict[str, np.ndarray]:
    """Statistics and pool features of the reference batch, computed once per run.

    Cached in `workdir/eval/reference_stats.npz` under the reference file's name and size; a
    different reference recomputes them. Process 0 computes (on its own devices) and writes;
    the others read the file after a barrier.
    """
    from dico_jax.evaluation import features as feature_io
    from dico_jax.evaluation import files, metrics

    key = f"{os.path.basename(ref_path)}:{os.path.getsize(ref_path)}"
    path = epath.Path(eval_dir(workdir)) / REFERENCE_CACHE

    def cached():
        if not path.is_file():
            return None
        with path.open("rb") as raw, np.load(raw) as f:
            return {k: f[k] for k in f.files} if str(f["key"]) == key else None

    if jax.process_index() == 0 and cached() is None:
        logging.info("evaluation: Inception statistics of %s (once per run)", ref_path)
        reader = feature_io.npz_images(ref_path)
        feats = feature_io.extract_features(files.inception_apply, variables,
                                            reader.batches(batch_size), batch_size,
                                            feature_io.device_mesh(), len(reader))
        stats = files.reference_statistics(ref_path) or {}
        if not stats:
            stats = dict(zip(("mu", "sigma"), metrics.feature_statistics(feats["pool"])))
            stats.update(zip(("mu_s", "sigma_s"), metrics.feature_statistics(feats["spatial"])))
        storage.atomic_write(path, lambda f: np.savez(f, key=np.asarray(key), pool=feats["pool"],
                                                **stats))
    parts.barrier("evaluation reference statistics")
    return cached()


# ---------------------------------------------------------------------------------------------
# The evaluator.


@dataclasses.dataclass
class Evaluator:
    settings: sampler_lib.Settings
    num_classes: int
    workdir: str
    sample: Any  # make_sampler's jitted function
    vae_params: Any
    scorer: Any
    mesh: Any
    every_steps: int = 0
    recorded_settings: dict = dataclasses.field(default_factory=dict)  # `result_settings`

    @classmethod
    def from_config(cls, config: Mapping[str, Any], workdir: str, space: Any, *,
                    vae: Any = None, inception_variables: Any = None) -> "Evaluator":
        """`vae` ((module, params)) and `inception_variables` replace the weights the config
        names (tests use randomly initialised ones)."""
        mesh = sampler_lib.sampling_mesh()
        settings = settings_from_config(config, mesh.size)
        vae_module = vae_params = None
        if space.vae:
            files = required_files(config)
            why = "evaluating latents needs it"
            reference_path = check_file("config.eval.reference", files.pop(
                "config.eval.reference"), why)
            inception_path = files.pop("config.eval.inception_weights")
            if vae is None:
                from dico_jax.convert.vae import load_vae

                vae = load_vae(check_file(*files.popitem(), why), settings.dtype, space.vae_kind)
            vae_module, vae_params = vae
            if inception_variables is None:
                from dico_jax.evaluation import inception

                inception_variables = inception.load_pytorch_fid_weights(
                    check_file("config.eval.inception_weights", inception_path, why))
            reference = reference_cache(reference_path, inception_variables, workdir)
            scorer = InceptionScorer(inception_variables, reference, mesh)
        else:
            scorer = DigitsScorer(workdir)
        model = sampler_lib.sampling_model(config, settings.dtype)
        sample = sampler_lib.make_sampler(model, settings, space, mesh, config=config,
                                          vae=vae_module)
        vae_params = jax.device_put(vae_params, NamedSharding(mesh, P()))
        return cls(settings, space.num_classes, workdir, sample, vae_params, scorer, mesh,
                   int(config["eval"].get("every_steps", 0)), result_settings(config, settings))

    @property
    def num_batches(self) -> int:
        return -(-self.settings.num_samples // self.settings.batch_size)

    def labels(self, batch_index: int) -> np.ndarray:
        n = self.settings.batch_size
        return ((batch_index * n + np.arange(n)) % self.num_classes).astype(np.int32)

    def due(self, step: int) -> bool:
        return bool(self.every_steps) and step > 0 and step % self.every_steps == 0

    def evaluate(self, ema_params: Any, step: int) -> dict | None:
        """Samples and scores `ema_params`; writes `eval/<step>.json` (process 0).

        Returns the result on process 0, None on the others. Raises on non-finite samples
        (nothing is written, so a rerun evaluates the step again).
        """
        t0 = time.perf_counter()
        chief = jax.process_index() == 0
        s = self.settings
        if chief:
            logging.info("evaluation of step %d: %d samples (%s %s, cfg %s, batch %d) ...", step,
                         s.num_samples, s.sampler, s.respacing or f"{s.num_steps} steps",
                         s.cfg_scale, s.batch_size)
        bar = Progress(f"evaluation of step {step}", s.num_samples, enabled=chief)
        replicated = NamedSharding(self.mesh, P())
        batch = NamedSharding(self.mesh, P(sampler_lib.BATCH_AXIS))
        params = jax.device_put(ema_params, replicated)
        seed = jax.device_put(np.uint32(self.settings.seed), replicated)
        outputs, labels = [], []
        for b in range(self.num_batches):
            y = self.labels(b)
            global_y = jax.make_array_from_callback(y.shape, batch, lambda idx, y=y: y[idx])
            images, finite = self.sample(params, self.vae_params, global_y, seed,
                                         jax.device_put(np.int32(b), replicated))
            if not bool(parts.to_host(finite).all()):
                raise FloatingPointError(
                    f"evaluation of step {step}: batch {b} holds NaN or infinite samples; "
                    "no result written")
            outputs.append(jax.tree.map(parts.to_host, self.scorer.features(images)))
            labels.append(y)
            bar.update(min(s.batch_size, s.num_samples - b * s.batch_size))
        bar.close()
        if not chief:
            return None
        n = self.settings.num_samples
        gathered = jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *outputs)
        result = self.scorer.score(gathered, np.concatenate(labels)[:n])
        result.update(step=int(step), seconds=time.perf_counter() - t0, weights="ema",
                      **self.recorded_settings)
        storage.atomic_write(epath.Path(result_path(self.workdir, step)),
                      lambda f: f.write(json.dumps(result, indent=2, sort_keys=True).encode()))
        logging.info("evaluation of step %d done in %.1f s: %s", step, result["seconds"],
                     {k: round(float(result[k]), 4) for k in SCALARS if k in result})
        return result


def scalars(result: Mapping[str, Any] | None) -> dict[str, float]:
    """TensorBoard `eval/*` scalars of a result."""
    if not result:
        return {}
    return {f"eval/{k}": float(result[k]) for k in SCALARS if k in result}


# ---------------------------------------------------------------------------------------------
# The training loop's side.


def for_training(config: Mapping[str, Any], workdir: str, space: Any) -> Evaluator | None:
    """The run's evaluator, or None when the run reaches no evaluation step."""
    validate(config, space.vae)
    if not active(config):
        return None
    return Evaluator.from_config(config, workdir, space)


def evaluate_pending(evaluator: Evaluator | None, restored_step: int, ema_params: Any,
                     checkpoint_dir: str, writer: Any = None) -> None:
    """Evaluations due at or before the restored step that left no result: a run killed or
    preempted during one redoes it now, from the restored state (its own step) or a kept
    checkpoint's EMA weights (older steps)."""
    if evaluator is None or not restored_step:
        return
    from dico_jax import checkpoint as ckpt_lib

    done = set(evaluated_steps(evaluator.workdir))
    due = [s for s in range(evaluator.every_steps, restored_step + 1, evaluator.every_steps)
           if s not in done]
    if not due:
        return
    kept = set(ckpt_lib.saved_steps(checkpoint_dir))
    for step in due:
        if step == restored_step:
            weights = ema_params
        elif step in kept:
            weights = ckpt_lib.restore_to_host(checkpoint_dir, step, ("ema_params",))[0][
                "ema_params"]
        else:
            logging.warning("evaluation of step %d missing and its checkpoint is gone; "
                            "keep_every_steps keeps the checkpoints a curve needs", step)
            continue
        logging.info("evaluating step %d, left unevaluated by an earlier run", step)
        _write_scalars(writer, step, evaluator.evaluate(weights, step))


def evaluate_if_due(evaluator: Evaluator | None, step: int, ema_params: Any, checkpointer: Any,
                    writer: Any = None) -> None:
    """After the checkpoint of `step` was started: evaluates when `step` is an evaluation step
    without a result yet (a run resumed from an older checkpoint may have one)."""
    if evaluator is None or not evaluator.due(step) or step in evaluated_steps(evaluator.workdir):
        return
    # The checkpoint of this step is finished before any evaluation program runs: a kill
    # during the evaluation then restarts from this step and redoes it, and no process
    # launches sampling programs while another still copies the checkpoint's arrays.
    checkpointer.wait_until_finished()
    _write_scalars(writer, step, evaluator.evaluate(ema_params, step))


def _write_scalars(writer: Any, step: int, result: Mapping[str, Any] | None) -> None:
    if writer is not None and result:
        writer.write_scalars(step, scalars(result))
        writer.flush()
