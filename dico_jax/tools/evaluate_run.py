"""Evaluates the kept checkpoints of a run: the same `eval/<step>.json` training writes.

    python -m dico_jax.tools.evaluate_run --workdir=RUN [--steps=50000,100000] \
        [--config.eval.num_samples=50000] [--config.eval.reference=VIRTUAL_imagenet256_labeled.npz \
         --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth \
         --config.vae_weights=sd-vae-ft-ema/]

The evaluation settings are the run's saved `config.eval` (its defaults where the run saved
none); `--config.eval.<field>`, `--config.vae_weights`, `--config.seed` and `--config.dtype`
override them. Steps that already have a result are skipped, so a rerun continues where an
interrupted one stopped; the results also go to the run's TensorBoard (`eval/*`).
"""
from __future__ import annotations

import logging
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from configs import default as default_config
from dico_jax import errors, runtime

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined only when it runs: importing `evaluate_run` as a library
    (beside another command's `--config`) defines none."""
    flags.DEFINE_string("workdir", None, "Training workdir (its checkpoints/ and saved config).")
    flags.DEFINE_list("steps", None, "Only these checkpoint steps (default: every kept one).")
    config_flags.DEFINE_config_dict("config", default_config.get_config(), lock_config=True)
    flags.mark_flags_as_required(["workdir"])

_OVERRIDABLE = ("eval.", "vae_weights", "seed", "dtype")


def run_config(saved: dict, overrides: dict) -> dict:
    """The saved config with today's `eval` defaults under its own and the overrides on top."""
    config = dict(saved)
    config["eval"] = {**default_config.get_config().eval.to_dict(), **(saved.get("eval") or {})}
    config.setdefault("vae_weights", "")
    for path, value in overrides.items():
        if not (path.startswith(_OVERRIDABLE[0]) or path in _OVERRIDABLE[1:]):
            raise errors.UserError(
                f"--config.{path}: only --config.eval.*, --config.vae_weights, --config.seed and "
                "--config.dtype apply to an evaluation; the network is the checkpoint's")
        if path.startswith("eval."):
            config["eval"][path.split(".", 1)[1]] = value
        else:
            config[path] = value
    return config


def evaluate_run(workdir: str, overrides: dict, steps: list[int] | None = None) -> list[int]:
    """Evaluates the kept checkpoints of `workdir` without a result; returns the steps done."""
    from clu import metric_writers

    from dico_jax import checkpoint as ckpt_lib
    from dico_jax.evaluation import during_training
    from dico_jax.sampling import source as source_lib

    directory = ckpt_lib.checkpoint_dir(workdir)
    kept = ckpt_lib.saved_steps(directory)
    if not kept:
        raise errors.MissingFile(f"{workdir} has no checkpoints to evaluate")
    missing = sorted(set(steps or ()) - set(kept))
    if missing:
        raise errors.UserError(f"no checkpoint of step(s) {missing} in {directory}; kept: {kept}")
    config = run_config(ckpt_lib.read_config(directory, kept[-1]), overrides)
    done = set(during_training.evaluated_steps(workdir))
    todo = [s for s in (sorted(steps) if steps else kept) if s not in done]
    if not todo:
        logging.info("every kept checkpoint of %s is evaluated", workdir)
        return []
    space = source_lib.image_space(config, workdir)
    evaluator = during_training.Evaluator.from_config(config, workdir, space)
    writer = metric_writers.create_default_writer(workdir,
                                                  just_logging=jax.process_index() != 0)
    for step in todo:
        weights = ckpt_lib.restore_to_host(directory, step, ("ema_params",))[0]["ema_params"]
        result = evaluator.evaluate(weights, step)
        if result is not None:
            writer.write_scalars(step, during_training.scalars(result))
            writer.flush()
            print(f"step {step}: " + ", ".join(f"{k} {result[k]:.4g}"
                                                for k in during_training.SCALARS if k in result))
    writer.close()
    return todo


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.start(orbax_level=logging.ERROR)
    with errors.cli("dico_jax.tools.evaluate_run", also=(OSError, ValueError, KeyError)):
        from dico_jax.checkpoint import resolve_workdir

        workdir = resolve_workdir(FLAGS.workdir)
        try:
            steps = [int(s) for s in FLAGS.steps] if FLAGS.steps else None
        except ValueError:
            raise errors.UserError(f"--steps {FLAGS.steps}: expected step numbers") from None
        evaluate_run(workdir, dict(FLAGS["config"].override_values), steps)


if __name__ == "__main__":
    define_flags()
    app.run(main)
