"""Long work says how far it is: a line after the first batch with the rate and the time
left, then periodic lines, when stderr is not a terminal."""
from __future__ import annotations

import logging
import time

from dico_jax import progress


def test_progress_lines_say_count_rate_and_time_left(caplog):
    caplog.set_level(logging.INFO)
    bar = progress.Progress("sampling", 50_000, done=1_000, every_secs=3600, terminal=False)
    time.sleep(0.05)
    bar.update(500)  # the first batch: a line at once, with the whole run's time
    bar.update(500)  # within every_secs: no line
    bar.close()  # the last line
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sampling")]
    assert len(lines) == 2, lines
    assert lines[0].startswith("sampling: 1,500/50,000 img, ") and " img/s, about " in lines[0]
    assert " left (" in lines[0] and "so far)" in lines[0]
    assert lines[1].startswith("sampling: 2,000/50,000 img")


def test_durations_read_as_a_person_would():
    assert progress.duration(9.4) == "9 s"
    assert progress.duration(760) == "12 min 40 s"
    assert progress.duration(3 * 3600 + 5 * 60 + 20) == "3 h 05 min"
