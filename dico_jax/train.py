"""The training loop: data, checkpoints, metrics, sample grids and preemption around the
sharded step of `dico_jax.train_step`.

`train_and_evaluate(config, workdir)` trains to `config.num_train_steps`, resuming from the
latest checkpoint in `workdir`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from dico_jax import builders, chips, errors, run_lock, storage
from dico_jax import compilation_cache, profiling
from dico_jax import sharding as sharding_lib
from dico_jax.errors import UserError
from dico_jax.models import check_norm_impl, count_params, forward_flops_per_image
from dico_jax.train_step import (Metrics, TrainState, batch_spec, init_state, make_train_step)


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss or gradient norm of a step was NaN or infinite (the run's settings or data are
    to blame, so it ends as a user error: one line, the last good checkpoint intact)."""


def load_initial_weights(state: TrainState, directory: str, shardings: TrainState) -> TrainState:
    """`state` with params and EMA taken from the checkpoint in `directory` (latest step).

    The optimizer state and step stay those of `state` (a fresh run). Shapes must match.
    """
    from dico_jax import checkpoint as ckpt_lib

    ckpt_dir, step = ckpt_lib.resolve_checkpoint_path(directory)
    weights, step = ckpt_lib.restore_to_host(ckpt_dir, step, items=("params", "ema_params"))
    for name in ("params", "ema_params"):
        want = {jax.tree_util.keystr(p): tuple(x.shape)
                for p, x in jax.tree_util.tree_leaves_with_path(getattr(state, name))}
        have = {jax.tree_util.keystr(p): tuple(np.shape(x))
                for p, x in jax.tree_util.tree_leaves_with_path(weights[name])}
        if want != have:
            bad = sorted(set(want.items()) ^ set(have.items()))[:10]
            raise UserError(f"init_from {directory} (step {step}): {name} do not match this "
                             f"config's model; differing (path, shape) entries: {bad}")
    return state.replace(params=jax.device_put(weights["params"], shardings.params),
                         ema_params=jax.device_put(weights["ema_params"], shardings.ema_params))


# ---------------------------------------------------------------------------------------------
# Data.


def check_settings(config: ml_collections.ConfigDict) -> None:
    """The checks of `validate_config` that need no devices: run by the entry points (training,
    `tools.plan`, `launch/tpu.py`) before any start-up work."""
    for field in ("resolution",):
        if config[field] < 1:
            raise UserError(f"config.{field} must be >= 1, got {config[field]}")
    for field, low in (("num_samples", 1), ("batch_size", 0), ("grid_per_class", 0)):
        value = config.sampling.get(field)
        if value is not None and value < low:
            raise UserError(f"config.sampling.{field} must be >= {low}, got {value}")
    for field, low in (("num_samples", 1), ("batch_size", 0), ("every_steps", 0)):
        value = config.eval.get(field)
        if value is not None and value < low:
            raise UserError(f"config.eval.{field} must be >= {low}, got {value}")
    for field in ("global_batch_size", "num_train_steps", "log_every_steps",
                  "checkpoint_every_steps", "keep_checkpoints", "grad_accum_steps"):
        if config[field] < 1:
            raise UserError(f"config.{field} must be >= 1, got {config[field]}")
    for field in ("sample_every_steps", "keep_every_steps", "warmup_steps"):
        if config[field] < 0:
            raise UserError(f"config.{field} must be >= 0, got {config[field]}")
    for field in ("learning_rate", "adam_b1", "adam_b2", "adam_eps", "weight_decay",
                  "ema_decay", "grad_clip_norm"):
        if not math.isfinite(config[field]) or config[field] < 0:
            raise UserError(f"config.{field} must be a finite number >= 0, got {config[field]}")
    if config.ema_decay > 1.0:
        raise UserError(f"config.ema_decay must lie in [0, 1], got {config.ema_decay}")
    try:
        profiling.parse_spec(config.get("profile"))
    except ValueError as err:
        raise UserError(str(err)) from None
    if config.dtype not in ("float32", "bfloat16"):
        raise UserError(f"config.dtype must be 'float32' or 'bfloat16', got {config.dtype!r}")
    if config.data.builtin == "digits" and not config.data.dir:
        check_unused_files(config, False, "the built-in digits")


def check_unused_files(config: ml_collections.ConfigDict, latent: bool, what: str) -> None:
    """A file named in the config that this run would not read: said, not ignored. Pixel data
    (`what` names them) need no VAE, and are scored with the digits' own network."""
    if latent:
        return
    for field in ("vae_weights", "eval.vae_weights", "eval.reference", "eval.inception_weights"):
        section, _, leaf = field.rpartition(".")
        value = (config[section] if section else config).get(leaf)
        if value:
            raise UserError(f"config.{field}={value}: {what} are pixels, so this run uses no "
                            f"such file; leave config.{field} empty")


def check_workdir(workdir: str) -> None:
    """A workdir that exists as a file: one line, before anything starts."""
    if epath.Path(workdir).is_file():
        raise UserError(f"--workdir {workdir} is a file; give a folder (new or a run's)")


def validate_config(config: ml_collections.ConfigDict,
                    num_devices: int | None = None) -> None:
    """Clear errors, before anything is built or compiled, for settings that would otherwise
    fail deep inside the loop (`num_devices`: the devices of all processes, by default
    `jax.device_count()`)."""
    check_settings(config)
    try:
        norm_impl = config.model.get("norm_impl", "xla")
        check_norm_impl(norm_impl, jax.default_backend(), "config.model.norm_impl")
        if norm_impl != "xla" and builders.diffusion_kind(config) == "meanflow":
            # The kernels replace the layer norm's backward pass only; MeanFlow also needs its
            # forward-mode derivative, which a custom_vjp function cannot give.
            raise ValueError(
                f"config.model.norm_impl={norm_impl!r}: MeanFlow differentiates the network in "
                "forward mode (a JVP), which the Pallas layer-norm kernels do not provide; use "
                "config.model.norm_impl=xla")
        slices = sharding_lib.num_slices() if num_devices is None else 1
        num_devices = jax.device_count() if num_devices is None else num_devices
        axes = sharding_lib.resolve_axis_sizes(config.mesh, num_devices, slices)
    except ValueError as err:
        raise UserError(str(err)) from None
    # The objective, and the samplers of the grids and evaluations, which must fit it: checked
    # now, not at the first grid or evaluation.
    from dico_jax.evaluation import during_training
    from dico_jax.sampling import sampler as sampler_lib

    try:
        builders.build_diffusion(config)
    except ValueError as err:
        raise UserError(str(err)) from None
    sampler_lib.Settings.from_config(config, num_devices)
    during_training.settings_from_config(config, num_devices)
    # The global batch is split over every device (and so over every process), and each
    # micro-batch of gradient accumulation too.
    per_step = int(config.grad_accum_steps) * num_devices
    if config.global_batch_size % per_step:
        what = (f"{num_devices} devices" if config.grad_accum_steps == 1 else
                f"config.grad_accum_steps={config.grad_accum_steps} micro-batches over "
                f"{num_devices} devices")
        raise UserError(
            f"config.global_batch_size={config.global_batch_size} does not split into "
            f"{what} (mesh {axes}, {jax.process_count()} processes): use a multiple of "
            f"{per_step}")


def prepare_data(config: ml_collections.ConfigDict, workdir: str):
    """(data dir, manifest); builds the built-in digits dataset under the workdir if asked."""
    from dico_jax.data import records

    if config.data.dir:
        return config.data.dir, records.read_manifest(config.data.dir)
    if config.data.builtin == "digits":
        from dico_jax.data import digits

        data_dir = digits.default_digits_dir(workdir)
        if jax.process_index() == 0:
            digits.build_digits_dataset(data_dir)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("digits dataset written")
        return data_dir, records.read_manifest(data_dir)
    raise UserError(
        "config.data.dir is empty: set --config.data.dir to a latent dataset (manifest.json and "
        "ArrayRecord shards from dico_jax.data), or --config.data.builtin=digits")


def check_data_matches_config(config: ml_collections.ConfigDict, manifest: Any,
                              data_dir: str) -> None:
    from dico_jax.data import spec as data_spec

    data_spec.check_vae_kind(config, manifest, data_dir)
    h, w, c = manifest.latent_shape
    downsample = 1 if manifest.pixels else data_spec.VAE_GEOMETRY[manifest.kind][0]
    if h * downsample != config.resolution or w * downsample != config.resolution:
        raise UserError(
            f"config.resolution={config.resolution} needs {config.resolution // downsample}^2 "
            f"latents, but {data_dir} holds {h}x{w}x{c} (vae {manifest.vae!r}): set "
            f"--config.resolution={h * downsample} or point config.data.dir at data of that size")
    for field, expected in (("in_channels", c), ("num_classes", manifest.num_classes)):
        value = config.model.get(field)
        if value is not None and value != expected:
            raise UserError(f"config.model.{field}={value} but the data in {data_dir} has "
                            f"{expected}: leave it unset to follow the data")


def resolve_config(config: ml_collections.ConfigDict, manifest: Any) -> ml_collections.ConfigDict:
    """A copy with the model fields taken from the data filled in (saved with the run)."""
    config = ml_collections.ConfigDict(config.to_dict())
    c = manifest.latent_shape[-1]
    if config.model.in_channels is None:
        config.model.in_channels = c
    if config.model.out_channels is None:
        config.model.out_channels = 2 * c if config.diffusion.learn_sigma else c
    if config.model.num_classes is None:
        config.model.num_classes = manifest.num_classes
    if manifest.latent_mean is not None:
        # Saved with the run, so that sampling its checkpoints can undo the normalisation
        # without the dataset.
        config.data.latent_mean = list(manifest.latent_mean)
        config.data.latent_std = list(manifest.latent_std)
    return config


# ---------------------------------------------------------------------------------------------
# Preemption.


class PreemptionWatch:
    """SIGTERM sets a flag that the loop reads each step (single process).

    With several processes the flag must agree across them: JAX's preemption sync point
    (set up by `jax.distributed.initialize`) gives every process the same answer.
    """

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None
        self._multi = jax.process_count() > 1
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        del signum, frame
        self._flag.set()

    def reached(self, step: int, checkpointer: Any) -> bool:
        if self._multi:
            return checkpointer.manager.reached_preemption(step)
        return self._flag.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


# ---------------------------------------------------------------------------------------------
# The loop.


class _StepLog:
    """Host side of the per-step metrics: finiteness check, interval means, the loss log.

    Metrics are read one step late so the host never waits on the step it just dispatched.
    """

    def __init__(self, losses_path: str | None):
        self.pending: list[tuple[int, Metrics]] = []
        self.sums: dict[str, float] = {}
        self.count = 0
        self.last: dict[str, float] = {}
        self.losses_file = None
        if losses_path:
            path = epath.Path(losses_path)
            # A run killed mid-line leaves a partial record; start on a fresh line.
            text = path.read_text() if path.exists() else ""
            partial = bool(text) and not text.endswith("\n")
            # On Cloud Storage each flush uploads the whole file again: a debugging aid only.
            self._opened = path.open("a")
            self.losses_file = self._opened.__enter__()
            if partial:
                self.losses_file.write("\n")

    def add(self, step: int, metrics: Metrics) -> None:
        self.pending.append((step, metrics))

    def drain(self, keep_last: bool = False) -> None:
        """Reads the pending metrics (all, or all but the newest); raises on a bad step."""
        ready = self.pending[:-1] if keep_last else self.pending
        self.pending = self.pending[len(ready):]
        for step, metrics in ready:
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
                raise NonFiniteLossError(
                    f"non-finite training loss at step {step}: loss={values['loss']}, "
                    f"grad_norm={values['grad_norm']}; training stopped")
            for k, v in values.items():
                self.sums[k] = self.sums.get(k, 0.0) + v
            self.count += 1
            self.last = values
            if self.losses_file is not None:
                self.losses_file.write(json.dumps({"step": step, **values}) + "\n")
                self.losses_file.flush()

    def interval_means(self) -> dict[str, float]:
        means = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        means["lr"] = self.last.get("lr", 0.0)
        self.sums, self.count = {}, 0
        return means

    def close(self) -> None:
        if self.losses_file is not None:
            self._opened.__exit__(None, None, None)
            self.losses_file = None


PARAMETERS_FILE = "parameters.txt"


class _TrainingClock:
    """Wall time less the spans spent in `paused()` (evaluations, grids, checkpoints)."""

    def __init__(self):
        self.excluded = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.excluded

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        took = [0.0]
        try:
            yield lambda: took[0]
        finally:
            took[0] = time.perf_counter() - t0
            self.excluded += took[0]


def _write_grid(grid: Any, ema_params: Any, workdir: str, step: int) -> None:
    is_chief = jax.process_index() == 0
    if is_chief:
        logging.info("grid of step %d: drawing %d x %d samples ...", step, *grid.shape)
    t0 = time.perf_counter()
    path = grid.write(ema_params, workdir, step)
    if is_chief:
        logging.info("grid of step %d: wrote %s in %.1f s", step, path, time.perf_counter() - t0)


def write_run_config(config: ml_collections.ConfigDict, workdir: str, extra: Mapping[str, Any]) -> None:
    """`config.json` in the workdir: the resolved config plus facts about the model."""
    record = json.loads(config.to_json_best_effort())
    record.update(extra)
    text = json.dumps(record, indent=2, sort_keys=True).encode()
    storage.atomic_write(epath.Path(workdir) / "config.json", lambda f: f.write(text))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState | None:
    """Trains to `config.num_train_steps`, resuming from the latest checkpoint in `workdir`.

    Returns the final state (None for a run that was already finished: nothing is built).
    A run on Cloud Storage rides out outages that the storage layers' retries cover; one that
    lasts longer stops the run with `StorageUnavailable` naming the bucket (the checkpoints
    already complete stay so, and the same command resumes from the newest).
    """
    try:
        return _train_and_evaluate(config, workdir)
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as err:
        if not storage.is_remote(workdir) or (reason := storage.unreachable(workdir)) is None:
            raise
        raise errors.StorageUnavailable(
            f"Cloud Storage bucket {storage.bucket(workdir)} cannot be reached ({reason}); the run "
            "stopped after retrying. Rerun the same command once it answers: the run resumes "
            "from its last complete checkpoint") from err


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState | None:
    """The run under `train_and_evaluate`: checks, the workdir's run lock, then `_train`.
    Stops early, after saving, when SIGTERM arrives; raises
    `NonFiniteLossError` (without saving) at the first step whose loss or gradient is not finite.
    """
    from dico_jax import checkpoint as ckpt_lib

    validate_config(config)
    workdir = ckpt_lib.resolve_workdir(workdir)  # local path or gs://...
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    is_chief = jax.process_index() == 0
    # One training per workdir: process 0 holds the lock while the run lives.
    lock = run_lock.RunLock(workdir).acquire() if is_chief else None
    try:
        return _train(config, workdir)
    finally:
        if lock is not None:
            lock.release()


def finished_step(config: ml_collections.ConfigDict, workdir: str) -> int | None:
    """The step of the run's last checkpoint when it has reached `config.num_train_steps`
    and left no evaluation undone; None when there is work left."""
    from dico_jax import checkpoint as ckpt_lib
    from dico_jax.evaluation import during_training

    directory = ckpt_lib.checkpoint_dir(workdir)
    saved = ckpt_lib.saved_steps(directory)
    if not saved or saved[-1] < config.num_train_steps:
        return None
    if not ckpt_lib.matches_final_record(directory, saved[-1]):
        return None  # not what the run finished with (damaged, or older): the full start-up
    try:
        saved_config = ckpt_lib.read_config(directory, saved[-1])
    except Exception:  # noqa: BLE001 - an older or damaged step: the full start-up decides
        return None
    # Another model than the run's is a mistake to name, not a finished run.
    ckpt_lib.check_same_model(saved_config, config, f"{directory}/{saved[-1]}")
    if during_training.active(config):
        every = int(config.eval.every_steps)
        done = set(during_training.evaluated_steps(workdir))
        if any(s not in done for s in range(every, saved[-1] + 1, every)):
            return None
    return saved[-1]


def _train(config: ml_collections.ConfigDict, workdir: str) -> TrainState | None:
    started = time.perf_counter()
    is_chief = jax.process_index() == 0
    finished = finished_step(config, workdir)
    if finished is not None:
        # Nothing is built or compiled for a run that has nothing left to do.
        logging.info("the run in %s is finished: it has the checkpoint of step %d "
                     "(config.num_train_steps=%d); nothing to do (raise "
                     "--config.num_train_steps to train further)", workdir, finished,
                     config.num_train_steps)
        return None

    from dico_jax import runtime

    runtime.import_quietly("tensorflow")  # before clu loads it
    from clu import metric_writers, parameter_overview, periodic_actions

    from dico_jax import checkpoint as ckpt_lib
    from dico_jax.data import pipeline
    from dico_jax.data import spec as data_spec

    # Before anything compiles: a restart loads the programs of the previous start.
    compilation_cache.enable(config.get("compilation_cache_dir", ""), workdir)

    data_dir, manifest = prepare_data(config, workdir)
    check_data_matches_config(config, manifest, data_dir)
    config = resolve_config(config, manifest)
    latent_shape = tuple(manifest.latent_shape)
    space = data_spec.from_manifest(manifest)
    check_unused_files(config, space.vae, f"the data in {data_dir}")
    # Missing weights or references for the grids or evaluations: an error now, not later.
    from dico_jax.evaluation import during_training
    from dico_jax.sampling import grid as sampling_grid

    sampling_grid.check_grid_config(config, space)
    during_training.validate(config, space.vae)

    mesh = sharding_lib.create_mesh(config.mesh)
    model = builders.build_model(config)
    diffusion = builders.build_diffusion(config)
    tx, lr_schedule = builders.build_optimizer(config)
    init, abstract_state, shardings = init_state(config, model, tx, mesh, latent_shape)

    flops_per_image = forward_flops_per_image(model, *latent_shape)
    num_params = count_params(abstract_state.params)
    if is_chief:
        write_run_config(config, workdir, {
            "forward_flops_per_image": flops_per_image, "num_params": num_params,
            "latent_shape": list(latent_shape), "data_dir": ckpt_lib.resolve_workdir(data_dir)})
    logging.info("mesh %s on %d devices (%s); %s: %d parameters, %.3g forward FLOPs per image",
                 dict(mesh.shape), mesh.size, jax.devices()[0].device_kind, config.model.name,
                 num_params, flops_per_image)
    if mesh.shape["slice"] > 1:
        logging.info("slices (data parallel between them): %s", "; ".join(
            f"slice {i}: processes {p}"
            for i, p in enumerate(sharding_lib.slice_processes(mesh))))

    data_iterator = pipeline.create_train_iterator(
        data_dir, global_batch_size=config.global_batch_size, seed=config.seed,
        random_flip=config.data.random_flip, worker_count=config.data.worker_count)
    checkpointer = ckpt_lib.TrainCheckpointer(
        ckpt_lib.checkpoint_dir(workdir), keep=config.keep_checkpoints,
        keep_every=config.keep_every_steps, timeout_secs=config.checkpoint_timeout_secs)
    latest = checkpointer.latest_step()
    if latest is not None:
        ckpt_lib.check_same_model(checkpointer.saved_config(latest), config,
                                  f"{checkpointer.directory}/{latest}")
    target = sharding_lib.with_shardings(abstract_state.to_dict(), shardings.to_dict())
    try:
        restored = checkpointer.restore_newest(target, data_iterator)
    except BaseException:
        checkpointer.close()  # its threads would otherwise report over the error at exit
        raise
    if restored is None:
        state = init()
        if config.init_from:
            state = load_initial_weights(state, config.init_from, shardings)
            logging.info("starting from the weights of %s", config.init_from)
    else:
        state = TrainState(**restored[1])
        logging.info("resumed from the checkpoint of step %d", restored[0])
    start_step = int(jax.device_get(state.step))

    # Metrics from process 0 only: the others would log the same lines again.
    writer = (metric_writers.create_default_writer(workdir) if is_chief
              else metric_writers.MultiWriter([]))
    if is_chief:
        # The table of every parameter goes to a file; the log has the count (above).
        # Statistics read every parameter to the host: only where each process holds them
        # whole (FSDP over several processes leaves each with a part).
        whole = all(x.is_fully_addressable for x in jax.tree.leaves(state.params))
        table = parameter_overview.get_parameter_overview(state.params, include_stats=whole)
        (epath.Path(workdir) / PARAMETERS_FILE).write_text(table + "\n")
        logging.info("parameter table in %s", epath.Path(workdir) / PARAMETERS_FILE)

    with compilation_cache.timed_compile("train step") as compiled:
        step_fn = make_train_step(config, model, diffusion, tx, lr_schedule, shardings,
                                  mesh).lower(state, batch_spec(config, mesh, latent_shape)).compile()
    compile_secs = compiled["secs"]

    grid = sampling_grid.TrainingGrid.from_config(model, config, space, mesh)
    evaluator = during_training.for_training(config, workdir, space)
    during_training.evaluate_pending(evaluator, start_step, state.ema_params,
                                     checkpointer.directory, writer if is_chief else None)

    peak = chips.peak_flops_per_chip(jax.devices()[0].device_kind, config.peak_flops)
    report_progress = periodic_actions.ReportProgress(
        num_train_steps=config.num_train_steps, writer=writer,
        every_steps=config.log_every_steps)
    # The training clock: wall time less evaluations, grids and checkpoint waits, so that the
    # rate and the ETA are those of the training steps.
    clock = _TrainingClock()
    step_log = _StepLog(os.path.join(workdir, "losses.jsonl")
                        if config.debug_log_losses and is_chief else None)
    preemption = PreemptionWatch()
    profiler = profiling.StepProfiler(config.get("profile"), workdir, step_fn.as_text,
                                      enabled=is_chief)

    if start_step == 0:
        writer.write_scalars(0, {"perf/compile_secs": compile_secs})
    step = start_step
    interval_start, interval_step = clock.now(), start_step
    try:
        while step < config.num_train_steps:
            profiler.before(step + 1)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = pipeline.make_global_batch(next(data_iterator), mesh)
                state, metrics = step_fn(state, batch)
            step += 1
            profiler.after(step, state)
            if step == start_step + 1:
                jax.block_until_ready(metrics)
                logging.info("first step of this start done: step %d, %.1f s after the start of "
                             "training", step, time.perf_counter() - started)
            step_log.add(step, metrics)
            step_log.drain(keep_last=True)
            if is_chief:
                report_progress(step, t=clock.now())
            last = step == config.num_train_steps

            if step % config.log_every_steps == 0 or last:
                step_log.drain()
                elapsed = clock.now() - interval_start
                steps_per_sec = (step - interval_step) / elapsed
                images_per_sec = steps_per_sec * config.global_batch_size
                scalars = {f"train/{k}": v for k, v in step_log.interval_means().items()}
                scalars.update({
                    "perf/steps_per_sec": steps_per_sec,
                    "perf/images_per_sec": images_per_sec,
                    "perf/mfu": chips.model_flops_utilization(images_per_sec, flops_per_image, peak,
                                                        jax.device_count()),
                })
                writer.write_scalars(step, scalars)
                interval_start, interval_step = clock.now(), step

            preempted = preemption.reached(step, checkpointer)
            if step % config.checkpoint_every_steps == 0 or last or preempted:
                step_log.drain()  # never save a state past a non-finite step
                with clock.paused() as took:
                    checkpointer.save(step, state.to_dict(), data_iterator, config.to_dict())
                if is_chief:
                    logging.info("checkpoint of step %d started in %.1f s (written in the "
                                 "background)", step, took())

            if not preempted:  # a preempted run stops now and evaluates after its restart
                with clock.paused():
                    during_training.evaluate_if_due(evaluator, step, state.ema_params,
                                                    checkpointer, writer if is_chief else None)
            if grid is not None and config.sample_every_steps and (
                    step % config.sample_every_steps == 0):
                with clock.paused():
                    _write_grid(grid, state.ema_params, workdir, step)

            if preempted:
                logging.warning("preempted: saved step %d, stopping", step)
                break
        else:
            if grid is not None and config.sample_at_end:
                _write_grid(grid, state.ema_params, workdir, step)
        step_log.drain()
    except BaseException:
        # Stopping on an error: finish a save already in flight (that checkpoint stays whole)
        # without letting its own failure hide the error that stopped the run.
        try:
            checkpointer.wait_until_finished()
        except Exception as err:  # noqa: BLE001 - reported, the first error goes on
            logging.error("the checkpoint being saved when the run stopped failed too: %s", err)
        raise
    else:
        t0 = time.perf_counter()
        checkpointer.wait_until_finished()  # the last save, whole before returning
        if is_chief and step >= config.num_train_steps:
            ckpt_lib.record_final_step(checkpointer.directory, step)
        if is_chief:
            logging.info("last checkpoint written (waited %.1f s); training done",
                         time.perf_counter() - t0)
    finally:
        profiler.close()
        preemption.close()
        step_log.close()
        checkpointer.close()
        writer.flush()
    return state
