"""Host memory reuse for runs on the XLA:CPU backend.

XLA:CPU takes each call's temporaries as one block (gigabytes for a DiCo-S train step). By
default glibc serves a block that large with a fresh `mmap` and unmaps it when freed, so the
kernel zero-fills every page again on the next call: page faults and system time then take
a large share of each step (docs/performance.md). Three settings make the block come back
from the heap instead:

- JAX's CPU client runs single-device programs on the calling thread
  (`jax_cpu_enable_async_dispatch` off), so the block comes from glibc's main arena: a
  worker thread's arena cannot grow past 64 MB and falls back to `mmap` whatever the
  settings below say. (Limiting glibc to one arena does the same but slows XLA's
  multithreaded compilation by 40%.) Programs split over several CPU devices keep their
  worker threads and are not helped.
- `mallopt(M_MMAP_MAX, 0)`: large blocks come from the heap, not from `mmap`.
- `mallopt(M_TRIM_THRESHOLD, -1)`: freed memory at the top of the heap is not returned.

The price: the process keeps the host memory it frees (its resident size stays at its
peak), and Python no longer runs ahead of the CPU computation. `retain_freed_memory_on_cpu()`
must run before JAX starts its backend. It does nothing where an accelerator will run the
program, off glibc, or when DICO_JAX_RETAIN_HOST_MEMORY=0.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import sys

# mallopt(3) parameters (glibc malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
ENV_VAR = "DICO_JAX_RETAIN_HOST_MEMORY"


def cpu_runs_the_program(platforms: str | None = None) -> bool:
    """True when JAX will run on the CPU, decided without starting a backend.

    `platforms` (default: jax.config.jax_platforms, i.e. JAX_PLATFORMS) decides when set;
    otherwise the CPU runs the program when no accelerator plugin (the CUDA / ROCm plugins
    under `jax_plugins`, libtpu) is installed.
    """
    if platforms is None:
        import jax

        platforms = jax.config.jax_platforms  # JAX_PLATFORMS, read when jax is imported
    if platforms:
        return all(p.strip() == "cpu" for p in platforms.split(","))
    if importlib.util.find_spec("libtpu") is not None:
        return False
    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    try:
        import jax_plugins
    except ImportError:
        return True
    return not any(pkgutil.iter_modules(jax_plugins.__path__))


def keep_large_blocks_on_heap() -> bool:
    """glibc: no `mmap` for large blocks and no trimming; True if both settings took."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc, not musl
    except (OSError, AttributeError):
        return False
    return all(libc.mallopt(param, value) == 1
               for param, value in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))


def retain_freed_memory_on_cpu() -> bool:
    """The settings above, when the CPU runs the program and the env var allows it.

    Returns True when they were applied.
    """
    if os.environ.get(ENV_VAR, "1") == "0" or not cpu_runs_the_program():
        return False
    import jax

    if _backend_started():
        logging.warning("%s: JAX's backend is already running; host memory settings not "
                        "applied (call retain_freed_memory_on_cpu() first)", __name__)
        return False
    if not keep_large_blocks_on_heap():
        return False
    # Read when the CPU client is created; applies to single-device programs (a program
    # split over several CPU devices still runs on worker threads).
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True


def _backend_started() -> bool:
    try:
        from jax._src.xla_bridge import backends_are_initialized
    except ImportError:  # not in this JAX version: assume the caller is early enough
        return False
    return backends_are_initialized()
