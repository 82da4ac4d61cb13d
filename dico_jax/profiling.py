"""A profile of chosen train steps (`config.profile = (first step, number of steps)`).

Process 0 traces steps first .. first + count - 1 with `jax.profiler` and puts the trace in
`<workdir>/plugins/profile/<YYYY_MM_DD_HH_MM_SS>/`, where TensorBoard's profile plugin looks
(`tensorboard --logdir WORKDIR`): `<host>.xplane.pb`, `<host>.trace.json.gz`, the optimized
program of the step (`train_step.hlo.txt.gz`) and `profile.json` (the steps traced), which
`python -m dico_jax.tools.profile_summary WORKDIR` reads. The profiler writes into a local
temporary folder; the files are then copied into the workdir, local or gs://.
"""
from __future__ import annotations

import gzip
import json
import shutil
import tempfile
from typing import Any, Sequence

import jax
from absl import logging
from etils import epath

HLO_FILE = "train_step.hlo.txt.gz"
INFO_FILE = "profile.json"


def parse_spec(spec: Sequence[int] | None) -> tuple[int, int]:
    """(first step, number of steps) of `config.profile`; (0, 0) when off. Raises ValueError
    naming the field for anything else."""
    if not spec:
        return 0, 0
    try:
        first, count = (int(v) for v in spec)
    except (TypeError, ValueError):
        raise ValueError(f"config.profile={spec!r}: give (first step, number of steps), "
                         "e.g. --config.profile='(10, 5)'") from None
    if count < 0 or (count > 0 and first < 1):
        raise ValueError(f"config.profile={spec!r}: the first step is >= 1 and the number of "
                         "steps >= 0 (0 traces nothing)")
    return first, count


def profile_root(workdir: str) -> epath.Path:
    return epath.Path(workdir) / "plugins" / "profile"


class StepProfiler:
    """`before(step)` ahead of running step number `step` (1-based, as logged), `after(step,
    state)` once it ran; `close()` ends a trace the run stopped inside."""

    def __init__(self, spec: Sequence[int] | None, workdir: str, hlo_text_fn,
                 enabled: bool = True):
        self.first, self.count = parse_spec(spec)
        self.enabled = enabled and self.count > 0
        self.workdir = workdir
        self.hlo_text_fn = hlo_text_fn
        self._tmp: str | None = None
        self._traced: list[int] = []

    @property
    def last(self) -> int:
        return self.first + self.count - 1

    def before(self, step: int) -> None:
        if self.enabled and self._tmp is None and self.first <= step <= self.last:
            self._tmp = tempfile.mkdtemp(prefix="dico_jax_profile_")
            jax.profiler.start_trace(self._tmp)
            logging.info("profiling steps %d to %d", step, self.last)

    def after(self, step: int, state: Any) -> None:
        if self._tmp is None:
            return
        self._traced.append(step)
        if step >= self.last:
            jax.block_until_ready(state)
            self._finish()

    def close(self) -> None:
        if self._tmp is not None:
            self._finish()

    def _finish(self) -> None:
        tmp, self._tmp = self._tmp, None
        self.enabled = False  # one trace per start
        try:
            jax.profiler.stop_trace()
            [run] = [p for p in epath.Path(tmp, "plugins", "profile").iterdir()]
            dest = profile_root(self.workdir) / run.name
            dest.mkdir(parents=True, exist_ok=True)
            for f in run.iterdir():
                (dest / f.name).write_bytes(f.read_bytes())
            (dest / HLO_FILE).write_bytes(gzip.compress(self.hlo_text_fn().encode()))
            (dest / INFO_FILE).write_text(json.dumps(
                {"first_step": self._traced[0], "steps": len(self._traced),
                 "process_index": jax.process_index()}))
            logging.info("profile of steps %d to %d written to %s", self._traced[0],
                         self._traced[-1], dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
