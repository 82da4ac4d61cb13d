"""What bounds a compiled step, read from the program the compiler wrote for the chip.

XLA's optimized HLO lists every kernel a step launches: its fusions (each one pass over
memory), library calls (cuBLAS, cuDNN) and copies, with loop trip counts. For each kernel this
module counts the floating-point work of its matmuls and convolutions and the bytes it moves
to and from HBM (operands read once, results written once; a loop's slice of a stacked buffer
counts as the slice, an in-place update as the update). A kernel cannot finish sooner than
max(FLOPs / peak FLOP/s, bytes / HBM bandwidth); the sum over kernels bounds the step from
below, so `batch / bound` bounds images per second from above.

It is a bound, not a measurement: real kernels reach 60-90% of peak, on-chip caches can save
some traffic, launches cost a few microseconds each, and collectives (counted apart) overlap
or not. What it is good for: where the bytes and FLOPs go, and which change of formulation
removes them, compared on the same compiler's output without the chip.
"""
from __future__ import annotations

import collections
import dataclasses
import re
from typing import Iterable, Sequence

from dico_jax import chips, command

_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
          "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8,
          "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_BYTES, key=len, reverse=True))
                    + r")\[([\d,]*)\](\{[^}]*\})?")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "partition-id", "replica-id", "opt-barrier", "add-dependency", "iota"}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute", "collective-broadcast")
# Pieces of a kernel's source op name that say which part of the model it belongs to; the
# first found wins (scopes nest: dico_block/modulated_layer_norm is the layer norm).
_PARTS = (("modulated_layer_norm", "layer norm"), ("depthwise3x3", "depthwise 3x3"),
          ("channel_attention", "channel attention"), ("gelu", "GELU"),
          ("optimizer", "optimizer & EMA"), ("/ema/", "optimizer & EMA"),
          ("dico_block", "block other"),
          ("dynamic_update_slice", "scan stacking"), ("dynamic_slice", "scan stacking"),
          ("training_losses", "loss"))


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str
    opcode: str
    launches: int  # per step: the trip counts of the loops around it, multiplied
    flops: float  # per launch
    bytes: float  # HBM bytes read + written per launch
    source: str  # the op_name metadata JAX wrote (scopes of the traced function)
    fill: bool = False  # writes a broadcast constant only (a buffer being zeroed)
    collective: bool = False


@dataclasses.dataclass
class _Instr:
    name: str
    shape: str
    opcode: str
    operands: list  # names of the instructions it reads
    attrs: str  # what follows the operand list
    args: str = ""  # the text between its parentheses (a constant's value)


def array_bytes(shape: str) -> float:
    """Bytes in HBM of every array in an HLO shape string, e.g. '(bf16[2,3]{1,0}, f32[4])' ->
    28. Arrays whose layout puts them in another memory space (XLA:TPU's S(1), on-chip
    VMEM) do not count."""
    total = 0.0
    for dtype, dims, layout in _ARRAY.findall(shape):
        if "S(" in layout:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES[dtype]
    return total


def _dims(shape: str) -> list[int]:
    m = _ARRAY.search(shape)
    return [int(d) for d in filter(None, m.group(2).split(","))] if m else []


def _close(text: str, start: int) -> int:
    """Index of the parenthesis closing the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced parentheses in HLO: {text[:120]}")


def parse_hlo(text: str) -> tuple[dict[str, list[_Instr]], str]:
    """HLO module text -> ({computation: instructions}, entry computation name)."""
    computations: dict[str, list[_Instr]] = {}
    current, entry = None, None
    for line in text.splitlines():
        if line.endswith("{") and not line.startswith(" ") and "%" in line:
            name = line.split("%", 1)[1].split(" ", 1)[0]
            current = computations[name] = []
            if line.startswith("ENTRY"):
                entry = name
            continue
        if line.startswith("}"):
            current = None
            continue
        body = line.strip()
        if current is None or " = " not in body:
            continue
        body = body.removeprefix("ROOT ")
        if not body.startswith("%"):
            continue
        name, rest = body[1:].split(" = ", 1)
        if rest.startswith("("):
            end = _close(rest, 0)
            shape, rest = rest[:end + 1], rest[end + 2:]
        else:
            shape, _, rest = rest.partition(" ")
        open_ = rest.find("(")
        if open_ < 0:
            continue
        close = _close(rest, open_)
        args = rest[open_ + 1:close]
        current.append(_Instr(name, shape, rest[:open_], re.findall(r"%([\w.\-]+)", args),
                              rest[close + 1:], args))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def _window(attrs: str, rank: int) -> list[dict]:
    """Per spatial dimension of a convolution: size, stride, low padding and dilations."""
    window = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(re.findall(r"(\w+)=([\d_x-]+)", window.group(1))) if window else {}

    def per_dim(key, default):
        return [int(v) for v in fields[key].split("x")] if key in fields else [default] * rank
    pads = ([int(v.split("_")[0]) for v in fields["pad"].split("x")] if "pad" in fields
            else [0] * rank)
    return [dict(size=a, stride=b, pad=c, lhs_dilate=d, rhs_dilate=e) for a, b, c, d, e in zip(
        per_dim("size", 1), per_dim("stride", 1), pads, per_dim("lhs_dilate", 1),
        per_dim("rhs_dilate", 1))]


def _taps(in_size: int, out_size: int, w: dict) -> int:
    """(output, window) position pairs of one spatial dimension that land on the input."""
    last = (in_size - 1) * w["lhs_dilate"]
    count = 0
    for o in range(out_size):
        for k in range(w["size"]):
            p = o * w["stride"] + k * w["rhs_dilate"] - w["pad"]
            count += 0 <= p <= last and p % w["lhs_dilate"] == 0
    return count


def _conv_flops(lhs_shape: str, rhs_shape: str, out_shape: str, attrs: str) -> float:
    """2 x the multiply-adds of one convolution, counting only window taps that land on the
    input (a 'convolution' that is really a weight gradient or a padded product counts right)."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
    if not labels:
        return 0.0
    (ll, rl, ol), (lhs, rhs, out) = labels.groups(), map(_dims, (lhs_shape, rhs_shape, out_shape))
    if (len(lhs), len(rhs), len(out)) != (len(ll), len(rl), len(ol)):
        return 0.0
    spatial = sorted(c for c in ol if c.isdigit())
    windows = _window(attrs, len(spatial))
    taps = 1
    for d, w in zip(spatial, windows):
        taps *= _taps(lhs[ll.index(d)], out[ol.index(d)], w)
    batch_groups = lhs[ll.index("b")] // max(out[ol.index("b")], 1)  # batch_group_count
    return 2.0 * out[ol.index("b")] * out[ol.index("f")] * rhs[rl.index("i")] * taps * batch_groups


def _dot_flops(out_shape: str, lhs_shape: str, contracting: Sequence[int]) -> float:
    lhs, n = _dims(lhs_shape), 1
    for d in _dims(out_shape):
        n *= d
    for d in contracting:
        n *= lhs[d]
    return 2.0 * n


def _instr_flops(ins: _Instr, table: dict[str, _Instr],
                 computations: dict[str, list[_Instr]]) -> float:
    shape_of = lambda i: table[ins.operands[i]].shape if ins.operands[i] in table else ""
    if ins.opcode == "dot":
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
        return _dot_flops(ins.shape, shape_of(0),
                          [int(d) for d in filter(None, m.group(1).split(","))] if m else [])
    if ins.opcode == "convolution":
        return _conv_flops(shape_of(0), shape_of(1), ins.shape, ins.attrs)
    if ins.opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
        target = target.group(1) if target else ""
        if target.startswith("__cudnn$conv"):
            # Operands and result by role: forward (x, w) -> y; backward input (dy, w) -> dx;
            # backward filter (x, dy) -> dw. The work is that of the forward conv.
            result = ins.shape
            if "BackwardInput" in target:
                return _conv_flops(result, shape_of(1), shape_of(0), ins.attrs)
            if "BackwardFilter" in target:
                return _conv_flops(shape_of(0), result, shape_of(1), ins.attrs)
            return _conv_flops(shape_of(0), shape_of(1), result, ins.attrs)
        if target.startswith("__cublas"):
            m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.attrs)
            dims = [int(d.strip('"')) for d in m.group(1).split(",") if d] if m else []
            return _dot_flops(ins.shape, shape_of(0), dims)
    if ins.opcode == "fusion":
        called = re.search(r"calls=%([\w.\-]+)", ins.attrs)
        body = computations.get(called.group(1), []) if called else []
        inner = {i.name: i for i in body}
        return sum(_instr_flops(i, inner, computations) for i in body)
    return 0.0


def _fusion_bytes(body: list[_Instr]) -> float:
    """Reads of each parameter (only the slices where it is only sliced; nothing where it is
    only updated in place) plus writes of each result (the update, for an in-place one)."""
    table = {i.name: i for i in body}
    users = collections.defaultdict(list)
    for i in body:
        for o in i.operands:
            users[o].append(i)

    def sliced_reads(name: str) -> float | None:
        total = 0.0
        for user in users[name]:
            if user.opcode in ("bitcast", "reshape"):
                inner = sliced_reads(user.name)
                if inner is None:
                    return None
                total += inner
            elif user.opcode in ("slice", "dynamic-slice") and user.operands[0] == name:
                total += array_bytes(user.shape)
            elif user.opcode == "dynamic-update-slice" and user.operands[0] == name:
                pass
            else:
                return None
        return total

    reads = 0.0
    for p in body:
        if p.opcode == "parameter":
            full = array_bytes(p.shape)
            sliced = sliced_reads(p.name)
            reads += full if sliced is None else min(sliced, full)
    root = body[-1]
    writes = 0.0
    for out in ([table[o] for o in root.operands if o in table] if root.opcode == "tuple"
                else [root]):
        while out.opcode in ("bitcast", "reshape") and out.operands[0] in table:
            out = table[out.operands[0]]
        if out.opcode == "dynamic-update-slice" and out.operands[1] in table:
            writes += array_bytes(table[out.operands[1]].shape)
        else:
            writes += array_bytes(out.shape)
    return reads + writes


def _is_fill(body: list[_Instr]) -> bool:
    """Only broadcasts of a constant or a scalar (and copies of them) into the results."""
    return bool(body) and all(
        i.opcode in ("constant", "broadcast", "bitcast", "copy", "tuple")
        or (i.opcode == "parameter" and array_bytes(i.shape) <= 8) for i in body)


def _trip_count(loop: _Instr, computations: dict[str, list[_Instr]]) -> int:
    """The compiler's known trip count; else the bound its condition compares the counter to
    (JAX's loops count up from 0 by 1: `i < N`, N an integer constant); else 1."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
    if known:
        return int(known.group(1))
    condition = re.search(r"condition=%([\w.\-]+)", loop.attrs)
    body = computations.get(condition.group(1), []) if condition else []
    bounds = {int(i.args) for i in body if i.opcode == "constant" and i.shape.startswith("s32[]")
              and i.args.lstrip("-").isdigit()}
    return bounds.pop() if len(bounds) == 1 else 1


def kernels(hlo_text: str) -> list[Kernel]:
    """The kernels of one execution of a compiled module (`compiled.as_text()`)."""
    computations, entry = parse_hlo(hlo_text)
    found: list[Kernel] = []

    def walk(name: str, launches: int) -> None:
        body = computations.get(name, [])
        table = {i.name: i for i in body}
        for ins in body:
            if (ins.opcode in _FREE or ins.opcode.endswith("-done")
                    or 'custom_call_target="AllocateBuffer"' in ins.attrs):  # memory, no work
                continue
            if ins.opcode == "while":
                loop = re.search(r"body=%([\w.\-]+)", ins.attrs).group(1)
                walk(loop, launches * _trip_count(ins, computations))
                continue
            if ins.opcode in ("call", "async-start") or ins.opcode == "conditional":
                for callee in re.findall(r"(?:to_apply|calls|branch_computations)=\{?%([\w.\-]+)",
                                         ins.attrs):
                    walk(callee, launches)
                continue
            operand_bytes = [array_bytes(table[o].shape) for o in ins.operands if o in table]
            fill = False
            if ins.opcode == "fusion":
                called = re.search(r"calls=%([\w.\-]+)", ins.attrs)
                fused = computations.get(called.group(1), []) if called else []
                moved = _fusion_bytes(fused) if fused else sum(operand_bytes) + array_bytes(ins.shape)
                fill = _is_fill(fused)
            elif ins.opcode == "dynamic-update-slice":
                moved = 2 * (operand_bytes[1] if len(operand_bytes) > 1 else 0.0)
            elif ins.opcode == "dynamic-slice":
                moved = 2 * array_bytes(ins.shape)
            else:
                moved = sum(operand_bytes) + array_bytes(ins.shape)
            source = re.search(r'op_name="([^"]*)"', ins.attrs)
            found.append(Kernel(
                name=ins.name, opcode=ins.opcode, launches=launches,
                flops=_instr_flops(ins, table, computations), bytes=moved,
                source=source.group(1) if source else "", fill=fill,
                collective=ins.opcode.removesuffix("-start") in _COLLECTIVES))
    walk(entry, 1)
    return found


def part(kernel: Kernel) -> str:
    """The model part a kernel belongs to, from its source op name."""
    if kernel.collective:
        return "collectives"
    if kernel.flops:
        return "matmul & conv"
    if kernel.fill:
        return "buffer fill"
    for piece, label in _PARTS:
        if piece in kernel.source:
            return label
    return "other"


def direction(kernel: Kernel) -> str:
    """fwd or bwd (JAX names the backward pass transpose(jvp(...))); '' outside the model."""
    if "transpose(" in kernel.source:
        return "bwd"
    return "fwd" if "jvp(" in kernel.source else ""


def kernel_seconds(kernel: Kernel, peak_flops: float, bandwidth: float) -> float:
    return max(kernel.flops / peak_flops, kernel.bytes / bandwidth) * kernel.launches


def summarize(found: Iterable[Kernel], peak_flops: float | None = None,
              bandwidth: float | None = None) -> dict:
    """Totals per step (collectives apart) and, given the chip's peaks, the bound in seconds
    and per part of the model."""
    found = list(found)
    local = [k for k in found if not k.collective]
    out = {
        "launches": sum(k.launches for k in local),
        "flops": sum(k.flops * k.launches for k in local),
        "hbm_bytes": sum(k.bytes * k.launches for k in local),
        "collective_bytes": sum(k.bytes * k.launches for k in found if k.collective),
    }
    parts: dict = collections.defaultdict(lambda: {"launches": 0, "flops": 0.0, "bytes": 0.0,
                                                   "seconds": 0.0})
    for k in local:
        p = parts[(part(k), direction(k))]
        p["launches"] += k.launches
        p["flops"] += k.flops * k.launches
        p["bytes"] += k.bytes * k.launches
        if peak_flops and bandwidth:
            p["seconds"] += kernel_seconds(k, peak_flops, bandwidth)
    if peak_flops and bandwidth:
        out["bound_s"] = sum(p["seconds"] for p in parts.values())
        out["flops_s"] = out["flops"] / peak_flops
        out["bytes_s"] = out["hbm_bytes"] / bandwidth
    out["parts"] = [{"part": name, "pass": pass_, **vals} for (name, pass_), vals in
                    sorted(parts.items(), key=lambda kv: -(kv[1]["seconds"] or kv[1]["bytes"]))]
    return out


def chip_peaks(device_kind: str, dtype: str) -> tuple[float, float] | None:
    """(matmul FLOP/s, HBM bytes/s) for the compute dtype: fp32 matmuls on these GPUs run as
    TF32 on the tensor cores at half the bf16 rate; TPUs run them as bf16 passes."""
    flops = chips.peak_flops_per_chip(device_kind, default=0.0)
    bandwidth = chips.per_chip(chips.HBM_BANDWIDTH, device_kind, default=0.0)
    if not flops or not bandwidth:
        return None
    if dtype == "float32" and "nvidia" in device_kind.lower():
        flops /= 2
    return flops, bandwidth


def analyze(hlo_text: str, device_kind: str, dtype: str) -> dict:
    """`summarize` of a compiled program for the chip it was compiled for (with the bound
    where the chip's peaks are known)."""
    return summarize(kernels(hlo_text), *(chip_peaks(device_kind, dtype) or (None, None)))


def format_parts(summary: dict, batch: int) -> str:
    """The per-part table of one summary: launches, TFLOP, GB and bound ms per step."""
    lines = [f"{'part':18} {'pass':4} {'launches':>8} {'TFLOP':>7} {'HBM GB':>8} "
             f"{'bound ms':>8} {'share':>6}"]
    total = summary.get("bound_s")
    for p in summary["parts"]:
        ms = f"{1e3 * p['seconds']:8.2f}" if total else f"{'-':>8}"
        share = f"{100 * p['seconds'] / total:5.1f}%" if total else "-"
        lines.append(f"{p['part']:18} {p['pass']:4} {p['launches']:>8} {p['flops'] / 1e12:7.2f} "
                     f"{p['bytes'] / 1e9:8.2f} {ms} {share:>6}")
    step = (f"{'step':18} {'':4} {summary['launches']:>8} {summary['flops'] / 1e12:7.2f} "
            f"{summary['hbm_bytes'] / 1e9:8.2f}")
    lines.append(f"{step} {1e3 * total:8.2f}  -> at most {batch / total:.0f} img/s" if total
                 else f"{step} {'-':>8}  (no bound: peaks of the chip not known)")
    return "\n".join(lines)



def main(argv: Sequence[str] | None = None) -> dict:
    """python -m dico_jax.tools.roofline HLO_TEXT --device_kind 'NVIDIA H200' --batch 64:
    the per-part table of a compiled program dumped to a file (plain or .gz), e.g. the
    train_step.hlo.txt.gz that `tools/benchmark --profile` writes beside its trace."""
    import gzip

    parser = command.ArgumentParser("dico_jax.tools.roofline",
                                    description=main.__doc__.split(":", 1)[1].strip())
    parser.add_argument("hlo", help="optimized HLO text (compiled.as_text()), plain or .gz")
    parser.add_argument("--device_kind", default="", help="JAX device_kind of the chip it was "
                        "compiled for, e.g. 'NVIDIA H200', 'TPU v5 lite'")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batch", type=int, default=1, help="images per chip and step")
    args = parser.parse_args(argv)
    opener = gzip.open if args.hlo.endswith(".gz") else open
    try:
        with opener(args.hlo, "rt") as f:
            text = f.read()
    except OSError as e:
        parser.exit(2, f"{parser.prog}: error: cannot read {args.hlo}: {e}\n")
    peaks = chip_peaks(args.device_kind, args.dtype)
    if args.device_kind and peaks is None:
        parser.exit(2, f"{parser.prog}: error: no peaks known for device kind "
                       f"{args.device_kind!r}\n")
    summary = summarize(kernels(text), *(peaks or (None, None)))
    print(format_parts(summary, args.batch))
    return summary


if __name__ == "__main__":
    main()
