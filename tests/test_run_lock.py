"""One training per workdir (`dico_jax.run_lock`): a live holder refuses a second run, a
stale or dead one never blocks a restart."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from dico_jax import run_lock


def write_lock(workdir, **fields):
    record = {"host": "tpu-vm-7", "pid": 4242, "token": "other", "started": time.time() - 60,
              "heartbeat": time.time(), **fields}
    (workdir / run_lock.LOCK_NAME).write_text(json.dumps(record))


def test_a_live_holder_is_named_and_refuses(tmp_path):
    write_lock(tmp_path)
    with pytest.raises(run_lock.WorkdirInUse) as err:
        run_lock.RunLock(str(tmp_path), stale_after=60).acquire()
    message = str(err.value)
    assert "in use by another training: host tpu-vm-7, process 4242, since " in message
    assert "heartbeat 0 s ago" in message and run_lock.STALE_ENV in message


def test_a_stale_heartbeat_never_blocks(tmp_path):
    write_lock(tmp_path, heartbeat=time.time() - 61)
    lock = run_lock.RunLock(str(tmp_path), stale_after=60).acquire()
    held = json.loads((tmp_path / run_lock.LOCK_NAME).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    lock.release()
    assert not (tmp_path / run_lock.LOCK_NAME).exists()


def test_a_dead_process_on_this_host_is_stale_at_once(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_lock(tmp_path, host=socket.gethostname(), pid=gone.pid)
    with run_lock.RunLock(str(tmp_path), stale_after=3600):
        pass


def test_the_heartbeat_is_refreshed_while_held(tmp_path):
    with run_lock.RunLock(str(tmp_path), stale_after=0.4):
        first = json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["heartbeat"]
        time.sleep(0.5)
        later = json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["heartbeat"]
        assert later > first
        # Meanwhile another run (another token) is refused.
        with pytest.raises(run_lock.WorkdirInUse):
            run_lock.RunLock(str(tmp_path), stale_after=0.4).acquire()


def test_the_staleness_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(run_lock.STALE_ENV, "7")
    assert run_lock.stale_seconds() == 7.0
    monkeypatch.setenv(run_lock.STALE_ENV, "soon")
    with pytest.raises(run_lock.UserError, match=run_lock.STALE_ENV):
        run_lock.stale_seconds()
