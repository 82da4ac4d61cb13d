"""Trains DiCo: `python -m dico_jax.main --config=configs/dico.py:XL --workdir=DIR`.

Any config field can be overridden, e.g. `--config.global_batch_size=512`. Rerunning the
same command resumes from the latest checkpoint in DIR.
"""
from __future__ import annotations

import importlib.util
import logging as pylogging
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from dico_jax import host_memory, train
from dico_jax import sharding as sharding_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
config_flags.DEFINE_config_file("config", None, "Training config file (file.py[:arg]).",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def on_multiprocess_runtime() -> bool:
    """True on runtimes where `jax.distributed.initialize()` finds its peers by itself:
    Cloud TPU VMs (single- or multi-host), GKE TPU jobs, Slurm jobs with several tasks, or
    an explicit JAX_COORDINATOR_ADDRESS."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    if env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES"):
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    # A Cloud TPU VM has chips and libtpu installed.
    return sharding_lib.tpu_chips_present() and importlib.util.find_spec("libtpu") is not None


class _QuietOrbax(pylogging.Filter):
    """Orbax logs every step of every save at INFO; keep its warnings and errors only."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if host_memory.retain_freed_memory_on_cpu():  # before JAX starts its backend
        logging.info("CPU backend: the host allocator keeps freed memory (dico_jax.host_memory)")
    if logging.get_verbosity() < logging.DEBUG:
        logging.get_absl_handler().addFilter(_QuietOrbax())
    if on_multiprocess_runtime() and not jax.distributed.is_initialized():
        jax.distributed.initialize()
    logging.info("JAX process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
