"""Trains DiCo: `python -m dico_jax.main --config=configs/dico.py:XL --workdir=DIR`.

Any config field can be overridden, e.g. `--config.global_batch_size=512`. Rerunning the
same command resumes from the latest checkpoint in DIR.
"""
from absl import app, flags
from ml_collections import config_flags

from dico_jax import errors, runtime, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
config_flags.DEFINE_config_file("config", None, "Training config file (file.py[:arg]).",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with errors.cli("dico_jax.main"):
        runtime.start()
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
