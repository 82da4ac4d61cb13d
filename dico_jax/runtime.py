"""Process start-up shared by every run-level command (`main`, `sample`, `evaluate`,
`data.extract`, the tools): the host-memory switch, quieter Orbax logs and JAX's
multi-controller runtime.

Call `start()` first thing in a command's `main`, before anything touches a JAX backend.
"""
from __future__ import annotations

import importlib.util
import logging
import os

import jax

from dico_jax import host_memory
from dico_jax import sharding as sharding_lib

log = logging.getLogger(__name__)


class QuietOrbax(logging.Filter):
    """Orbax logs every step of every save and read at INFO: keep its records at `level` and
    above (WARNING for training; ERROR for the one-shot commands, where its notes on opening
    a checkpoint read-only are noise)."""

    def __init__(self, level: int = logging.WARNING):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet_orbax(level: int = logging.WARNING) -> None:
    """Installs `QuietOrbax` where absl prints what Orbax logs (unless absl is at DEBUG)."""
    from absl import logging as absl_logging

    if absl_logging.get_verbosity() >= absl_logging.DEBUG:
        return
    for target in (logging.getLogger("absl"), absl_logging.get_absl_handler()):
        if not any(isinstance(f, QuietOrbax) for f in target.filters):
            target.addFilter(QuietOrbax(level))


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


def initialize_distributed() -> None:
    """Joins the job's other processes when the runtime says there are any."""
    if on_multiprocess_runtime() and not jax.distributed.is_initialized():
        jax.distributed.initialize()


def start(orbax_level: int = logging.WARNING) -> None:
    """Start-up of a command: host memory (before the backend starts), logs, processes."""
    if host_memory.retain_freed_memory_on_cpu():
        log.info("CPU backend: the host allocator keeps freed memory (dico_jax.host_memory)")
    quiet_orbax(orbax_level)
    initialize_distributed()
    log.info("JAX process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
