"""The run's persistent compilation cache: a restart loads its train step instead of
compiling it again."""
import os
import subprocess

import jax
import pytest

from dico_jax import compilation_cache
from dico_jax.data import digits
from tests.test_train import ROOT, main_command


@pytest.fixture
def jax_cache_dir():
    """Sets JAX's cache folder option for a test (not the cache itself), then restores it."""
    saved = jax.config.jax_compilation_cache_dir
    yield lambda path: jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_compilation_cache_dir", saved)


def test_cache_folder_follows_config_then_jax_then_workdir(jax_cache_dir):
    jax_cache_dir(None)
    assert compilation_cache.resolve_dir("", "/runs/a") == "/runs/a/compilation_cache"
    assert compilation_cache.resolve_dir("gs://b/cache", "/runs/a") == "gs://b/cache"
    assert compilation_cache.resolve_dir("off", "/runs/a") is None
    assert compilation_cache.resolve_dir("", "gs://b/run") == "gs://b/run/compilation_cache"
    jax_cache_dir("/shared/cache")
    assert compilation_cache.resolve_dir("", "/runs/a") == "/shared/cache"
    assert compilation_cache.resolve_dir("/mine", "/runs/a") == "/mine"


@pytest.mark.slow
def test_a_restart_loads_the_train_step_from_the_cache_in_its_workdir(tmp_path):
    data_dir = str(tmp_path / "digits")
    digits.build_digits_dataset(data_dir)
    workdir = str(tmp_path / "run")
    # The default: a cache under the workdir, whatever the test harness set up.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}

    def start(steps):
        cmd = main_command(workdir, data_dir, num_train_steps=steps, checkpoint_every_steps=2)
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stderr

    first = start(2)
    assert "train step compiled in" in first
    cache = os.path.join(workdir, "compilation_cache")
    steps = [n for n in os.listdir(cache) if n.startswith("jit_step-")]
    assert len(steps) == 1, os.listdir(cache)

    restart = start(4)
    assert "resumed from the checkpoint of step 2" in restart
    # Every compilation of the train step was answered by the cache (JAX's monitoring
    # events), and the restart stored no second version of it.
    assert "train step loaded from the compilation cache" in restart, restart[-3000:]
    assert [n for n in os.listdir(cache) if n.startswith("jit_step-")] == steps
    assert "first step of this start done: step 3" in restart
