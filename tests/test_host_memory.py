"""The host allocator setting for CPU runs (dico_jax.host_memory)."""
import os
import subprocess
import sys

import jax
import pytest

from dico_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A train-step-like program: donated state, one 64 MB temporary (16,384 pages). Minor page
# faults are counted over eight calls once the heap has settled.
_PROBE = """
import resource, sys
sys.path.insert(0, {root!r})
from dico_jax import host_memory
applied = host_memory.retain_freed_memory_on_cpu()
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w: x + jnp.tanh(x @ w), donate_argnums=0)
x, w = jnp.ones((16384, 1024)), jnp.eye(1024) * 0.5
for _ in range(12):
    x = f(x, w).block_until_ready()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    x = f(x, w).block_until_ready()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


def _probe(retain: str) -> tuple[bool, int]:
    env = dict(os.environ, DICO_JAX_RETAIN_HOST_MEMORY=retain, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = ""  # one CPU device, as a plain run
    out = subprocess.run([sys.executable, "-c", _PROBE.format(root=ROOT)], env=env,
                         capture_output=True, text=True, timeout=300, check=True).stdout
    applied, faults = out.split()[-2:]
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_retained_heap_stops_page_faults_on_every_call():
    applied, faults_retained = _probe("1")
    if not applied:
        pytest.skip("not glibc: mallopt unavailable")
    applied_default, faults_default = _probe("0")
    assert not applied_default
    # Default glibc: each call's temporary is a fresh mmap, faulted in page by page.
    assert faults_default > 8 * 16384 * 0.9, faults_default
    # Retained: the freed blocks are reused. Usually no fault at all; now and then (about one
    # run in ten here) small allocations split a freed block and the heap grows once or twice
    # (31,550 faults seen), still far from the default's two blocks on every call.
    assert faults_retained < 3 * 16384, (faults_retained, faults_default)


def test_cpu_runs_the_program_follows_jax_platforms():
    for platforms, expected in (("cpu", True), ("cuda,cpu", False), ("tpu", False),
                                ("cpu, cpu", True)):
        assert host_memory.cpu_runs_the_program(platforms) is expected, platforms
    assert host_memory.cpu_runs_the_program() is True  # conftest.py sets JAX_PLATFORMS=cpu


def test_env_var_turns_it_off(monkeypatch):
    monkeypatch.setenv(host_memory.ENV_VAR, "0")
    assert host_memory.retain_freed_memory_on_cpu() is False


def test_too_late_once_the_backend_runs():
    jax.device_count()  # starts the backend (conftest.py already did so at session start)
    assert host_memory.retain_freed_memory_on_cpu() is False
