"""JAX's persistent compilation cache for a run: a restarted run loads its compiled programs
instead of compiling them again.

`enable(config.compilation_cache_dir, workdir)` is called by every command that compiles a
run's programs (training, sampling, evaluation) before its first compilation. The folder may
be local or gs:// (JAX reads and writes it through etils epath); only process 0 writes
entries, every process reads them.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator

import jax
from absl import logging
from jax.experimental.compilation_cache import compilation_cache as jax_cc

# Name of the default cache folder inside the workdir.
DEFAULT_SUBDIR = "compilation_cache"
# `config.compilation_cache_dir` value that turns the cache off.
OFF = "off"

# Programs that compile faster than this are not stored. Below it sit the many small eager
# and bookkeeping programs (a fraction of a second each): on gs:// each costs a round trip to
# look up and to write, about what recompiling it costs. The train step, `init` and the
# samplers of any model compile for seconds to minutes and are always stored.
MIN_COMPILE_SECS = 0.5

_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_REQUEST_EVENT = "/jax/compilation_cache/compile_requests_use_cache"


def resolve_dir(config_dir: str, workdir: str | None) -> str | None:
    """The folder to use: `config_dir` when set ("off": none); else a folder JAX was already
    given (JAX_COMPILATION_CACHE_DIR); else `<workdir>/compilation_cache`."""
    config_dir = (config_dir or "").strip()
    if config_dir.lower() == OFF:
        return None
    if config_dir:
        return config_dir
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    if not workdir:
        return None
    return os.path.join(os.fspath(workdir), DEFAULT_SUBDIR)


def enable(config_dir: str, workdir: str | None) -> str | None:
    """Points JAX's persistent cache at `resolve_dir(...)`; returns that folder (None: off).

    Takes effect for every later compilation of this process, including where JAX already
    set up a cache for another folder.
    """
    path = resolve_dir(config_dir, workdir)
    if path is None:
        if jax.config.jax_compilation_cache_dir:
            jax_cc.set_cache_dir(None)
            jax_cc.reset_cache()
        return None
    if not path.startswith("gs://"):
        path = os.path.abspath(path)
    if jax.config.jax_persistent_cache_min_compile_time_secs > MIN_COMPILE_SECS:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    if jax.config.jax_compilation_cache_dir != path:
        jax_cc.set_cache_dir(path)
        jax_cc.reset_cache()  # JAX opens its cache once; a new folder needs a fresh start
    logging.info("persistent compilation cache: %s", path)
    return path


class CacheCounts:
    """Compilations that consulted the persistent cache, and those it answered."""

    def __init__(self):
        self.requests = 0
        self.hits = 0

    def _on_event(self, event: str, **kwargs) -> None:
        del kwargs
        if event == _REQUEST_EVENT:
            self.requests += 1
        elif event == _HIT_EVENT:
            self.hits += 1


@contextmanager
def counting() -> Iterator[CacheCounts]:
    """Counts, inside the block, the compilations that looked in the persistent cache and the
    ones it answered (from JAX's monitoring events)."""
    counts = CacheCounts()
    listener = counts._on_event
    jax.monitoring.register_event_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_listener(listener)


@contextmanager
def timed_compile(what: str) -> Iterator[dict]:
    """Logs how long the block took to compile `what` and whether the cache answered; the
    dict it yields gets `secs` and `cached` (True when every compilation was a cache hit)."""
    info: dict = {}
    t0 = time.perf_counter()
    with counting() as counts:
        yield info
    info["secs"] = time.perf_counter() - t0
    info["cached"] = counts.requests > 0 and counts.hits == counts.requests
    logging.info("%s %s in %.1f s", what,
                 "loaded from the compilation cache" if info["cached"] else "compiled",
                 info["secs"])
