"""Orbax checkpoints of a training run: train state, input iterator position and config.

Layout: `<workdir>/checkpoints/<step>/{state,data,config}`. `state` is the pytree
{"step", "params", "ema_params", "opt_state"}; `data` is the Grain iterator state of every
process; `config` is the run's config as JSON. Saves are asynchronous and atomic (a step
directory appears only once complete), so a run killed at any moment leaves the previous
checkpoints intact.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

STATE, DATA, CONFIG = "state", "data", "config"


def resolve_workdir(workdir: str) -> str:
    """An absolute local path, or a URL such as gs://bucket/run unchanged."""
    return workdir if "://" in workdir else os.path.abspath(workdir)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(resolve_workdir(workdir), "checkpoints")


def resolve_checkpoint_path(path: str, step: int | None = None) -> tuple[str, int | None]:
    """(directory holding `<step>/` folders, step) for a checkpoints dir, a training workdir
    (its `checkpoints/`) or one step's folder (`.../<step>`, which also fixes the step)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint directory {path}")
    if not os.path.isdir(path):
        raise NotADirectoryError(
            f"{path} is a file; expected an Orbax checkpoint directory (a training workdir, its "
            "checkpoints/ folder, or a folder written by `python -m dico_jax.convert from-torch`)")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), step
    name = os.path.basename(path)
    if name.isdigit() and os.path.isdir(os.path.join(path, "state")):
        if step is not None and step != int(name):
            raise ValueError(
                f"{path} is the checkpoint of step {int(name)}, but step {step} was asked for")
        return os.path.dirname(path), int(name)
    return path, step


def _grain_args():
    # Imported lazily: restoring weights for conversion or sampling needs no input stack.
    import grain

    return grain.checkpoint.CheckpointSave


class TrainCheckpointer:
    """An `ocp.CheckpointManager` for the items of a training run."""

    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            # Leftovers of a save interrupted by a kill are never read; remove them.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self.directory = directory
        self.manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

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

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


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
    if not epath.Path(directory).is_dir():
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    manager = _read_only_manager(directory)
    steps = list(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"no finished checkpoint in {directory}")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; found {sorted(steps)}")
    return manager, step


def saved_steps(directory: str) -> list[int]:
    """The steps with a finished checkpoint in `directory`, ascending."""
    if not epath.Path(directory).is_dir():
        return []
    manager = _read_only_manager(directory)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


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
        restored = manager.restore(step, args=ocp.args.Composite(**{STATE: restore}))[STATE]
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
