"""Ahead-of-time plan of a training run: its sharded train step compiled, not run.

    python -m dico_jax.tools.plan --config=configs/dico.py:XL --topology=v5p:2x2x1
        --vary=batch_per_chip=32,64 --vary=remat=none,dots,full [--breakdown] [--json=plan.json]

Builds the train step exactly as `dico_jax.main` would for the config (mesh, FSDP shardings,
donated state, AdamW, EMA) from abstract shapes, compiles it for the target chips and prints,
per chip: the train state as sharded, XLA's temporaries (forward, backward, optimizer, EMA),
the total against the chip's memory, and the compile time. Nothing is allocated. From the
compiled program it also reads the step's FLOPs, HBM traffic and kernel launches and, on a
chip whose peaks it knows, the roofline bound on images per second (`tools/roofline.py`;
--breakdown prints it per part of the model).

The target is this host's devices or, with --topology, chips this host need not have:
- a Cloud TPU slice (v4:2x2x1, v5e:2x2, v5p:2x2x1, v6e:2x2), compiled by XLA's TPU compiler
  in libtpu, which needs no TPU. On a TPU VM libtpu is there; elsewhere install the version
  JAX pins beside the environment (`pip install --target DIR 'libtpu==...'`, then
  `PYTHONPATH=DIR`; the tool names the pin), so that JAX itself keeps running on the CPU;
- NVIDIA GPUs (h100, h200, or h200:8 for eight in one host), compiled by XLA:GPU from the
  chip's description, with no GPU and no CUDA driver: install JAX's CUDA plugin beside the
  environment the same way (the tool names the two packages). The compiler cannot autotune
  without the chip, so its kernel choices are its defaults.
The memory figures are the compiler's buffer assignment for that target; a CPU plan is not a
TPU or GPU plan (XLA:CPU computes bf16 in fp32 and fuses differently).
"""
from __future__ import annotations

import ast
import gzip
import importlib.metadata
import importlib.util
import itertools
import json
import os
import re
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from dico_jax import sharding as sharding_lib
from dico_jax import builders, chips, command, errors, train, train_step
from dico_jax.errors import UserError
from dico_jax.data import spec as data_spec
from dico_jax.models import depthwise_for, time_inputs
from dico_jax.tools import roofline

GIB = 2**30

# NVIDIA GPUs as XLA:GPU needs them described to compile without the device: SM count and
# limits of compute capability 9.0, boost clock, L2, and HBM (bandwidth from NVIDIA's
# datasheets; size as the driver reports it). CUDA 12.9 and cuDNN 9.8 are what JAX's CUDA 12
# plugin runs with.
GPU_TARGETS = {
    "h100": {"name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559, "bandwidth": 3.35e12},
    "h200": {"name": "NVIDIA H200", "memory_mib": 143771, "bandwidth": 4.8e12},
}
# JAX hands its GPU allocator this share of the memory unless XLA_PYTHON_CLIENT_MEM_FRACTION
# says otherwise (or preallocation is off).
GPU_MEMORY_FRACTION = 0.75

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (file.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("topology", None, "Chips to compile for: a Cloud TPU slice, e.g. "
                    "v5p:2x2x1 (needs libtpu), or NVIDIA GPUs: h100, h200, h200:8 (needs JAX's "
                    "CUDA plugin, no GPU); default: this host's devices.")
flags.DEFINE_multi_string("vary", [], "FIELD=V1,V2,...: one row per value (every combination "
                          "when repeated). FIELD is a config path (remat, mesh.fsdp, "
                          "model.scan, ...) or batch_per_chip.")
flags.DEFINE_integer("cpu_devices", 0, "On the CPU backend, fake this many devices.")
flags.DEFINE_enum("step", "train", ["train", "forward"], "What to compile: the train step, "
                  "or one forward pass of the network over the batch (sampling's unit of work).")
flags.DEFINE_bool("breakdown", False, "Also print each row's roofline per part of the model.")
flags.DEFINE_string("json", None, "Also write the rows here.")
flags.DEFINE_string("hlo_dir", None, "Also write each row's compiled program here "
                    "(row_<i>.hlo.txt.gz; `python -m dico_jax.tools.roofline` reads them).")
flags.mark_flags_as_required(["config"])


TPU_GENERATIONS = ("v4", "v5e", "v5p", "v6e")


def parse_topology(text: str) -> tuple[str, str]:
    """("gpu" | "tpu", the name in lower case) of a --topology value; any case is accepted."""
    name = text.strip().lower()
    generation = name.partition(":")[0]
    if generation in GPU_TARGETS:
        return "gpu", name
    if generation in TPU_GENERATIONS:
        return "tpu", name
    raise UserError(
        f"--topology={text!r}: unknown chip {generation!r}; known: the Cloud TPU slices "
        f"{', '.join(TPU_GENERATIONS)} (e.g. v4:2x2x1, v5e:2x2, v5p:2x2x1, v6e:2x2) and the "
        f"NVIDIA GPUs {', '.join(GPU_TARGETS)} (or h200:N for N GPUs in one host)")


def target_devices(topology: str | None) -> list:
    if not topology:
        return list(jax.devices())
    kind, topology = parse_topology(topology)
    if kind == "gpu":
        return gpu_devices(topology)
    if importlib.util.find_spec("libtpu") is None:
        raise UserError(
            f"--topology={topology} compiles with XLA's TPU compiler, which comes with libtpu "
            f"(no TPU needed). Install the version this JAX was built with, apart from the "
            f"environment so that JAX keeps running on the CPU here: pip install --target "
            f"DIR '{libtpu_requirement()}', then PYTHONPATH=DIR python -m dico_jax.tools.plan ...")
    from jax.experimental import topologies

    _prepare_libtpu_off_tpu(topology)
    try:
        # JAX on a v4 VM runs each chip's two TensorCores as one device (megacore); v5p
        # topologies come that way already.
        options = {"chip_config_name": "megacore"} if topology.startswith("v4:") else {}
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                                 **options).devices)
    except Exception as e:
        raise UserError(f"--topology={topology!r}: libtpu could not describe it ({e}); "
                         "names look like v4:2x2x1, v5e:2x2, v5p:2x2x1, v6e:2x2, h100, "
                         "h200:8") from e


def gpu_target_config(gpu: str) -> str:
    """The GpuTargetConfig text XLA:GPU compiles from when it has no device to ask."""
    spec = GPU_TARGETS[gpu]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 shared_memory_per_block_optin: 232448
  threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
  memory_bandwidth: {int(spec['bandwidth'])} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {spec['memory_mib'] * 2**20}
  cuda_compute_capability {{ major: 9 minor: 0 }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 9 }}
device_description_str: "{spec['name']}"
"""


def cuda_plugin_requirements() -> list[str]:
    """JAX's CUDA 12 plugin packages at this JAX's version."""
    return [f"jax-cuda12-plugin=={jax.__version__}", f"jax-cuda12-pjrt=={jax.__version__}"]


def gpu_devices(topology: str) -> list:
    gpu, _, count = topology.partition(":")
    if count and not count.isdigit():
        raise UserError(f"--topology={topology!r}: expected {gpu} or {gpu}:N (N GPUs in one host)")
    if importlib.util.find_spec("jax_cuda12_plugin") is None:
        packages = " ".join(f"'{r}'" for r in cuda_plugin_requirements())
        raise UserError(
            f"--topology={topology} compiles with XLA:GPU from JAX's CUDA plugin (no GPU or "
            f"driver needed). Install it apart from the environment so that JAX keeps running "
            f"on the CPU here: pip install --no-deps --target DIR {packages}, then "
            f"PYTHONPATH=DIR python -m dico_jax.tools.plan ...")
    from jax.experimental import topologies

    # The plugin checks the local CUDA installation before it registers; with no GPU there
    # is nothing to check, only a chip to describe.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    try:
        return list(topologies.get_topology_desc(
            platform="cuda", target_config=gpu_target_config(gpu),
            topology=f"1x1x{int(count or 1)}").devices)
    except Exception as e:
        raise UserError(f"--topology={topology!r}: XLA:GPU could not describe it ({e})") from e


def libtpu_requirement() -> str:
    """The libtpu pin of this JAX's `tpu` extra, e.g. 'libtpu==0.0.42.*'."""
    try:
        for req in importlib.metadata.requires("jax") or ():
            if req.startswith("libtpu") and "tpu" in req.partition(";")[2]:
                return req.partition(";")[0].strip()
    except importlib.metadata.PackageNotFoundError:
        pass
    return "libtpu"


def _prepare_libtpu_off_tpu(topology: str) -> None:
    """Off a TPU VM, libtpu looks for the VM's accelerator type and worker hostnames and logs
    errors when it finds none: name this host and the slice compiled for instead. With no
    chips to guard, its one-process lock would only stop plans from running side by side."""
    if sharding_lib.tpu_chips_present():
        return
    generation, _, shape = topology.partition(":")
    chips = int(np.prod([int(d) for d in shape.split("x") if d.isdigit()] or [1]))
    accelerator = {"v5e": f"v5litepod-{chips}", "v6e": f"v6e-{chips}"}.get(
        generation, f"{generation}-{2 * chips}")  # v4, v5p: named by TensorCores, 2 per chip
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def chip_memory_bytes(device) -> int | None:
    """Memory a program may use on the device: what it reports, else the tables above."""
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # compile-only devices have no runtime
        limit = None
    if limit:
        return int(limit)
    gpu = next((v for v in GPU_TARGETS.values() if v["name"] == device.device_kind), None)
    if gpu is not None:
        fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION))
        return int(gpu["memory_mib"] * 2**20 * fraction)
    gib = chips.CHIP_MEMORY_GIB.get(device.device_kind)
    return None if gib is None else int(gib * GIB)


def set_field(config: ml_collections.ConfigDict, path: str, text: str) -> None:
    """config.<path> = text, parsed to the field's current type."""
    *parents, leaf = path.split(".")
    node = config
    for name in parents:
        node = node[name]
    if leaf not in node:
        raise UserError(f"--vary: config has no field {path!r}")
    current = node[leaf]
    if isinstance(current, bool):
        if text.lower() not in ("true", "false"):
            raise UserError(f"--vary {path}={text!r}: expected true or false")
        value: Any = text.lower() == "true"
    elif isinstance(current, (int, float)):
        value = type(current)(text)
    elif isinstance(current, str):
        value = text
    else:
        value = ast.literal_eval(text)
    node[leaf] = value


def variants(config: ml_collections.ConfigDict, vary: Sequence[str], num_devices: int):
    """(label dict, config) for every combination of the --vary values."""
    axes = []
    for spec in vary:
        field, eq, values = spec.partition("=")
        if not eq or not values:
            raise UserError(f"--vary {spec!r}: expected FIELD=V1,V2,...")
        axes.append([(field.strip(), v.strip()) for v in values.split(",")])
    for combo in itertools.product(*axes):
        c = ml_collections.ConfigDict(config.to_dict())
        for field, value in combo:
            if field == "batch_per_chip":
                c.global_batch_size = int(value) * num_devices
            else:
                set_field(c, field, value)
        yield dict(combo), c


def out_of_memory_fields(message: str) -> dict | None:
    """Row fields for a compiler error that says the program does not fit, else None."""
    message = " ".join(message.split())
    if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
        return None
    fields = {"fits": False, "error": message[:600]}
    # XLA:TPU: "the total memory required for HLO temporaries (33.21G) exceeds ..."
    needed = re.search(r"temporaries \(([0-9.]+)G\)", message)
    if needed:
        fields["temp_needed_bytes"] = int(float(needed.group(1)) * GIB)
    return fields


def plan_train_step(config: ml_collections.ConfigDict, devices: Sequence[Any],
                    step: str = "train", hlo_path: str | None = None) -> dict:
    """Compiles the config's train step (or, with step="forward", one forward pass of the
    network over a batch, as sampling runs it) for `devices`; returns per-chip memory and
    timings and the roofline of the compiled program.

    Raises what the build raises, except a compiler out-of-memory error, which becomes the
    row's `error` (the plan does not fit). `hlo_path` (.gz) receives the compiled program.
    """
    if step not in ("train", "forward"):
        raise ValueError(f"step must be 'train' or 'forward', got {step!r}")
    spec = data_spec.from_config(config)
    config = train.resolve_config(config, spec)
    if config.model.depthwise_impl == "auto":  # as the target runs it, not as this host would
        config.model.depthwise_impl = depthwise_for(devices[0].platform)
    mesh = sharding_lib.create_mesh(config.mesh, devices)
    model = builders.build_model(config)
    tx, schedule = builders.build_optimizer(config)
    _, abstract, shardings = train_step.init_state(config, model, tx, mesh, spec.latent_shape)
    batch = train_step.batch_spec(config, mesh, spec.latent_shape)
    if step == "train":
        fn = train_step.make_train_step(config, model, builders.build_diffusion(config), tx, schedule, shardings,
                                   mesh)
        args = (sharding_lib.with_shardings(abstract, shardings), batch)
        held, held_shardings = abstract, shardings
    else:
        x = batch["latent"]
        fn = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y,
                                                    **time_inputs(model, t)))
        args = (sharding_lib.with_shardings(abstract.params, shardings.params), x,
                batch["label"], batch["label"])  # timesteps and labels: int32 (N,) alike
        held, held_shardings = abstract.params, shardings.params
    leaves, specs = jax.tree.leaves(held), jax.tree.leaves(held_shardings)
    n = len(devices)
    row = {
        "step": step, "device": devices[0].device_kind, "chips": n, "model": config.model.name,
        "resolution": int(config.resolution), "dtype": config.dtype, "remat": config.remat,
        "scan": bool(config.model.scan), "depthwise": config.model.depthwise_impl,
        "norm": config.model.get("norm_impl", "xla"),
        "mesh": dict(mesh.shape),
        "global_batch": int(config.global_batch_size),
        "batch_per_chip": int(config.global_batch_size) / n,
        "params": sum(x.size for x in jax.tree.leaves(abstract.params)),
        "state_bytes": sum(x.size * x.dtype.itemsize for x in leaves),
        "state_bytes_per_chip": sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
                                    for x, s in zip(leaves, specs)),
        "chip_memory_bytes": chip_memory_bytes(devices[0]),
    }
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    try:
        compiled = lowered.compile()
    except Exception as e:
        fields = out_of_memory_fields(str(e))
        if fields is None:
            raise
        row.update(fields, compile_s=time.perf_counter() - t0)
        return row
    row["compile_s"] = time.perf_counter() - t0
    hlo_text = compiled.as_text()
    if hlo_path:
        with gzip.open(hlo_path, "wt") as f:
            f.write(hlo_text)
    row.update(step_roofline(hlo_text, devices[0].device_kind, config.dtype,
                             row["batch_per_chip"]))
    mem = compiled.memory_analysis()
    if mem is None:
        row["fits"] = None
        return row
    for key in ("argument", "output", "alias", "temp", "generated_code"):
        row[f"{key}_bytes"] = int(getattr(mem, f"{key}_size_in_bytes"))
    # Live at once: the inputs, the outputs not written over donated inputs, the temporaries.
    row["total_bytes"] = (row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"]
                          + row["temp_bytes"] + row["generated_code_bytes"])
    cap = row["chip_memory_bytes"]
    row["fits"] = None if cap is None else row["total_bytes"] <= cap
    return row


def step_roofline(hlo_text: str, device_kind: str, dtype: str, batch_per_chip: float) -> dict:
    """Per chip and step: FLOPs, HBM bytes, launches and, for a known chip, the roofline
    bound (`tools/roofline.py`), as row fields."""
    summary = roofline.analyze(hlo_text, device_kind, dtype)
    fields = {"step_flops": summary["flops"], "step_hbm_bytes": summary["hbm_bytes"],
              "step_launches": summary["launches"],
              "step_collective_bytes": summary["collective_bytes"], "roofline": summary}
    if "bound_s" in summary:
        fields["bound_images_per_s"] = batch_per_chip / summary["bound_s"]
        fields["bound_mfu"] = summary["flops_s"] / summary["bound_s"]
    return fields


def _blocks(row: dict) -> str:
    """How the blocks run: scan or loop, the depthwise form, and the layer norm if not XLA's."""
    norm = row.get("norm", "xla")
    return "/".join([("scan" if row["scan"] else "loop"), row["depthwise"]]
                    + ([] if norm == "xla" else [norm]))


def format_table(rows: Sequence[dict]) -> str:
    def gib(b):
        return "-" if b is None else f"{b / GIB:.2f}"

    head = (f"{'model':8} {'res':>4} {'dtype':9} {'remat':13} {'blocks':16} {'mesh d x f':10} "
            f"{'batch/chip':>10} {'state':>6} {'temp':>6} {'total':>6} {'chip':>6} {'fits':5} "
            f"{'compile s':>9} {'TFLOP':>6} {'HBM GB':>7} {'img/s <=':>8}")
    lines = [head]
    for r in rows:
        fits = {True: "yes", False: "NO", None: "?"}[r.get("fits")]
        flops, traffic, bound = (r.get("step_flops"), r.get("step_hbm_bytes"),
                                 r.get("bound_images_per_s"))
        lines.append(
            f"{r['model']:8} {r['resolution']:>4} {r['dtype']:9} {r['remat']:13} "
            f"{_blocks(r):16} "
            f"{r['mesh']['data']:>4} x {r['mesh']['fsdp']:<3} "
            f"{r['batch_per_chip']:>10g} {gib(r['state_bytes_per_chip']):>6} "
            f"{gib(r.get('temp_bytes', r.get('temp_needed_bytes'))):>6} "
            f"{gib(r.get('total_bytes')):>6} "
            f"{gib(r['chip_memory_bytes']):>6} {fits:5} {r['compile_s']:9.1f} "
            f"{'-' if flops is None else f'{flops / 1e12:.2f}':>6} "
            f"{'-' if traffic is None else f'{traffic / 1e9:.1f}':>7} "
            f"{'-' if bound is None else f'{bound:.0f}':>8}")
        if r.get("error"):
            lines.append(f"    compiler: {r['error'][:300]}")
    return "\n".join(lines)


def main(argv):
    del argv  # checked by command.run
    with errors.cli("dico_jax.tools.plan"):
        train.check_settings(FLAGS.config)
    if FLAGS.topology and "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")  # this host only traces; libtpu compiles
    if FLAGS.cpu_devices:
        jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
    with errors.cli("dico_jax.tools.plan"):
        devices = target_devices(FLAGS.topology)
        configs = list(variants(FLAGS.config, FLAGS.vary, len(devices)))
    rows = []
    if FLAGS.hlo_dir:
        os.makedirs(FLAGS.hlo_dir, exist_ok=True)
    for i, (label, config) in enumerate(configs):
        hlo_path = os.path.join(FLAGS.hlo_dir, f"row_{i}.hlo.txt.gz") if FLAGS.hlo_dir else None
        row = plan_train_step(config, devices, FLAGS.step, hlo_path)
        row["vary"] = label
        rows.append(row)
        print(f"planned {label or 'the config'}: {row['compile_s']:.0f} s", flush=True)
    kind = devices[0].device_kind
    what = ("train step (state: params, EMA, AdamW)" if FLAGS.step == "train"
            else "forward pass (state: params)")
    print(f"target: {len(devices)} x {kind} ({FLAGS.topology or jax.default_backend()}), "
          f"jax {jax.__version__}; the {what}; memory in GiB per chip; TFLOP, HBM GB and the "
          f"roofline bound on img/s per chip and step")
    print(format_table(rows))
    if FLAGS.breakdown:
        for r in rows:
            if "roofline" in r:
                print(f"\nroofline per chip and step, {r['vary'] or 'the config'}:")
                print(roofline.format_parts(r["roofline"], r["batch_per_chip"]))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    command.run("dico_jax.tools.plan", main)
