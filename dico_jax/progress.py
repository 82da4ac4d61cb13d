"""How far long work is (sampling, evaluation): a bar on a terminal, log lines elsewhere.

On a terminal, a tqdm bar with the count, rate and time left. When stderr is a file or a
pipe (a pod's log), a line after the first batch, which says how long the whole will take,
then one every `every_secs` seconds and one at the end.
"""
from __future__ import annotations

import sys
import time

from absl import logging


def duration(seconds: float) -> str:
    """3 h 05 min, 12 min 40 s, 9 s."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


class Progress:
    """`update(n)` after each batch of `n` items of `total`; `close()` at the end."""

    def __init__(self, what: str, total: int, *, unit: str = "img", done: int = 0,
                 enabled: bool = True, every_secs: float = 30.0, terminal: bool | None = None):
        self.what, self.total, self.unit = what, total, unit
        self.done = self.start_count = min(done, total)
        self.enabled = enabled
        self.every_secs = every_secs
        self.t0 = self.last_line = time.perf_counter()
        self.bar = None
        terminal = sys.stderr.isatty() if terminal is None else terminal
        if enabled and terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=self.done, unit=unit, dynamic_ncols=True,
                            desc=what)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        new = self.done - self.start_count
        rate = new / elapsed if elapsed > 0 else 0.0
        shown = f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"
        text = f"{self.what}: {self.done:,}/{self.total:,} {self.unit}, {shown} {self.unit}/s"
        if self.done < self.total and rate > 0:
            text += f", about {duration((self.total - self.done) / rate)} left"
        return text + f" ({duration(elapsed)} so far)"

    def update(self, n: int) -> None:
        first = self.done == self.start_count
        self.done = min(self.total, self.done + n)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if first or now - self.last_line >= self.every_secs:
            self.last_line = now
            logging.info("%s", self.line())

    def close(self) -> float:
        """Ends the bar (or logs the last line); returns the seconds since the start."""
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.done > self.start_count:
            logging.info("%s", self.line())
        return time.perf_counter() - self.t0
