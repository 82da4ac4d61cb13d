"""DiCo weights between the official PyTorch layout and ours.

The official model (`DiCo` in the PyTorch code) is NCHW with per-block modules; ours is
NHWC with each level's blocks stacked on a leading axis. Every official tensor maps to one
leaf (or one layer of a stacked leaf) by a layout rule:

  linear     torch (out, in)          <-> flax (in, out)
  conv1x1    torch (out, in, 1, 1)    <-> flax (in, out)
  conv3x3    torch (out, in, 3, 3)    <-> flax (3, 3, in, out)
  depthwise  torch (C, 1, 3, 3)       <-> flax (3, 3, C)
  copy       biases, embedding tables
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Iterator, Mapping, NamedTuple

import numpy as np

from dico_jax.convert.report import mismatch_message
from dico_jax.errors import UserError
from dico_jax.models import abstract_params, get_model

LEVELS = ("encoder_level_1", "encoder_level_2", "latent", "decoder_level_2", "decoder_level_1")
# Block sub-layers in the official registration order, with their torch names and layouts.
_BLOCK_LAYERS = (("conv1", "conv1", "conv1x1"), ("conv2", "conv2", "depthwise"),
                 ("conv3", "conv3", "conv1x1"), ("ca", "ca.1", "conv1x1"),
                 ("conv4", "conv4", "conv1x1"), ("conv5", "conv5", "conv1x1"),
                 ("adaLN_modulation", "adaLN_modulation.1", "linear"))


class Entry(NamedTuple):
    torch_key: str
    flax_path: tuple  # path of the leaf in the params tree
    layer: int | None  # index into the stacked leaf, or None
    layout: str


def _to_flax(w: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return w.T
    if layout == "conv1x1":
        return w[:, :, 0, 0].T
    if layout == "conv3x3":
        return w.transpose(2, 3, 1, 0)
    if layout == "depthwise":
        return w[:, 0].transpose(1, 2, 0)
    return w


def _to_torch(w: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return w.T
    if layout == "conv1x1":
        return w.T[:, :, None, None]
    if layout == "conv3x3":
        return w.transpose(3, 2, 0, 1)
    if layout == "depthwise":
        return w.transpose(2, 0, 1)[:, None]
    return w


def _torch_shape(flax_shape: tuple, layout: str) -> tuple:
    return _to_torch(np.empty(flax_shape, np.bool_), layout).shape


def key_map(depths) -> list[Entry]:
    """Every official parameter, in the official state_dict order, with its place in ours."""
    out: list[Entry] = []

    def add(torch_prefix, flax_path, layout, layer=None, bias=True, weight_name="kernel"):
        out.append(Entry(f"{torch_prefix}.weight", (*flax_path, weight_name), layer, layout))
        if bias:
            out.append(Entry(f"{torch_prefix}.bias", (*flax_path, "bias"), layer, "copy"))

    def timestep(i):
        add(f"t_embedder_{i}.mlp.0", (f"t_embedder_{i}", "mlp_0"), "linear")
        add(f"t_embedder_{i}.mlp.2", (f"t_embedder_{i}", "mlp_2"), "linear")

    def level(idx):
        name = LEVELS[idx]
        for i in range(depths[idx]):
            for ours, theirs, layout in _BLOCK_LAYERS:
                add(f"{name}.{i}.{theirs}", (name, ours), layout, layer=i)

    add("x_embedder.proj", ("x_embedder",), "conv3x3")
    timestep(1)
    for k in range(3):
        out.append(Entry(f"y_embedder.embedding_table_{k}.weight",
                         ("y_embedder", f"embedding_table_{k}"), None, "copy"))
    timestep(2)
    timestep(3)
    level(0)
    add("down1_2.body.0", ("down1_2",), "conv3x3", bias=False)
    level(1)
    add("down2_3.body.0", ("down2_3",), "conv3x3", bias=False)
    level(2)
    add("up3_2.body.0", ("up3_2",), "conv3x3", bias=False)
    add("reduce_chan_level2", ("reduce_chan_level2",), "conv1x1")
    level(3)
    add("up2_1.body.0", ("up2_1",), "conv3x3", bias=False)
    add("reduce_chan_level1", ("reduce_chan_level1",), "conv1x1")
    level(4)
    add("final_layer.out_proj", ("final_layer", "out_proj"), "conv3x3")
    add("final_layer.adaLN_modulation.1", ("final_layer", "adaLN_modulation"), "linear")
    return out


def _get(tree: Mapping, path: tuple) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _flat_paths(tree: Mapping, prefix: tuple = ()) -> Iterator[tuple]:
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _flat_paths(v, (*prefix, k))
        else:
            yield (*prefix, k)


def official_shapes(model_name: str, **overrides) -> dict[str, tuple]:
    """{official name: torch shape} for `get_model(model_name, **overrides)`."""
    model = get_model(model_name, **overrides)
    abstract = abstract_params(model, 8, 8)
    shapes = {}
    for e in key_map(model.depths):
        shape = tuple(_get(abstract, e.flax_path).shape)
        shapes[e.torch_key] = _torch_shape(shape[1:] if e.layer is not None else shape, e.layout)
    return shapes


def _as_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # torch.Tensor: bf16/fp16 go through fp32, which numpy holds
        v = v.detach().cpu()
        if not v.dtype.is_floating_point:
            return v.numpy()
        import torch

        return v.to(torch.float32).numpy()
    return np.asarray(v)


def _strip_module_prefix(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """DistributedDataParallel-wrapped models save every key under 'module.'."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _mismatch_report(expected: Mapping[str, tuple], found: Mapping[str, tuple], what: str) -> str | None:
    return mismatch_message(f"{what} does not match the expected parameters", [
        ("missing keys (expected shape)", [f"{k} {expected[k]}" for k in expected if k not in found]),
        ("unexpected keys (found shape)", [f"{k} {tuple(v)}" for k, v in found.items()
                                           if k not in expected]),
        ("mis-shaped keys", [f"{k}: expected {expected[k]}, found {tuple(found[k])}"
                             for k in expected if k in found
                             and tuple(found[k]) != tuple(expected[k])]),
    ])


def torch_to_flax(state_dict: Mapping[str, Any], model_name: str, **overrides) -> dict:
    """Official-named tensors (torch or numpy) -> params for `get_model(model_name, **overrides)`."""
    state_dict = _strip_module_prefix(state_dict)
    expected = official_shapes(model_name, **overrides)
    found = {k: tuple(getattr(v, "shape", np.shape(v))) for k, v in state_dict.items()}
    report = _mismatch_report(expected, found, f"state_dict for {model_name}")
    if report:
        raise ValueError(report)

    model = get_model(model_name, **overrides)
    params: dict = {}
    stacks: dict[tuple, list] = {}
    for e in key_map(model.depths):
        w = np.ascontiguousarray(_to_flax(_as_numpy(state_dict[e.torch_key]), e.layout))
        if e.layer is None:
            node = params
            for k in e.flax_path[:-1]:
                node = node.setdefault(k, {})
            node[e.flax_path[-1]] = w
        else:
            stacks.setdefault(e.flax_path, []).append(w)
    for path, layers in stacks.items():
        node = params
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = np.stack(layers)
    return params


def flax_to_torch(params: Mapping, model_name: str, **overrides) -> dict:
    """Params of `get_model(model_name, **overrides)` -> {official name: torch.Tensor}, official order."""
    import torch

    model = get_model(model_name, **overrides)
    abstract = abstract_params(model, 8, 8)
    want = {p: tuple(_get(abstract, p).shape) for p in _flat_paths(abstract)}
    have = {p: tuple(np.shape(_get(params, p))) for p in _flat_paths(params)}
    report = _mismatch_report({"/".join(p): s for p, s in want.items()},
                              {"/".join(p): s for p, s in have.items()}, f"params for {model_name}")
    if report:
        raise ValueError(report)
    out = {}
    for e in key_map(model.depths):
        w = np.asarray(_get(params, e.flax_path), dtype=np.float32)
        if e.layer is not None:
            w = w[e.layer]
        out[e.torch_key] = torch.from_numpy(np.array(_to_torch(w, e.layout), order="C"))
    return out


def read_torch_file(path: str | os.PathLike) -> Any:
    """A .pt/.pth (torch.load, weights only) or .safetensors file, as saved."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    import torch

    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (or, before PyTorch 1.6, a pickle).
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise UserError(f"{path} is not a PyTorch checkpoint (torch.save writes a zip archive; "
                        f"this file starts with {head!r}); give the .pt/.pth or .safetensors file "
                        "of the official run")
    try:
        # The official checkpoints carry their argparse.Namespace under "args".
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        # torch's own message goes on to advise weights_only=False, which would run any code
        # the file holds: keep its first line only.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({first}); it must hold "
                        "tensors and the official checkpoint's fields only") from err


def select_state_dict(obj: Any, use_ema: bool = True, source: str = "checkpoint") -> Mapping[str, Any]:
    """The model or EMA state_dict out of an official checkpoint dict, or a bare state_dict."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a dict, found {type(obj).__name__}")
    if "model" in obj or "ema" in obj:
        key = "ema" if use_ema else "model"
        if key not in obj:
            raise KeyError(f"{source} has no {key!r} entry (found: {sorted(obj)}); "
                           f"use_ema={use_ema}")
        return obj[key]
    if use_ema and any(k in obj for k in ("opt", "args")):
        raise KeyError(f"{source} has no 'ema' entry (found: {sorted(obj)})")
    return obj


def load_torch_checkpoint(path: str | os.PathLike, model_name: str, use_ema: bool = True,
                          **overrides) -> dict:
    """Read an official checkpoint ({"model", "ema", "opt", "args"} or a bare state_dict)."""
    obj = read_torch_file(path)
    state_dict = select_state_dict(obj, use_ema, source=os.fspath(path))
    try:
        return torch_to_flax(state_dict, model_name, **overrides)
    except ValueError as err:
        raise ValueError(f"{os.fspath(path)}: {err}") from err
