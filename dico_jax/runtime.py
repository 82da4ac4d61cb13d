"""Process start-up shared by every run-level command (`main`, `sample`, `evaluate`,
`data.extract`, the tools): the host-memory switch, quieter Orbax logs and JAX's
multi-controller runtime.

Call `start()` first thing in a command's `main`, before anything touches a JAX backend.

Process i of n joins its job from the environment:

    JAX_COORDINATOR_ADDRESS=host:port   process 0's address, the same on every process
    JAX_NUM_PROCESSES=n                 the number of processes
    JAX_PROCESS_ID=i                    this process, 0 .. n-1
    DICO_JAX_INIT_TIMEOUT=300           seconds to wait for every process to join
    DICO_JAX_HEARTBEAT_TIMEOUT=100      seconds of silence after which a process is lost

Cloud TPU VMs and Slurm jobs need none of these (JAX finds its peers there).
`python -m dico_jax.tools.local_pod` sets them for n processes on one machine.
"""
from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import sys
import threading
import time

import jax

from dico_jax import host_memory
from dico_jax.errors import UserError, show_tracebacks
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
        if f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        if record.levelno < logging.ERROR and "read only" in str(record.msg).replace("_", " "):
            return False  # the notes of every read-only look at a checkpoint (a run's steps)
        if record.exc_info and record.exc_info[1] is not None and not show_tracebacks():
            # A save that failed in Orbax's background thread (a full disk): its error, in
            # one line; the run then stops with its own line saying what to do.
            err = record.exc_info[1]
            why = " ".join(str(err).split())[:300]
            record.msg = f"{record.getMessage()} ({type(err).__name__}: {why})"
            record.args, record.exc_info, record.exc_text = (), None, None
        return record.levelno >= self.level


def quiet_orbax(level: int = logging.WARNING) -> None:
    """Installs `QuietOrbax` where absl prints what Orbax logs (unless absl is at DEBUG)."""
    from absl import logging as absl_logging

    if absl_logging.get_verbosity() >= absl_logging.DEBUG:
        return
    for target in (logging.getLogger("absl"), absl_logging.get_absl_handler()):
        if not any(isinstance(f, QuietOrbax) for f in target.filters):
            target.addFilter(QuietOrbax(level))


def quiet_closed_loop_callbacks() -> None:
    """TensorStore hands each finished write to the asyncio loop that awaited it. When a save
    fails (a full disk), Orbax's background thread closes that loop while the save's other
    writes are still finishing, and each of them then reports `RuntimeError: Event loop is
    closed` through `sys.unraisablehook` with a full traceback. The save's own failure reaches
    the main thread and ends the run with one line, so these say nothing more: they are logged
    at DEBUG (printed in full with DICO_JAX_TRACEBACKS=1)."""
    previous = sys.unraisablehook
    if getattr(previous, "dico_jax_quiet", False):
        return

    def hook(unraisable) -> None:
        err = unraisable.exc_value
        if (isinstance(err, RuntimeError) and str(err) == "Event loop is closed"
                and not show_tracebacks()):
            log.debug("a write finished after its event loop closed (a failed save)")
            return
        previous(unraisable)

    hook.dico_jax_quiet = True
    sys.unraisablehook = hook


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


class DistributedConfigError(UserError):
    """The environment's multi-process settings are missing, inconsistent or unreachable."""


# Bounds on the waits of the multi-process runtime (seconds), from the environment: how long
# to wait for every process to join, and after how long without a heartbeat a process is
# declared lost (the survivors then stop instead of waiting on it forever).
INIT_TIMEOUT_ENV = "DICO_JAX_INIT_TIMEOUT"
HEARTBEAT_TIMEOUT_ENV = "DICO_JAX_HEARTBEAT_TIMEOUT"
# Exit codes: a peer was lost (or failed); this process could not join the others.
EXIT_PEER_LOST = 75
EXIT_JOIN_FAILED = 76


def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedConfigError(f"{name}={value!r} is not an integer") from None


def explicit_process_env() -> tuple[str, int, int] | None:
    """(coordinator address, process count, process id) from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID; None when none is set. A partial or inconsistent
    set raises `DistributedConfigError`. On Cloud TPU and Slurm the count and id may be left
    out (JAX finds them there)."""
    address = os.environ.get("JAX_COORDINATOR_ADDRESS", "").strip()
    count = _env_int("JAX_NUM_PROCESSES")
    index = _env_int("JAX_PROCESS_ID")
    if not address and count is None and index is None:
        return None
    if not address:
        raise DistributedConfigError(
            "JAX_NUM_PROCESSES / JAX_PROCESS_ID are set but JAX_COORDINATOR_ADDRESS is not: set "
            "it to host:port of process 0 on every process")
    if count is None and index is None and _auto_detected_cluster():
        return None
    if count is None or index is None:
        missing = "JAX_NUM_PROCESSES" if count is None else "JAX_PROCESS_ID"
        raise DistributedConfigError(
            f"JAX_COORDINATOR_ADDRESS={address} is set but {missing} is not: every process needs "
            "the process count and its own id (0 .. count-1)")
    if count < 2:
        raise DistributedConfigError(
            f"JAX_NUM_PROCESSES={count} with a coordinator ({address}): a single process needs "
            "no coordinator; unset JAX_COORDINATOR_ADDRESS, or give the real process count")
    if not 0 <= index < count:
        raise DistributedConfigError(f"JAX_PROCESS_ID={index} is outside 0 .. {count - 1}")
    if ":" not in address:
        raise DistributedConfigError(f"JAX_COORDINATOR_ADDRESS={address} needs a port (host:port)")
    return address, count, index


def _auto_detected_cluster() -> bool:
    env = os.environ
    return bool(env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES")
                or int(env.get("SLURM_NTASKS", "1") or 1) > 1
                or (sharding_lib.tpu_chips_present() and importlib.util.find_spec("libtpu")))


def initialize_distributed() -> None:
    """Joins the job's other processes when the environment says there are any.

    On the CPU backend the collectives between processes go through gloo. Joining waits at
    most DICO_JAX_INIT_TIMEOUT seconds (default 300); a process that stops sending heartbeats
    for DICO_JAX_HEARTBEAT_TIMEOUT seconds (default 100) is declared lost and the others stop.
    """
    if jax.distributed.is_initialized():
        return
    explicit = explicit_process_env()
    if explicit is None and not on_multiprocess_runtime():
        return
    # Must be set before the CPU backend starts; without it CPU processes share no collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    init_timeout = _env_int(INIT_TIMEOUT_ENV, 300)
    heartbeat = _env_int(HEARTBEAT_TIMEOUT_ENV, 100)
    kwargs = dict(initialization_timeout=init_timeout, heartbeat_timeout_seconds=heartbeat)
    if explicit is not None:
        address, count, index = explicit
        kwargs.update(coordinator_address=address, num_processes=count, process_id=index)
    where = (f"process {explicit[2]} of {explicit[1]} via the coordinator at {explicit[0]}"
             if explicit else "the processes of the detected cluster")
    problem = (f"could not join {where} within {init_timeout} s ({INIT_TIMEOUT_ENV}): check that "
               "every process was started, with the same JAX_NUM_PROCESSES and "
               "JAX_COORDINATOR_ADDRESS, and that process 0 is reachable at that address")
    log.info("joining %s (waiting at most %d s)", where, init_timeout)

    # A join that times out aborts inside the runtime with a bare C++ log line; say what to
    # check first, just before that happens.
    def give_up():
        sys.stderr.write(f"\nERROR: {problem}\n")
        sys.stderr.flush()
        os._exit(EXIT_JOIN_FAILED)

    timer = threading.Timer(init_timeout, give_up)
    timer.daemon = True
    timer.start()
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - the runtime raises its own types
        raise DistributedConfigError(f"{problem} ({type(e).__name__}: {e})") from e
    finally:
        timer.cancel()
    use_distributed_barriers()
    global _WATCH
    _WATCH = PeerWatch(heartbeat)
    _WATCH.start()


_WATCH: "PeerWatch | None" = None


def report_failure(text: str) -> None:
    """Tells the other processes that this one stops on an error (a user error it printed
    itself), so they stop too instead of waiting for it in a collective."""
    if _WATCH is not None:
        _WATCH.report("failed", text[:500])


def use_distributed_barriers() -> None:
    """Orbax barriers through the coordination service instead of a device all-reduce.

    Orbax's default barrier is `multihost_utils.sync_global_devices`, a collective program
    that Orbax itself warns must never run concurrently with other collectives, and that waits
    forever when a peer is gone; the coordination service's barrier launches no device
    program and has a timeout.
    """
    import orbax.checkpoint  # noqa: F401  (defines the flag)
    from absl import flags

    flag = flags.FLAGS["experimental_orbax_use_distributed_barrier"]
    flag.value = True
    flag.present = 1  # readable even where the command parses no absl flags


class PeerWatch(threading.Thread):
    """Stops this process, naming the peer, when another process of the job dies or fails.

    Left alone, a survivor waits in its next collective until JAX's own heartbeat check
    aborts it with a C++ log line that does not say what to do. Each process beats a counter
    in the coordination service's key-value store every second; a peer whose counter stands
    still for half the heartbeat timeout (so this fires first) and that did not say it
    finished cleanly is lost, and a peer that reports an uncaught exception has failed.
    Either way this process prints which one and exits with EXIT_PEER_LOST: a pod job is
    restarted whole, and resumes from its last complete checkpoint.
    """

    PREFIX = "dico_jax/peer/"

    def __init__(self, heartbeat_timeout: int):
        super().__init__(name="dico_jax-peer-watch", daemon=True)
        from jax._src import distributed

        self.client = distributed.global_state.client
        self.index, self.count = jax.process_index(), jax.process_count()
        self.lost_after = max(2.0, heartbeat_timeout / 2)
        self.interval = min(1.0, self.lost_after / 4)
        self._beat = 0
        self._failed = None
        previous_hook = sys.excepthook

        def hook(kind, value, tb):
            self.report("failed", f"{kind.__name__}: {value}"[:500])
            previous_hook(kind, value, tb)
            sys.stdout.flush()
            sys.stderr.flush()
            # Leave now: the runtime's shutdown at exit waits for every peer, and the peers
            # are still working (until they read the report above).
            os._exit(1)

        sys.excepthook = hook
        atexit.register(lambda: self.report("exited", "ok"))

    def report(self, what: str, text: str) -> None:
        try:
            if what == "exited" and self._failed is None:
                self.client.key_value_set(f"{self.PREFIX}exited/{self.index}", text, True)
            elif what == "failed":
                self._failed = text
                self.client.key_value_set(f"{self.PREFIX}failed/{self.index}", text, True)
        except Exception:  # noqa: BLE001 - the coordinator may be gone already
            pass

    def _stop(self, message: str) -> None:
        sys.stderr.write(f"\nERROR (process {self.index} of {self.count}): {message}. This "
                         "process stops too; restart the whole job to resume from its last "
                         "complete checkpoint.\n")
        sys.stderr.flush()
        os._exit(EXIT_PEER_LOST)

    def run(self) -> None:
        seen: dict[int, tuple[str, float]] = {}
        unreachable_since = None
        while True:
            now = time.monotonic()
            try:
                self._beat += 1
                self.client.key_value_set(f"{self.PREFIX}beat/{self.index}", str(self._beat), True)
                entries = dict(self.client.key_value_dir_get(self.PREFIX))
                unreachable_since = None
            except Exception as e:  # noqa: BLE001
                unreachable_since = unreachable_since or now
                if now - unreachable_since > self.lost_after:
                    self._stop(f"lost the coordinator, process 0 ({type(e).__name__})")
                time.sleep(self.interval)
                continue
            if self._failed is not None:
                return
            for peer in range(self.count):
                if peer == self.index or f"{self.PREFIX}exited/{peer}" in entries:
                    continue
                failure = entries.get(f"{self.PREFIX}failed/{peer}")
                if failure is not None:
                    self._stop(f"process {peer} failed ({failure})")
                beat = entries.get(f"{self.PREFIX}beat/{peer}", "")
                if seen.get(peer, (None,))[0] != beat:
                    seen[peer] = (beat, now)
                elif now - seen[peer][1] > self.lost_after:
                    self._stop(f"lost process {peer}: no sign of life for "
                               f"{now - seen[peer][1]:.0f} s (killed, preempted or hung)")
            time.sleep(self.interval)


def quiet_backends() -> None:
    """JAX's notes on the backends it could not start (libtpu missing on a CPU host, at INFO)
    and the gloo transport's notes on every connection of a CPU pod (C++ INFO logs, up to
    32 lines per process) say nothing a user acts on: keep warnings and errors."""
    from absl import logging as absl_logging

    if absl_logging.get_verbosity() >= absl_logging.DEBUG:
        return
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


def import_quietly(module: str) -> None:
    """Imports `module` with the process's stderr (fd 2) closed meanwhile: TensorFlow (which
    clu's metric writers load) prints C++ notes as it loads (oneDNN, CPU features,
    absl::InitializeLog) that no setting turns off. Python errors still raise."""
    from absl import logging as absl_logging

    if module in sys.modules or absl_logging.get_verbosity() >= absl_logging.DEBUG:
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        importlib.import_module(module)
    except ImportError:
        pass  # the caller's own import says what is missing
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def start(orbax_level: int = logging.WARNING) -> None:
    """Start-up of a command: host memory (before the backend starts), logs, processes."""
    quiet_backends()
    if host_memory.retain_freed_memory_on_cpu():
        log.debug("CPU backend: the host allocator keeps freed memory (dico_jax.host_memory)")
    quiet_orbax(orbax_level)
    quiet_closed_loop_callbacks()
    initialize_distributed()
    log.info("JAX process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
