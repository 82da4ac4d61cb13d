"""Class-conditional samples of a checkpoint, written as an ADM-style `.npz`.

    python -m dico_jax.sample --workdir=WORKDIR --out=samples.npz [--grid=grid.png]
    python -m dico_jax.sample --checkpoint=CKPT_DIR --vae_weights=sd-vae-ft-ema/
        --out=samples.npz --config.sampling.num_samples=10000 --config.sampling.cfg_scale=1.5

The sampling settings are those of the run's saved config (`config.sampling`, `seed`, `dtype`);
`--config.sampling.<field>=...`, `--config.seed` and `--config.dtype` override them. The
samples depend on the seed and the batch size only, not on the number of devices or processes.
Each finished batch is saved under `OUT.parts/`; rerunning the same command skips them, and
the parts are removed once OUT is written (`dico_jax.sampling.run`).
"""
from __future__ import annotations

import logging

import jax
from absl import flags
from etils import epath

from configs import default as default_config
from dico_jax import command, compilation_cache, errors, runtime, sampling

TOOL = "dico_jax.sample"
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (its latest checkpoint and config).")
flags.DEFINE_string("checkpoint", None, "Orbax checkpoint directory (e.g. from dico_jax.convert).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("out", None, "Output .npz (arr_0 uint8 NHWC, label).")
flags.DEFINE_string("grid", None, "Also write a PNG grid of the first (up to 100) samples; with "
                    "--config.sampling.labels, one column per listed label.")
flags.DEFINE_string("vae_weights", None, "Diffusers AutoencoderKL weights (file or folder), "
                    "needed for latent-space runs.")
flags.DEFINE_integer("max_batches", None, "Stop after this many new batches (rerun to continue).")
flags.DEFINE_bool("use_ema", True, "Sample from the EMA weights (--nouse_ema: the raw weights).")
# The default config gives the override flags their types; only the fields given on the command
# line are applied, onto the checkpoint's own config.
command.define_config_dict(TOOL, "config", default_config.get_config(), "Overrides of the "
                           "run's sampling settings: --config.sampling.FIELD=VALUE, --config.seed, "
                           "--config.dtype.")
flags.declare_key_flag("config")  # listed in --help
flags.mark_flags_as_required(["out"])
flags.mark_flags_as_mutual_exclusive(["workdir", "checkpoint"], required=True)


def main(argv):
    del argv  # checked by command.run
    # Every file this command opens is one the user named: a missing or unreadable one, like a
    # bad setting, is the user's to fix.
    with errors.cli(TOOL, also=(OSError, ValueError, KeyError)):
        sampling.check_overrides(FLAGS["config"].override_values)
        for flag in ("workdir", "checkpoint", "vae_weights"):
            if FLAGS[flag].value and not epath.Path(FLAGS[flag].value).exists():  # or gs://
                raise errors.MissingFile(f"--{flag} {FLAGS[flag].value}: no such file or folder")
        runtime.start(orbax_level=logging.ERROR)
        source = sampling.load_source(workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint,
                                      step=FLAGS.step, use_ema=FLAGS.use_ema)
        source.config = sampling.apply_overrides(source.config, FLAGS["config"].override_values)
        # The run's cache: a second sampling of the same run skips the sampler's compile.
        compilation_cache.enable(source.config.get("compilation_cache_dir", ""), FLAGS.workdir)
        settings = sampling.Settings.from_config(source.config, jax.device_count())
        report = sampling.generate(source, settings, FLAGS.out, vae_weights=FLAGS.vae_weights,
                                   grid=FLAGS.grid, max_batches=FLAGS.max_batches)
    if jax.process_index() == 0:
        print(f"{source.config['model']['name']} step {source.step} ({source.weights}), "
              f"{sampling.run.describe(settings)}, "
              f"cfg {settings.cfg_scale}: "
              f"{len(report.batches_computed)} batches computed, {len(report.batches_reused)} "
              f"reused; compile {report.compile_secs:.1f} s, {report.images_per_sec:.2f} images/s")
        print(f"wrote {report.out}" if report.complete
              else f"stopped early; the finished batches are in {report.out} (rerun to continue)")


if __name__ == "__main__":
    command.run(TOOL, main)
