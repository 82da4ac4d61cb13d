"""One training per workdir: `WORKDIR/run.lock`.

Process 0 of a training writes the lock (host, process id, start time, heartbeat) when it
starts, rewrites the heartbeat every `stale_after / 4` seconds from a background thread and
removes the lock when it stops. A second training on the same workdir reads a live lock and
refuses, naming the holder. A lock left by a run that was killed or preempted never blocks its
restart: its heartbeat goes stale after DICO_JAX_LOCK_STALE_SECONDS (default 120), and on the
same host a holder whose process is gone is stale at once. The file goes through
`etils.epath`, so the same works on a gs:// workdir.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
import uuid

from etils import epath

from dico_jax.errors import UserError

LOCK_NAME = "run.lock"
STALE_ENV = "DICO_JAX_LOCK_STALE_SECONDS"
DEFAULT_STALE_SECONDS = 120.0


class WorkdirInUse(UserError):
    """Another live training holds the workdir."""


def stale_seconds() -> float:
    value = os.environ.get(STALE_ENV, "").strip()
    try:
        seconds = float(value) if value else DEFAULT_STALE_SECONDS
    except ValueError:
        raise UserError(f"{STALE_ENV}={value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise UserError(f"{STALE_ENV}={value!r} must be > 0")
    return seconds


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _when(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


class RunLock:
    """The lock of `workdir`; `acquire()` then `release()` (or use it as a context manager)."""

    def __init__(self, workdir: str, stale_after: float | None = None):
        self.path = epath.Path(workdir) / LOCK_NAME
        self.stale_after = stale_seconds() if stale_after is None else float(stale_after)
        self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                       "token": uuid.uuid4().hex, "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict | None:
        """The live holder's record, or None (no lock, a stale one or an unreadable one)."""
        try:
            held = json.loads(self.path.read_text())
            beat = float(held["heartbeat"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None
        if held.get("token") == self.record["token"]:
            return None
        if time.time() - beat > self.stale_after:
            return None
        if held.get("host") == self.record["host"] and not _process_alive(int(held.get("pid", 0))):
            return None
        return held

    def _write(self) -> None:
        record = {**self.record, "heartbeat": time.time()}
        tmp = self.path.parent / f".{LOCK_NAME}.{self.record['token']}.tmp"
        tmp.write_text(json.dumps(record))
        tmp.replace(self.path)

    def _refuse(self, held: dict) -> None:
        raise WorkdirInUse(
            f"{self.path.parent} is in use by another training: host {held.get('host')}, process "
            f"{held.get('pid')}, since {_when(float(held.get('started', 0)))} (heartbeat "
            f"{time.time() - float(held['heartbeat']):.0f} s ago); stop it first, or give "
            f"another --workdir (a killed run's lock expires after {self.stale_after:.0f} s, "
            f"{STALE_ENV})")

    def acquire(self) -> "RunLock":
        held = self.holder()
        if held is not None:
            self._refuse(held)
        self._write()
        # Two runs started together both found no lock; the later writer wins, the other
        # reads its record back and stops.
        time.sleep(min(0.5, self.stale_after / 10))
        try:
            current = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            current = {}
        if current.get("token") != self.record["token"] and current.get("heartbeat"):
            self._refuse(current)
        self._thread = threading.Thread(target=self._beat, name="dico_jax-run-lock", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        interval = self.stale_after / 4
        while not self._stop.wait(interval):
            try:
                self._write()
            except OSError:  # a full disk or a slow bucket: the next beat tries again
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            if json.loads(self.path.read_text()).get("token") == self.record["token"]:
                self.path.unlink()
        except (FileNotFoundError, ValueError, OSError):
            pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
