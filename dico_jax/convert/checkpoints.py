"""Whole checkpoints between the official PyTorch files and our Orbax checkpoint directories.

`import_torch_checkpoint` turns an official `.pt` ({"model", "ema", "opt", "args"} or a bare
state_dict) into `DIR/<step>/{state,config}`, the layout of training checkpoints, with
state = {"step", "params", "ema_params"}. `export_torch_checkpoint` goes back: a `.pt` with
{"model", "ema"} under the official parameter names, or safetensors files.
"""
from __future__ import annotations

import dataclasses
import os
import re
import warnings
from typing import Any, Mapping

import numpy as np

from dico_jax.convert.dico import (LEVELS, read_torch_file, select_state_dict, torch_to_flax,
                                   flax_to_torch, _strip_module_prefix)
from dico_jax import builders, storage
from dico_jax.checkpoint import resolve_checkpoint_path
from dico_jax.errors import UserError
from dico_jax.models import MODEL_CONFIGS, MODEL_NAMES

# The fields of `config.model` that describe the network's shape.
MODEL_FIELDS = ("hidden_size", "depths", "mlp_ratio", "in_channels", "out_channels",
                "num_classes", "class_dropout_prob")
_ARCH_FIELDS = ("hidden_size", "depths", "mlp_ratio")
_STEP_FILE = re.compile(r"^(\d+)\.(pt|pth|safetensors)$")


# ---------------------------------------------------------------------------------------------
# What an official state_dict holds.


def official_step(path: str) -> int:
    """The train step in an official checkpoint's file name (`0400000.pt` -> 400000), else 0."""
    match = _STEP_FILE.match(os.path.basename(os.fspath(path)))
    return int(match.group(1)) if match else 0


def describe_state_dict(state_dict: Mapping[str, Any], source: str = "state_dict") -> dict[str, Any]:
    """The network shape an official-named state_dict implies:
    hidden_size, depths, mlp_ratio, in_channels, out_channels, num_classes."""
    state_dict = _strip_module_prefix(state_dict)
    needed = ("x_embedder.proj.weight", "final_layer.out_proj.weight",
              "y_embedder.embedding_table_0.weight", f"{LEVELS[0]}.0.conv4.weight")
    missing = [k for k in needed if k not in state_dict]
    if missing:
        found = sorted(state_dict)
        listed = ", ".join(found[:8]) + (" ..." if len(found) > 8 else "")
        raise ValueError(f"{source} holds no DiCo weights: no {', '.join(missing)}; found "
                         f"{len(found)} entries ({listed or 'none'})")

    def shape(key):
        return tuple(getattr(state_dict[key], "shape", np.shape(state_dict[key])))

    hidden, in_channels = shape("x_embedder.proj.weight")[:2]
    conv4 = shape(f"{LEVELS[0]}.0.conv4.weight")
    depths = []
    for level in LEVELS:
        pattern = re.compile(rf"^{level}\.(\d+)\.")
        depths.append(len({m.group(1) for k in state_dict if (m := pattern.match(k))}))
    return dict(hidden_size=int(hidden), depths=tuple(depths), mlp_ratio=conv4[0] / conv4[1],
                in_channels=int(in_channels),
                out_channels=int(shape("final_layer.out_proj.weight")[0]),
                num_classes=int(shape("y_embedder.embedding_table_0.weight")[0]) - 1)


def identify_model(arch: Mapping[str, Any]) -> str | None:
    """The official model name with these hidden_size/depths/mlp_ratio, or None."""
    for name, fields in MODEL_CONFIGS.items():
        if all(_same(arch[k], fields[k]) for k in _ARCH_FIELDS):
            return name
    return None


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return tuple(int(x) for x in a) == tuple(int(x) for x in b)
    return float(a) == float(b)


def _arch_text(arch: Mapping[str, Any]) -> str:
    return (f"hidden_size={arch['hidden_size']}, depths={tuple(arch['depths'])}, "
            f"mlp_ratio={float(arch['mlp_ratio'])}")


def check_model_size(arch: Mapping[str, Any], model_name: str, overrides: Mapping[str, Any],
                     source: str) -> None:
    """Raises naming both models when the weights are of another size than `model_name`."""
    if model_name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {model_name!r}; valid names: {', '.join(MODEL_NAMES)}")
    want = {**MODEL_CONFIGS[model_name], **{k: v for k, v in overrides.items() if k in _ARCH_FIELDS}}
    if all(_same(arch[k], want[k]) for k in _ARCH_FIELDS):
        return
    found = identify_model(arch)
    found_text = f"{found} ({_arch_text(arch)})" if found else f"a DiCo with {_arch_text(arch)}"
    custom = {k: v for k, v in overrides.items() if k in _ARCH_FIELDS}
    want_text = f"{model_name}{' with overrides ' + str(custom) if custom else ''}"
    hint = (f"use --model {found}" if found else
            "use --model_overrides '{\"hidden_size\": ..., \"depths\": [...], \"mlp_ratio\": ...}'")
    raise ValueError(f"{source} holds {found_text}, but {want_text} has {_arch_text(want)}; {hint}")


# ---------------------------------------------------------------------------------------------
# from-torch.


@dataclasses.dataclass(frozen=True)
class ImportReport:
    directory: str
    step: int
    model_name: str
    model_overrides: dict
    params_from: str  # which entry of the file became `params`
    ema_from: str  # ... and `ema_params`

    def summary(self) -> str:
        lines = [f"wrote {self.model_name} step {self.step} to {self.directory}/{self.step}",
                 f"  params     <- {self.params_from}", f"  ema_params <- {self.ema_from}"]
        if self.params_from == self.ema_from:
            lines.append("  (the file holds one set of weights; params and ema_params are equal)")
        return "\n".join(lines)


def _entries(obj: Any, source: str) -> tuple[Mapping, Mapping, str, str]:
    """(raw, ema) state_dicts out of a loaded file and where each came from."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source} is not a checkpoint: it holds a {type(obj).__name__}, "
                         "expected a dict of tensors or {'model', 'ema', ...}")
    has_model, has_ema = "model" in obj, "ema" in obj
    if has_model or has_ema:
        raw = select_state_dict(obj, use_ema=not has_model, source=source)
        ema = select_state_dict(obj, use_ema=has_ema, source=source)
        raw_from = "'model'" if has_model else "'ema' (the file has no 'model' entry)"
        ema_from = "'ema'" if has_ema else "'model' (the file has no 'ema' entry)"
        return raw, ema, raw_from, ema_from
    state_dict = select_state_dict(obj, use_ema=False, source=source)
    return state_dict, state_dict, "the bare state_dict", "the bare state_dict"


def import_config(model_name: str, arch: Mapping[str, Any], overrides: Mapping[str, Any],
                  resolution: int = 256, base: Any = None) -> dict:
    """The run config for these weights, as a dict (saved with them): `base` (the config the
    run trained with) or else `configs/dico.py` of the model and resolution, with the network
    fields the weights fix."""
    if base is not None:
        config = base.copy_and_resolve_references()
    else:
        scale = model_name.removeprefix("DiCo-")
        config = _dico_config_module().get_config(f"{scale},res={resolution}")
    for key in MODEL_FIELDS:
        value = overrides.get(key)
        if value is None and key in ("in_channels", "out_channels", "num_classes"):
            value = arch[key]
        if value is not None:
            config.model[key] = tuple(value) if key == "depths" else value
    config.diffusion.learn_sigma = bool(arch["out_channels"] == 2 * arch["in_channels"])
    return config.to_dict()


def config_model(config: Any) -> tuple[str, dict]:
    """(model name, its `config.model` fields that shape the network) of a run config."""
    model = config.model
    fields = {k: (list(model[k]) if k == "depths" else model[k])
              for k in MODEL_FIELDS if k in model and model[k] is not None}
    return model.name, fields


def _dico_config_module():
    # configs/ is a top-level package of this repository (installed beside dico_jax).
    from configs import dico

    return dico


def _check_overrides(overrides: Mapping[str, Any]) -> dict:
    unknown = sorted(set(overrides) - set(MODEL_FIELDS))
    if unknown:
        raise ValueError(f"unknown model overrides {unknown}; valid: {list(MODEL_FIELDS)}")
    return dict(overrides)


def import_torch_checkpoint(src: str, out_dir: str, model_name: str | None = None,
                            overrides: Mapping[str, Any] | None = None, *,
                            step: int | None = None, resolution: int = 256,
                            keep_non_finite: bool = False, config: Any = None) -> ImportReport:
    """Official PyTorch checkpoint `src` -> Orbax checkpoint `out_dir/<step>`.

    The network is `model_name` with `overrides`, or that of `config`, the run's own config
    (a ConfigDict: any resolution, objective or data, e.g. the digits'), which is then saved
    with the weights so that `sample --checkpoint` samples as the run would. The step
    defaults to the one in the file name (`0400000.pt`), else 0. `out_dir` must not hold
    checkpoints already.
    """
    from dico_jax import checkpoint as ckpt_lib

    if config is not None:
        model_name, from_config = config_model(config)
        overrides = {**from_config, **(overrides or {})}
    if model_name is None:
        raise UserError("from-torch needs --model or --config (the run's config file)")
    overrides = _check_overrides(overrides or {})
    src = os.fspath(src)
    obj = read_torch_file(src)
    raw_sd, ema_sd, raw_from, ema_from = _entries(obj, src)
    arch = describe_state_dict(raw_sd, source=src)
    check_model_size(arch, model_name, overrides, src)
    kwargs = {**{k: arch[k] for k in ("in_channels", "out_channels", "num_classes")},
              **{k: v for k, v in overrides.items() if k != "class_dropout_prob"}}
    kwargs["learn_sigma"] = arch["out_channels"] == 2 * arch["in_channels"]
    try:
        params = torch_to_flax(raw_sd, model_name, **kwargs)
        ema_params = params if ema_sd is raw_sd else torch_to_flax(ema_sd, model_name, **kwargs)
    except ValueError as err:
        raise ValueError(f"{src}: {err}") from err
    if not keep_non_finite:
        check_finite_weights({"params": params, "ema_params": ema_params}, src)

    out_dir = ckpt_lib.resolve_workdir(os.fspath(out_dir))
    existing = ckpt_lib.saved_steps(out_dir)
    if existing:
        raise FileExistsError(f"{out_dir} already holds checkpoints of steps {existing}; "
                              "write to a new directory")
    step = official_step(src) if step is None else int(step)
    config = import_config(model_name, arch, overrides, resolution, base=config)
    checkpointer = ckpt_lib.TrainCheckpointer(out_dir, keep=1, async_save=False)
    try:
        checkpointer.save(step, {"step": np.asarray(step, np.int32), "params": params,
                                 "ema_params": ema_params}, config=config)
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()
    return ImportReport(out_dir, step, model_name, overrides, raw_from, ema_from)


def check_finite_weights(tree: Mapping[str, Any], source: str) -> None:
    """Refuses weights holding NaN or infinite values (a diverged or damaged checkpoint),
    naming the first parameters that do."""
    import jax

    bad = [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(tree)
           if not np.isfinite(np.asarray(x, np.float32)).all()]
    if bad:
        raise UserError(f"{source}: {len(bad)} parameter arrays hold NaN or infinite values "
                        f"(first: {', '.join(bad[:3])}); pass --keep_non_finite to convert "
                        "them anyway")


# ---------------------------------------------------------------------------------------------
# to-torch.


@dataclasses.dataclass(frozen=True)
class ExportReport:
    files: tuple[str, ...]
    step: int
    model_name: str
    weights: tuple[str, ...]  # "model" and/or "ema"

    def summary(self) -> str:
        return (f"exported {self.model_name} step {self.step} ({' + '.join(self.weights)}) to "
                + ", ".join(self.files))


def safetensors_paths(out: str) -> dict[str, str]:
    """{"model": STEM.model.safetensors, "ema": STEM.ema.safetensors} for --out STEM[.pt]."""
    stem, ext = os.path.splitext(os.fspath(out))
    if ext not in (".pt", ".pth", ".safetensors"):
        stem = os.fspath(out)
    return {"model": f"{stem}.model.safetensors", "ema": f"{stem}.ema.safetensors"}


def export_torch_checkpoint(checkpoint: str, out: str, *, step: int | None = None,
                            use_ema: bool = True, safetensors: bool = False,
                            keep_non_finite: bool = False) -> ExportReport:
    """Orbax checkpoint (a workdir, its checkpoints/ or a from-torch directory) -> PyTorch.

    `.pt`: {"model": raw, "ema": EMA} with the official names (the official loader takes
    "ema"); with `use_ema=False` a bare state_dict of the raw weights. `safetensors=True`
    writes STEM.model.safetensors and STEM.ema.safetensors, each a bare state_dict.
    """
    import torch

    from dico_jax import checkpoint as ckpt_lib

    directory, step = resolve_checkpoint_path(checkpoint, step)
    items = ("params", "ema_params") if use_ema else ("params",)
    try:
        state, step = ckpt_lib.restore_to_host(directory, step, items=items)
    except KeyError as err:
        hint = " (use --no_ema to export the raw weights only)" if use_ema else ""
        raise KeyError(f"{err.args[0]}{hint}") from None
    if not keep_non_finite:
        check_finite_weights(state, f"{directory}/{step}")
    config = ckpt_lib.read_config(directory, step)
    model_name = config["model"]["name"]
    # The network's fields as training builds it; dtype, remat and the kernel choices do not
    # change the parameter shapes the export checks.
    kwargs = builders.model_fields(config)
    with warnings.catch_warnings():
        # The restored arrays are read-only; the tensors sharing them are only saved, never written.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensors = {"model": flax_to_torch(state["params"], model_name, **kwargs)}
        if use_ema:
            tensors["ema"] = flax_to_torch(state["ema_params"], model_name, **kwargs)

    out = ckpt_lib.resolve_workdir(os.fspath(out))  # a local path or gs://...
    if safetensors:
        from safetensors.torch import save

        paths = safetensors_paths(out)
        files = []
        for which, state_dict in tensors.items():
            meta = {"model": model_name, "step": str(step), "weights": which}
            storage.atomic_write(paths[which],
                                 lambda f, sd=state_dict, m=meta: f.write(save(sd, metadata=m)))
            files.append(paths[which])
    else:
        obj = tensors if use_ema else tensors["model"]
        storage.atomic_write(out, lambda f: torch.save(obj, f))
        files = [out]
    return ExportReport(tuple(files), step, model_name, tuple(tensors))
