"""Trains DiCo: `python -m dico_jax.main --config=configs/dico.py:XL --workdir=DIR`.

Any config field can be overridden, e.g. `--config.global_batch_size=512`. Rerunning the
same command resumes from the latest checkpoint in DIR.
"""
from absl import flags
from ml_collections import config_flags

from dico_jax import command, errors, runtime, train

TOOL = "dico_jax.main"
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
config_flags.DEFINE_config_file("config", None, "Training config file (file.py[:arg]); its "
                                "fields are overridden with --config.FIELD=VALUE.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv  # checked by command.run
    with errors.cli(TOOL):
        # Mistakes in the settings or the workdir: one line before any start-up work.
        train.check_settings(FLAGS.config)
        train.check_workdir(FLAGS.workdir)
        runtime.start()
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    command.run(TOOL, main)
