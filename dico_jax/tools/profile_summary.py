"""Device time per op from a JAX profiler trace, grouped by what each op computes.

    python -m dico_jax.tools.profile_summary WORKDIR              # the run's config.profile
    python -m dico_jax.tools.profile_summary TRACE_DIR_OR_FILE [HLO_TEXT] [--steps N] [--top K]

TRACE is a trace that `jax.profiler` writes (`<host>.trace.json.gz`, or the
`perfetto_trace.json.gz` of `create_perfetto_trace=True`), or a folder holding one: a training
workdir, its `plugins/profile/` or one run folder inside it (the newest is read); local or
gs://. HLO_TEXT is the optimized program (`compiled.as_text()`); left out, the
`train_step.hlo.txt.gz` beside the trace is read, and --steps defaults to the steps its
`profile.json` records (both written by training with `config.profile`).
Each traced op is looked up by its HLO instruction name; the instruction and the computation
it calls are read for convolutions, matrix products and the named scopes that
`dico_jax.models.layers` puts on its functions (depthwise3x3, channel_attention,
modulated_layer_norm, gelu). The benchmark's `--profile` writes both files and prints this.
"""
from __future__ import annotations

import collections
import gzip
import json
import re

from etils import epath

from dico_jax import command

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_GROUPS = re.compile(r"(?:feature|batch)_group_count=(\d+)")
_SCOPES = ("depthwise3x3", "channel_attention", "modulated_layer_norm", "gelu")

CATEGORIES = {
    "depthwise_conv": "depthwise 3x3 (conv kernels)",
    "conv": "3x3 convs (embed, down/up, out)",
    "matmul": "matmuls (1x1 convs, linears)",
    "depthwise3x3": "depthwise 3x3 (element-wise)",
    "channel_attention": "channel attention (pool, scale)",
    "modulated_layer_norm": "layer norm + adaLN modulation",
    "gelu": "GELU",
    "copies": "device memory copies and sets",
    "other": "other (residuals, gates, loss, optimizer)",
}


def parse_hlo(text: str) -> dict[str, str]:
    """Instruction name -> its line plus the bodies of the computations it calls."""
    comps: dict[str, list[str]] = {}
    instrs: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if not line.startswith((" ", "\t")) and line.rstrip().endswith("{"):
            m = _COMP.match(line)
            current = m.group(1) if m else None
            if current:
                comps[current] = []
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            instrs[m.group(1)] = line
            if current:
                comps[current].append(line)

    def expand(line: str, depth: int = 0) -> str:
        parts = [line]
        if depth < 3:
            for callee in _CALLS.findall(line):
                for inner in comps.get(callee, []):
                    parts.append(expand(inner, depth + 1))
        return "\n".join(parts)

    return {name: expand(line) for name, line in instrs.items()}


def categorize(desc: str) -> str:
    groups = [int(g) for g in _GROUPS.findall(desc)]
    is_conv = " convolution(" in desc or "cudnn$conv" in desc
    if is_conv:
        grouped = any(g > 1 for g in groups) or "depthwise3x3" in desc
        return "depthwise_conv" if grouped else "conv"
    if (" dot(" in desc or "cublas" in desc or "gemm" in desc.lower()) and "reduce-window" not in desc:
        return "matmul"
    for scope in _SCOPES:
        if f"{scope}/" in desc or f"/{scope}\"" in desc:
            return scope
    return "other"


_TRACE_PATTERNS = ("perfetto_trace.json.gz", "*.trace.json.gz")


def find_trace(path: str) -> str:
    """The trace file `path` names, or the one in the newest profile run folder under it (run
    folders are named by their UTC start time, so the newest sorts last)."""
    root = epath.Path(path)
    if root.is_file():
        return str(root)
    for folder in (root, root / "plugins" / "profile", root / "plugins"):
        for depth in ("", "*/", "*/*/"):
            found = sorted({p for pattern in _TRACE_PATTERNS
                            for p in folder.glob(depth + pattern)},
                           key=lambda p: (p.parent.name, p.name != "perfetto_trace.json.gz"))
            if found:
                newest = found[-1].parent
                return str(next(p for p in found if p.parent == newest))
    raise FileNotFoundError(f"no profiler trace (perfetto_trace.json.gz or *.trace.json.gz) "
                            f"under {path}")


def _read_text(path) -> str:
    data = epath.Path(path).read_bytes()
    return (gzip.decompress(data) if str(path).endswith(".gz") else data).decode()


def _kernel_category(kernel: str) -> str:
    """Category of a device event that names no HLO instruction, from its kernel name."""
    k = kernel.lower()
    if k.startswith(("memcpy", "memset")):
        return "copies"
    if any(w in k for w in ("gemm", "nvjet", "cutlass", "cublas")):
        return "matmul"
    if "conv" in k or "wgrad" in k or "dgrad" in k:
        return "conv"
    return "other"


def op_times(trace_path: str, hlo: dict[str, str]) -> dict[str, tuple[str, float]]:
    """(category, microseconds) per op, from device streams when the trace has any.

    An event is matched to its HLO instruction by the `hlo_op` it carries, or by its kernel
    name (XLA names a fusion's kernel after the instruction, with '.' and '-' as '_'); events
    inside CUDA graphs carry only the graph's name, so the kernel name is what matches them.
    """
    data = json.loads(_read_text(trace_path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in procs.items() if name.startswith("/device:")}
    by_kernel = {re.sub(r"[.\-]", "_", name): name for name in hlo}
    times: dict[str, list] = {}
    for e in events:
        if e.get("ph") != "X" or (device_pids and e.get("pid") not in device_pids):
            continue
        name = e.get("name", "")
        op = (e.get("args") or {}).get("hlo_op", "")
        if op not in hlo or op.startswith("command_buffer"):
            op = name if name in hlo else by_kernel.get(name)
        if op is None:
            if not device_pids:  # host events on a CPU trace that are not XLA ops
                continue
            op, cat = "kernel " + name[:60], _kernel_category(name)
        else:
            cat = categorize(hlo[op])
        entry = times.setdefault(op, [cat, 0.0])
        entry[1] += float(e.get("dur", 0.0))
    return {op: (cat, us) for op, (cat, us) in times.items()}


def summarize(trace_path: str, hlo_text: str, steps: int = 1, top: int = 15) -> dict:
    times = op_times(find_trace(trace_path), parse_hlo(hlo_text))
    total = sum(us for _, us in times.values())
    by_cat: dict[str, float] = collections.defaultdict(float)
    for cat, us in times.values():
        by_cat[cat] += us
    ops = sorted(times.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "device_ms_per_step": total / 1e3 / steps,
        "categories": {k: {"ms_per_step": v / 1e3 / steps, "share": v / total if total else 0.0}
                       for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"op": op, "category": cat, "ms_per_step": us / 1e3 / steps,
                     "share": us / total if total else 0.0} for op, (cat, us) in ops],
    }


def print_summary(summary: dict) -> None:
    print(f"device time per step: {summary['device_ms_per_step']:.2f} ms (sum of op durations)")
    print(f"{'category':52} {'ms/step':>8} {'share':>6}")
    for k, v in summary["categories"].items():
        print(f"{CATEGORIES.get(k, k):52} {v['ms_per_step']:8.2f} {v['share']:6.1%}")
    print(f"{'top ops':52} {'ms/step':>8} {'share':>6}")
    for r in summary["top_ops"]:
        print(f"{r['op'][:30]:30} {r['category'][:21]:21} {r['ms_per_step']:8.2f} {r['share']:6.1%}")


def main(argv=None) -> dict:
    from dico_jax import errors

    ap = command.ArgumentParser("dico_jax.tools.profile_summary",
                                description=__doc__.splitlines()[0])
    ap.add_argument("trace", help="a trace file, or a folder holding one (e.g. a workdir)")
    ap.add_argument("hlo", nargs="?", default=None,
                    help="optimized HLO text of the traced program (default: the "
                         "train_step.hlo.txt.gz beside the trace)")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps the trace covers (default: its profile.json, else 1)")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    with errors.cli("dico_jax.tools.profile_summary", also=(OSError, ValueError)):
        trace = find_trace(args.trace)
        beside = epath.Path(trace).parent
        hlo = args.hlo or beside / "train_step.hlo.txt.gz"
        if not epath.Path(hlo).exists():
            raise errors.UserError(f"{hlo} does not exist: give the optimized HLO of the traced "
                                   "program as the second argument")
        steps = args.steps
        if steps is None:
            info = beside / "profile.json"
            steps = json.loads(info.read_text())["steps"] if info.exists() else 1
        print(f"trace {trace}, {steps} step(s)")
        summary = summarize(trace, _read_text(hlo), steps, args.top)
    print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
