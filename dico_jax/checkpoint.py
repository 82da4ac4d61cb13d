"""Orbax checkpoints of a training run: train state, input iterator position and config.

Layout: `<workdir>/checkpoints/<step>/{state,data,config}`. `state` is the pytree
{"step", "params", "ema_params", "opt_state"}; `data` is the Grain iterator state of every
process; `config` is the run's config as JSON. Saves are asynchronous and atomic (a step
directory appears only once complete), so a run killed at any moment leaves the previous
checkpoints intact.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dico_jax.errors import MissingFile, NotAFolder, UserError

STATE, DATA, CONFIG = "state", "data", "config"


def resolve_workdir(workdir: str) -> str:
    """An absolute local path, or a URL such as gs://bucket/run unchanged."""
    return workdir if "://" in workdir else os.path.abspath(workdir)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(resolve_workdir(workdir), "checkpoints")


def resolve_checkpoint_path(path: str, step: int | None = None) -> tuple[str, int | None]:
    """(directory holding `<step>/` folders, step) for a checkpoints dir, a training workdir
    (its `checkpoints/`) or one step's folder (`.../<step>`, which also fixes the step)."""
    path = resolve_workdir(os.fspath(path))
    where = epath.Path(path)
    if not where.exists():
        raise MissingFile(f"no checkpoint directory {path}")
    if not where.is_dir():
        raise NotAFolder(
            f"{path} is a file; expected an Orbax checkpoint directory (a training workdir, its "
            "checkpoints/ folder, or a folder written by `python -m dico_jax.convert from-torch`)")
    if (where / "checkpoints").is_dir():
        return os.path.join(path, "checkpoints"), step
    name = os.path.basename(path.rstrip("/"))
    if name.isdigit() and (where / "state").is_dir():
        if step is not None and step != int(name):
            raise UserError(
                f"{path} is the checkpoint of step {int(name)}, but step {step} was asked for")
        return os.path.dirname(path.rstrip("/")), int(name)
    return path, step


def _grain_args():
    # Imported lazily: restoring weights for conversion or sampling needs no input stack.
    import grain

    return grain.checkpoint.CheckpointSave


class TrainCheckpointer:
    """An `ocp.CheckpointManager` for the items of a training run."""

    def __init__(self, directory: str, *, keep: int, keep_every: int = 0,
                 async_save: bool = True, timeout_secs: int = 1200):
        """Keeps the newest `keep` steps and, forever, every step divisible by `keep_every`
        (0: none), the checkpoints a scaling curve is evaluated at."""
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_every or None,
            create=True,
            # Leftovers of a save interrupted by a kill are never read; remove them.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            # A save whose background writes fail (storage gone) leaves the next one waiting
            # for signals that never come: this bounds that wait.
            async_options=ocp.AsyncOptions(timeout_secs=timeout_secs),
        )
        self.directory = directory
        self.manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Mapping[str, Any], data_iterator: Any = None,
             config: Mapping[str, Any] | None = None) -> None:
        """Starts saving `state` (and the iterator and config) at `step`.

        The caller decides when to save. The iterator state is captured before this returns,
        so the caller may advance the iterator right away; the arrays are written in the
        background.
        """
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA] = _grain_args()(data_iterator)
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(dict(config))
        with self._write_errors_named():  # also reports the previous save's failure
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> tuple[Any, Any]:
        """(state, data_iterator) at `step`; the state takes the shapes and shardings of
        `abstract_state` (ShapeDtypeStructs), so it may land on a different mesh than it was
        saved from. The iterator is restored in place."""
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if data_iterator is not None:
            restore_iterator(os.path.join(self.directory, str(step), DATA), data_iterator)
        return restored[STATE], data_iterator

    def saved_config(self, step: int) -> dict | None:
        """The config saved with `step`, or None when that step has none or it is unreadable."""
        try:
            return self.manager.restore(
                step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]
        except Exception:  # noqa: BLE001 - older or damaged steps: nothing to compare with
            return None

    def restore_newest(self, abstract_state: Any, data_iterator: Any = None) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint that restores, or None when there is none.

        A step that cannot be read (a damaged file) is moved aside to
        `<directory>_damaged/<step>` (kept for inspection, never deleted), with a WARNING
        naming it, and the step before is tried; every process must restore a step for it to
        be taken, so all processes fall back together.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            try:
                state, _ = self.restore(step, abstract_state, data_iterator)
                error = None
            except Exception as err:  # noqa: BLE001 - TensorStore and Orbax raise many types
                state, error = None, err
            if _all_processes(error is None):
                return step, state
            self._set_aside(step, error)
        if steps:
            raise UserError(f"no checkpoint in {self.directory} can be restored (steps "
                            f"{sorted(steps)} were moved to {self.directory}_damaged); delete "
                            "the workdir's checkpoints to start over, or restore them from a copy")
        return None

    def _set_aside(self, step: int, error: Exception | None) -> None:
        damaged = f"{self.directory}_damaged"
        reason = " ".join(str(error).split())[:300] if error is not None else "on another process"
        logging.warning("checkpoint of step %d in %s cannot be restored (%s): moved to %s/%d; "
                        "falling back to the step before", step, self.directory, reason,
                        damaged, step)
        if jax.process_index() == 0:
            epath.Path(damaged).mkdir(parents=True, exist_ok=True)
            target = epath.Path(damaged) / str(step)
            if target.exists():  # an earlier fallback set aside a step of this number
                target = epath.Path(damaged) / f"{step}.{len(list(epath.Path(damaged).iterdir()))}"
            (epath.Path(self.directory) / str(step)).rename(target)
        _barrier(f"set aside checkpoint {step}")
        self.manager.reload()

    def wait_until_finished(self) -> None:
        with self._write_errors_named():
            self.manager.wait_until_finished()

    @contextlib.contextmanager
    def _write_errors_named(self):
        """A save that the file system refused (disk full, no permission) as one user error
        naming the directory and the newest complete checkpoint, which it leaves intact:
        Orbax writes each step into a temporary directory and renames it only when whole."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - TensorStore reports OS errors as ValueError
            text = " ".join(str(err).split())
            if not (isinstance(err, OSError) or "os_error_code" in text
                    or "No space left" in text):
                raise
            reason = ("no space left on device" if "No space left" in text or "28" in
                      text.partition("os_error_code")[2][:6] else text[:200])
            self.manager.reload()
            newest = self.manager.latest_step()
            kept = (f"the checkpoint of step {newest} is intact" if newest is not None
                    else "no earlier checkpoint exists")
            raise UserError(f"saving a checkpoint in {self.directory} failed: {reason}; {kept}. "
                            "Free space (or fix the directory's permissions) and rerun the same "
                            "command to resume") from err

    def close(self) -> None:
        self.manager.close()


# The config fields that fix the shapes of the saved parameters.
ARCH_FIELDS = ("hidden_size", "depths", "mlp_ratio", "in_channels", "out_channels", "num_classes")


def architecture(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config.<field>` -> value for everything that fixes the parameters' shapes: the model's
    name, its fields (a field left None takes the named model's default) and learn_sigma."""
    from dico_jax.models import MODEL_CONFIGS

    model = dict(config.get("model") or {})
    name = model.get("name")
    fields = {**MODEL_CONFIGS.get(name, {}), **{k: v for k, v in model.items() if v is not None}}
    arch = {"model.name": name}
    for key in ARCH_FIELDS:
        value = fields.get(key)
        arch[f"model.{key}"] = [int(d) for d in value] if key == "depths" and value else value
    arch["diffusion.learn_sigma"] = bool((config.get("diffusion") or {}).get("learn_sigma", True))
    return arch


def check_same_model(saved: Mapping[str, Any] | None, config: Mapping[str, Any],
                     where: str) -> None:
    """Refuses to resume from a checkpoint of another network, naming the differing fields."""
    if not saved:
        return
    have, want = architecture(saved), architecture(config)
    diff = [f"config.{k}: checkpoint {have[k]!r}, this run {want[k]!r}" for k in have
            if have[k] != want[k] and want[k] is not None and have[k] is not None]
    if diff:
        raise UserError(f"{where} holds another model than this config describes ("
                        + "; ".join(diff) + "): use the checkpoint's settings, or a new workdir")


def _all_processes(ok: bool) -> bool:
    """True when `ok` holds on every process (a collective with several)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def restore_iterator(directory: str, iterator: Any) -> None:
    """Sets `iterator` to the state saved in `directory` (a checkpoint's `data` item).

    Grain names each process's file `process_<i>-of-<n>.json`. The training iterator's state
    is the count of global batches read, the same on every process (`dico_jax.data.pipeline`),
    so a run saved by n processes resumes on any other number from any process's file.
    """
    import json

    path = epath.Path(directory)
    own = path / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    files = [own] if own.exists() else sorted(path.glob("process_*-of-*.json"))
    if not files:
        raise FileNotFoundError(f"no input iterator state in {directory}")
    iterator.set_state(json.loads(files[0].read_text()))


def _read_only_manager(directory: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_handlers={STATE: ocp.PyTreeCheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler()})


def _latest_step(directory: str, step: int | None) -> tuple[ocp.CheckpointManager, int]:
    # Orbax takes absolute paths only; a relative one is taken from the current directory.
    directory = resolve_workdir(os.fspath(directory))
    if not epath.Path(directory).is_dir():
        raise MissingFile(f"no checkpoint directory {directory}")
    manager = _read_only_manager(directory)
    steps = list(manager.all_steps())
    if not steps:
        raise MissingFile(f"no finished checkpoint in {directory}")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise MissingFile(f"no checkpoint for step {step} in {directory}; found {sorted(steps)}")
    return manager, step


def saved_steps(directory: str) -> list[int]:
    """The steps with a finished checkpoint in `directory`, ascending."""
    directory = resolve_workdir(os.fspath(directory))
    if not epath.Path(directory).is_dir():
        return []
    manager = _read_only_manager(directory)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


# The run's record of the checkpoint it ended with: `<checkpoints>/<step>` file by file, with
# sizes. A restart compares it with what is there (a listing, seconds even on Cloud Storage)
# before taking the run as finished without restoring anything; a step cut short afterwards (a
# copy that stopped midway) no longer matches, and the full start-up then finds the damage.
FINAL_RECORD = "final_checkpoint.json"


def _files(step_dir: epath.Path) -> dict[str, int]:
    return {str((root / name).relative_to(step_dir)): (root / name).stat().length
            for root, _, names in step_dir.walk() for name in names}


def record_final_step(directory: str, step: int) -> None:
    """Writes the record of step `step` beside the checkpoints (process 0, once the save is
    whole)."""
    import json

    from dico_jax import storage

    record = {"step": step, "files": _files(epath.Path(directory) / str(step))}
    text = json.dumps(record, indent=1, sort_keys=True).encode()
    storage.atomic_write(epath.Path(directory).parent / FINAL_RECORD, lambda f: f.write(text))


def matches_final_record(directory: str, step: int) -> bool:
    """True when `directory/step` holds exactly the files, of the sizes, that the run recorded
    when it saved that step as its last."""
    import json

    path = epath.Path(directory).parent / FINAL_RECORD
    try:
        record = json.loads(path.read_text())
        return record["step"] == step and record["files"] == _files(
            epath.Path(directory) / str(step))
    except Exception:  # noqa: BLE001 - no record, an older run's or a damaged one: not trusted
        return False


def restore_to_host(directory: str, step: int | None = None,
                    items: tuple[str, ...] = ("step", "params", "ema_params")) -> tuple[dict, int]:
    """Numpy arrays of the saved state (by default without the optimizer state) and the step.

    Runs on one CPU whatever mesh the checkpoint was written from: for weight conversion,
    export and sampling. `step=None` takes the latest checkpoint.
    """
    manager, step = _latest_step(directory, step)
    try:
        metadata = manager.item_metadata(step)[STATE]
        tree = getattr(metadata, "tree", metadata)
        missing = [k for k in items if k not in tree]
        if missing:
            raise KeyError(f"checkpoint {directory}/{step} has no state items {missing}; "
                           f"found {sorted(tree)}")
        cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        target = {k: jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=cpu), tree[k])
            for k in items}
        # Partial restore: the items left out (the optimizer state) are never read.
        restore = ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**{STATE: restore}))[STATE]
        except Exception as err:  # noqa: BLE001 - TensorStore and Orbax raise many types
            others = sorted(set(manager.all_steps()) - {step})
            hint = f"; pass --step with one of {others}" if others else ""
            raise UserError(f"checkpoint of step {step} in {directory} cannot be read ("
                            f"{' '.join(str(err).split())[:300]}){hint}") from err
    finally:
        manager.close()
    return jax.tree.map(np.asarray, restored), step


def read_config(directory: str, step: int | None = None) -> dict:
    """The config saved with a checkpoint (latest by default), as a dict."""
    manager, step = _latest_step(directory, step)
    try:
        return manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]
    finally:
        manager.close()
