"""Evaluates the kept checkpoints of a run: the same `eval/<step>.json` training writes.

    python -m dico_jax.tools.evaluate_run --workdir=RUN [--steps=50000,100000] [--force]
        [--config.eval.num_samples=50000] [--config.eval.reference=VIRTUAL_imagenet256_labeled.npz
         --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth
         --config.vae_weights=sd-vae-ft-ema/]

The evaluation settings are the run's saved `config.eval` (its defaults where the run saved
none); `--config.eval.<field>`, `--config.vae_weights`, `--config.seed` and `--config.dtype`
override them. Steps that already have a result are skipped, so a rerun continues where an
interrupted one stopped; a result made with other settings (sampler, steps, guidance, number
of samples, reference: each result records them) is an error naming them, and `--force`
redoes the results of the chosen steps. The results also go to the run's TensorBoard (`eval/*`).
"""
from __future__ import annotations

import logging

import jax
from absl import flags

from configs import default as default_config
from dico_jax import command, compilation_cache, errors, runtime

TOOL = "dico_jax.tools.evaluate_run"
FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined only when it runs: importing `evaluate_run` as a library
    (beside another command's `--config`) defines none."""
    flags.DEFINE_string("workdir", None, "Training workdir (its checkpoints/ and saved config).")
    flags.DEFINE_list("steps", None, "Only these checkpoint steps (default: every kept one).")
    command.define_config_dict(TOOL, "config", default_config.get_config(), "Overrides of the "
                               "run's evaluation settings: --config.eval.FIELD=VALUE, "
                               "--config.vae_weights, --config.seed, --config.dtype.")
    flags.DEFINE_bool("force", False, "Redo the steps that already have a result.")
    flags.declare_key_flag("config")  # listed in --help
    flags.mark_flags_as_required(["workdir"])

_OVERRIDABLE = ("eval.", "vae_weights", "seed", "dtype")


def run_config(saved: dict, overrides: dict) -> dict:
    """The saved config with today's `eval` defaults under its own and the overrides on top."""
    config = dict(saved)
    config["eval"] = {**default_config.get_config().eval.to_dict(), **(saved.get("eval") or {})}
    config.setdefault("vae_weights", "")
    from dico_jax.sampling import source

    source.check_overrides(overrides, _OVERRIDABLE, "an evaluation")
    for path, value in overrides.items():
        if path.startswith("eval."):
            config["eval"][path.split(".", 1)[1]] = value
        else:
            config[path] = value
    return config


def evaluate_run(workdir: str, overrides: dict, steps: list[int] | None = None,
                 force: bool = False) -> list[int]:
    """Evaluates the kept checkpoints of `workdir` without a result (all of them with `force`);
    returns the steps done. A result made with other settings than these is an error."""
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
    compilation_cache.enable(config.get("compilation_cache_dir", ""), workdir)
    wanted = sorted(steps) if steps else kept
    done = set(during_training.evaluated_steps(workdir)) & set(wanted)
    if done and not force:
        expected = during_training.result_settings(
            config, during_training.settings_from_config(config, jax.device_count()))
        stale = {}
        for step in sorted(done):
            diffs = during_training.settings_differences(
                during_training.read_result(workdir, step), expected)
            if diffs:
                stale[step] = diffs
        if stale:
            first = next(iter(stale.values()))
            raise errors.UserError(
                f"{during_training.eval_dir(workdir)} holds results of step(s) {sorted(stale)} "
                f"made with other settings ({'; '.join(first[:4])}): pass --force to redo "
                "them with these settings, or evaluate with the stored ones")
    todo = [s for s in wanted if force or s not in done]
    if not todo:
        logging.info("every kept checkpoint of %s is evaluated", workdir)
        return []
    space = source_lib.image_space(config, workdir)
    evaluator = during_training.Evaluator.from_config(config, workdir, space)
    writer = (metric_writers.create_default_writer(workdir) if jax.process_index() == 0
              else metric_writers.MultiWriter([]))  # the metrics once, from process 0
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
    del argv  # checked by command.run
    with errors.cli(TOOL, also=(OSError, ValueError, KeyError)):
        from etils import epath

        from dico_jax.checkpoint import resolve_workdir

        workdir = resolve_workdir(FLAGS.workdir)  # local path or gs://...
        try:
            steps = [int(s) for s in FLAGS.steps] if FLAGS.steps else None
        except ValueError:
            raise errors.UserError(f"--steps {FLAGS.steps}: expected step numbers") from None
        if not epath.Path(workdir).is_dir():
            raise errors.MissingFile(f"--workdir {workdir}: no such folder")
        run_config({}, dict(FLAGS["config"].override_values))  # the overrides, checked
        runtime.start(orbax_level=logging.ERROR)
        evaluate_run(workdir, dict(FLAGS["config"].override_values), steps, FLAGS.force)


if __name__ == "__main__":
    define_flags()
    command.run(TOOL, main)
