"""Time to the first train step: a first start against a restart that finds its compiled
programs in the persistent compilation cache (`config.compilation_cache_dir`).

    python bench/restart.py [--models digits,DiCo-XL] [--repeats 1] [--out /tmp/restart]

digits: the real trainer (`python -m dico_jax.main --config=configs/digits.py`) as a fresh
process each time, timed from its launch to its log line "first step of this start done":
a first start (empty workdir and cache), a restart that resumes the checkpoint with the
cache, and the same restart with the cache off.

DiCo-XL (bf16, global batch 1, one CPU device): a fresh process runs what the trainer runs
before its first step up to the compiled programs (config, model, optimizer, `init` and the
train step compiled for the trainer's mesh and shardings), timed from launch to both
programs ready, with an empty cache and then with the cache the first process filled. It
compiles from abstract inputs and allocates no weights: DiCo-XL's train state (701M
parameters, EMA and Adam moments in float32, about 11 GB) is left out, so the parameter
init of a first start and the checkpoint read of a restart are not in these figures.

Prints a table; each figure is the median of --repeats runs.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_STEP_LINE = "first step of this start done"
READY_LINE = "restart-bench: programs ready"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONUNBUFFERED="1", XLA_FLAGS=" ".join(flags))
    return env


def time_to_line(cmd: list[str], marker: str, log_path: str, timeout: float = 3600) -> float:
    """Seconds from launching `cmd` to its first output line holding `marker`; the process
    then runs to its end (its output goes to `log_path`)."""
    start = time.perf_counter()
    seen = threading.Event()
    found: list[float] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

        def pump():
            for line in proc.stdout:
                if marker in line and not seen.is_set():
                    found.append(time.perf_counter() - start)
                    seen.set()
                log.write(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        code = proc.wait(timeout=timeout)
        reader.join(timeout=10)
    if code or not found:
        raise SystemExit(f"restart.py: error: {' '.join(cmd[:4])} ... exited with {code} "
                         f"{'before its first step' if not found else ''}; see {log_path}")
    return found[0]


# ------------------------------------------------------------------------------ digits

def digits_command(workdir: str, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dico_jax.main", "--config=configs/digits.py",
            f"--workdir={workdir}", f"--config.num_train_steps={steps}",
            "--config.checkpoint_every_steps=2", "--config.eval.every_steps=0",
            "--config.keep_every_steps=0", "--config.sample_at_end=False", *extra]


def bench_digits(out: str, repeat: int) -> dict[str, float]:
    workdir = os.path.join(out, f"digits_{repeat}")
    shutil.rmtree(workdir, ignore_errors=True)
    log = os.path.join(out, f"digits_{repeat}")
    return {
        "first start": time_to_line(digits_command(workdir, 2), FIRST_STEP_LINE, log + "_first.log"),
        "restart": time_to_line(digits_command(workdir, 4), FIRST_STEP_LINE, log + "_restart.log"),
        "restart, cache off": time_to_line(
            digits_command(workdir, 6, "--config.compilation_cache_dir=off"), FIRST_STEP_LINE,
            log + "_nocache.log"),
    }


# ------------------------------------------------------------------------------ DiCo-XL

def compile_programs(model_name: str, cache_dir: str) -> None:
    """Runs in a fresh process: the trainer's programs of `model_name`, compiled as the trainer
    compiles them before its first step, through the cache in `cache_dir`."""
    import types

    from dico_jax import runtime

    runtime.start()
    import jax

    from configs import dico as dico_config
    from dico_jax import builders, compilation_cache, train
    from dico_jax import sharding as sharding_lib
    from dico_jax.train_step import batch_spec, init_state, make_train_step

    config = dico_config.get_config(model_name.removeprefix("DiCo-"))
    config.dtype = "bfloat16"
    config.global_batch_size = 1
    config.compilation_cache_dir = cache_dir
    latent_shape = (config.resolution // 8, config.resolution // 8, 4)
    config = train.resolve_config(
        config, types.SimpleNamespace(latent_shape=latent_shape, num_classes=1000))
    compilation_cache.enable(config.compilation_cache_dir, None)
    mesh = sharding_lib.create_mesh(config.mesh)
    model = builders.build_model(config)
    diffusion = builders.build_diffusion(config)
    tx, lr_schedule = builders.build_optimizer(config)
    init, abstract_state, shardings = init_state(config, model, tx, mesh, latent_shape)
    with compilation_cache.timed_compile("init") as init_info:
        init.func.lower(*init.args).compile()
    state = sharding_lib.with_shardings(abstract_state, shardings)
    with compilation_cache.timed_compile("train step") as step_info:
        make_train_step(config, model, diffusion, tx, lr_schedule, shardings, mesh).lower(
            state, batch_spec(config, mesh, latent_shape)).compile()
    print(f"{READY_LINE}: init {init_info['secs']:.1f} s (cached {init_info['cached']}), "
          f"train step {step_info['secs']:.1f} s (cached {step_info['cached']})", flush=True)


def bench_compiled(model_name: str, out: str, repeat: int) -> dict[str, float]:
    cache = os.path.join(out, f"{model_name}_{repeat}_cache")
    shutil.rmtree(cache, ignore_errors=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--compile_only", model_name,
           "--cache", cache]
    log = os.path.join(out, f"{model_name}_{repeat}")
    return {"first start": time_to_line(cmd, READY_LINE, log + "_first.log"),
            "restart": time_to_line(cmd, READY_LINE, log + "_restart.log")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits,DiCo-XL")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default="/tmp/restart_bench", help="workdirs, caches and logs")
    ap.add_argument("--compile_only", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.compile_only:
        compile_programs(args.compile_only, args.cache)
        return
    os.makedirs(args.out, exist_ok=True)
    print(f"{'model':10} {'start':20} {'to first step (s)':>18} {'x first start':>14}")
    for name in args.models.split(","):
        runs = [bench_digits(args.out, r) if name == "digits" else
                bench_compiled(name, args.out, r) for r in range(args.repeats)]
        first = statistics.median(run["first start"] for run in runs)
        for kind in runs[0]:
            secs = statistics.median(run[kind] for run in runs)
            print(f"{name:10} {kind:20} {secs:18.1f} {secs / first:14.2f}", flush=True)


if __name__ == "__main__":
    main()
