"""Throughput benchmark: DiCo training step, forward pass and guided sampler, with a PyTorch baseline.

    python -m dico_jax.tools.benchmark --models DiCo-S --batch 8 --dtypes float32 [--torch]
    python -m dico_jax.tools.benchmark --models DiCo-XL --batch 64 --fwd_batch 128
        --dtypes float32,bfloat16 --torch --json bench.json          # on a GPU

For every (model, dtype): compile time of the full train step (loss, backward, AdamW, EMA),
steady-state train images/s, TFLOP/s and MFU (3 x XLA's forward FLOPs per image against the
chip's bf16 peak), forward images/s, peak device memory, and the images/s of guided sampling
with the project's sampler (`sampling.sampler.make_sample_fn`): DDPM-250 (ancestral), and the
flow-matching Euler-50 and Heun-25 (50 network evaluations each). With --torch, the PyTorch reference DiCo (eager; fp32 and bf16 autocast) is timed
in the same process and the ratios are printed beside the absolute numbers. Warm-up runs are
excluded; each figure is the median of --repeats timed runs. `--profile DIR` also traces
three train steps per row and prints device time by op kind (`dico_jax.tools.profile_summary`).
"""
from __future__ import annotations

import functools
import gzip
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dico_jax import command, host_memory
from dico_jax.diffusion import create_diffusion
from dico_jax.models import check_norm_impl, forward_flops_per_image, get_model
from dico_jax.chips import peak_flops_per_chip
from dico_jax.train_step import create_train_state, train_step


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    """Median of `repeats` timed calls after `warmup` untimed ones (compilation, caches and
    the host heap reaching their steady state)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory_gib() -> float | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def bench_jax(name: str, dtype: str, batch: int, fwd_batch: int, res: int, repeats: int,
              sample_steps: int, sample_batch: int, remat: str, cpu_peak: float,
              depthwise: str = "auto", profile_dir: str | None = None, scan: bool = True,
              parts: tuple[str, ...] = ("train", "forward", "sample"), norm: str = "xla") -> dict:
    check_norm_impl(norm, jax.default_backend(), "--norm")
    model = get_model(name, dtype=dtype, remat=remat, depthwise_impl=depthwise, scan=scan,
                      norm_impl=norm)
    diffusion = create_diffusion("")
    tx = optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    shape = (res, res, model.in_channels)
    rng = np.random.default_rng(0)
    batch_data = {"latent": jnp.asarray(rng.standard_normal((batch, *shape)), jnp.float32),
                  "label": jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)}
    state = jax.jit(functools.partial(create_train_state, model=model, tx=tx,
                                      latent_shape=shape))(jax.random.key(0))
    jax.block_until_ready(state)  # else the init still runs while the step compiles
    step = jax.jit(functools.partial(train_step, model=model, diffusion=diffusion, tx=tx,
                                     lr_schedule=optax.constant_schedule(1e-4), ema_decay=0.9999,
                                     step_key=jax.random.key(1)), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch_data).compile()
    compile_s = time.perf_counter() - t0

    holder = {"state": state}

    def run_step():
        holder["state"], metrics = compiled(holder["state"], batch_data)
        return metrics["loss"]

    train_s = median_seconds(run_step, repeats)
    depthwise = model._depthwise_impl()
    profile = None
    if profile_dir:
        profile = profile_train_step(run_step, compiled, os.path.join(
            profile_dir, f"{name}_{dtype}_{depthwise}_{norm}_{'scan' if scan else 'loop'}_{remat}_b{batch}"),
            dtype=dtype, batch=batch)
    params = holder["state"].params
    fwd_s = None
    sample_rates = {key: None for key, _, _ in SAMPLER_ROWS}
    if "forward" in parts:
        fwd_s = _time_forward(model, params, fwd_batch, shape, rng, repeats)
    if "sample" in parts:
        sample_rates = _time_samplers(name, model, params, sample_batch, sample_steps, shape, rng,
                                      repeats)
    device = jax.devices()[0]
    train_ips = batch / train_s
    try:
        tflops = train_ips * 3.0 * forward_flops_per_image(model, res, res) / 1e12
    except Exception as e:  # report the timings even if the FLOP count fails
        print(f"FLOP count failed: {e!r}"[:400])
        tflops = None
    return {
        "impl": "jax", "model": name, "dtype": dtype, "batch": batch, "res": res, "remat": remat,
        "scan": scan, "depthwise": depthwise, "norm": norm,
        "compile_s": compile_s, "train_img_s": train_ips, "train_tflops": tflops,
        "mfu": None if tflops is None else tflops * 1e12 / peak_flops_per_chip(device.device_kind, cpu_peak),
        "fwd_img_s": None if fwd_s is None else fwd_batch / fwd_s,
        # Images per second of full guided runs (DDPM-250, Euler-50, Heun-25), each from
        # `sample_steps` timed steps.
        **sample_rates,
        "peak_mem_gib": peak_memory_gib(),
        "profile": profile,
    }


def _time_forward(model, params, fwd_batch, shape, rng, repeats) -> float:
    x = jnp.asarray(rng.standard_normal((fwd_batch, *shape)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, fwd_batch))
    y = jnp.asarray(rng.integers(0, 1000, fwd_batch))
    fwd = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
    return median_seconds(lambda: fwd(params, x, t, y), repeats)


# The sampler rows: (row key, sampler, steps of the full run it stands for). Heun's 25 steps
# make 50 network evaluations, as many as Euler's 50.
SAMPLER_ROWS = (("sample250_img_s", "ddpm", 250), ("euler50_img_s", "euler", 50),
                ("heun25_img_s", "heun", 25))


def _sampler_config(name: str, kind: str) -> dict:
    return {"model": {"name": name}, "seed": 0,
            "diffusion": {"kind": kind, "learn_sigma": kind == "ddpm"}}


def _time_samplers(name, model, params, sample_batch, sample_steps, shape, rng, repeats) -> dict:
    """Images/s of each SAMPLER_ROWS sampler with guidance (scale 1.5, first 3 channels), as
    `sampling.sampler.make_sample_fn` runs it: `sample_steps` steps are timed and the rate of
    the full run is extrapolated per step. The flow samplers run the same network with
    `in_channels` outputs (flow matching learns no variance), freshly initialized."""
    from dico_jax.sampling.sampler import Settings, make_sample_fn

    ys = jnp.asarray(rng.integers(0, model.num_classes, sample_batch), jnp.int32)
    flow_model = model.clone(out_channels=model.in_channels)
    flow_params = None
    out = {}
    for key, sampler, full_steps in SAMPLER_ROWS:
        flow = sampler != "ddpm"
        net = flow_model if flow else model
        if flow and flow_params is None:
            x = jnp.zeros((1, *shape), jnp.float32)
            flow_params = jax.jit(net.init)({"params": jax.random.key(0)}, x,
                                            jnp.zeros((1,), jnp.float32),
                                            jnp.zeros((1,), jnp.int32))["params"]
        settings = Settings(num_samples=sample_batch, batch_size=sample_batch, seed=0,
                            cfg_scale=1.5, guidance_channels=3, sampler=sampler,
                            respacing="" if flow else str(sample_steps), labels=None,
                            num_steps=sample_steps if flow else 0)
        draw = jax.jit(make_sample_fn(net, settings, shape,
                                      config=_sampler_config(name, "flow" if flow else "ddpm")))
        weights = flow_params if flow else params
        seconds = median_seconds(lambda: draw(weights, ys, jax.random.key(2)),
                                 max(1, repeats // 3))
        out[key] = sample_batch / (seconds * full_steps / sample_steps)
    return out


def profile_train_step(run_step: Callable[[], Any], compiled, out_dir: str, steps: int = 3,
                       dtype: str = "bfloat16", batch: int = 1) -> dict:
    """Traces `steps` train steps; writes the trace and the optimized HLO; prints where time
    goes and, on a chip whose peaks are known, how close it comes to the roofline bound of the
    same program (`tools/roofline.py`)."""
    from dico_jax.tools import profile_summary, roofline

    os.makedirs(out_dir, exist_ok=True)
    hlo_text = compiled.as_text()
    with gzip.open(os.path.join(out_dir, "train_step.hlo.txt.gz"), "wt") as f:
        f.write(hlo_text)
    with jax.profiler.trace(out_dir, create_perfetto_trace=True):
        for _ in range(steps):
            jax.block_until_ready(run_step())
    summary = profile_summary.summarize(out_dir, hlo_text, steps)
    print(f"profile of the train step ({out_dir}):")
    profile_summary.print_summary(summary)
    bound = roofline.analyze(hlo_text, jax.devices()[0].device_kind, dtype)
    if "bound_s" in bound:
        summary["roofline_bound_ms"] = 1e3 * bound["bound_s"]
        measured = summary["device_ms_per_step"]
        print(f"roofline bound of this program: {summary['roofline_bound_ms']:.2f} ms per step "
              f"({batch / bound['bound_s']:.0f} img/s, {bound['hbm_bytes'] / 1e9:.1f} GB HBM); "
              f"measured device time {measured:.2f} ms = "
              f"{summary['roofline_bound_ms'] / measured:.0%} of the bound's speed")
    return summary


def bench_torch(name: str, dtype: str, batch: int, fwd_batch: int, res: int, repeats: int) -> dict:
    """The PyTorch reference DiCo of the parity tests, eager, fp32 or bf16 autocast.

    A train step is forward, backward, AdamW and the EMA update, as in the official loop.
    """
    import torch

    from dico_jax.convert.torch_reference import TorchDiCo
    from dico_jax.models import MODEL_CONFIGS

    cfg = MODEL_CONFIGS[name]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = TorchDiCo(cfg["hidden_size"], cfg["depths"], cfg["mlp_ratio"]).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    autocast = functools.partial(torch.autocast, device_type=dev, dtype=torch.bfloat16,
                                 enabled=dtype == "bfloat16")
    x = torch.randn(batch, 4, res, res, device=dev)
    t = torch.randint(0, 1000, (batch,), device=dev)
    y = torch.randint(0, 1000, (batch,), device=dev)
    target = torch.randn(batch, 8, res, res, device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    ema = [p.detach().clone() for p in model.parameters()]

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            out = model(x, t, y)
        # The network's cost dominates; an MSE on all outputs stands in for the diffusion loss.
        loss = torch.mean((out.float() - target) ** 2)
        loss.backward()
        opt.step()
        # The EMA update of the official training loop, parameter by parameter as it is written
        # there, so both sides do a step's full work.
        with torch.no_grad():
            for e, p in zip(ema, model.parameters()):
                e.mul_(0.9999).add_(p.detach(), alpha=1 - 0.9999)
        sync()

    def timed(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    train_s = timed(step)
    xf = torch.randn(fwd_batch, 4, res, res, device=dev)
    tf = torch.randint(0, 1000, (fwd_batch,), device=dev)
    yf = torch.randint(0, 1000, (fwd_batch,), device=dev)

    def fwd():
        with torch.no_grad(), autocast():
            model(xf, tf, yf)
        sync()

    fwd_s = timed(fwd)
    return {"impl": "torch", "model": name, "dtype": dtype, "batch": batch, "res": res,
            "train_img_s": batch / train_s, "fwd_img_s": fwd_batch / fwd_s}


def _release_torch_memory() -> None:
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict], host_memory_retained: bool = False) -> None:
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"{time.strftime('%Y-%m-%d')}"
          + (", host allocator keeps freed memory (dico_jax.host_memory)" if host_memory_retained else ""))
    head = (f"{'impl':5} {'model':8} {'dtype':9} {'dwconv':6} {'norm':6} {'blocks':11} {'batch':>5} {'compile s':>9} {'train img/s':>11} "
            f"{'TFLOP/s':>8} {'MFU':>6} {'fwd img/s':>10} {'DDPM250 img/s':>13} "
            f"{'Euler50 img/s':>13} {'Heun25 img/s':>12} {'peak GiB':>8} "
            f"{'train x torch':>13} {'fwd x torch':>11}")
    print(head)
    for r in rows:
        blocks = "-" if "scan" not in r else ("scan" if r["scan"] else "loop") + "/" + r["remat"]
        print(f"{r['impl']:5} {r['model']:8} {r['dtype']:9} {r.get('depthwise', '-'):6} {r.get('norm', '-'):6} {blocks:11} {r['batch']:5d} "
              f"{fmt(r.get('compile_s'), '9.1f')} {fmt(r['train_img_s'], '11.2f')} "
              f"{fmt(r.get('train_tflops'), '8.3f')} {fmt(r.get('mfu'), '6.1%')} "
              f"{fmt(r.get('fwd_img_s'), '10.2f')} {fmt(r.get('sample250_img_s'), '13.3f')} "
              f"{fmt(r.get('euler50_img_s'), '13.3f')} {fmt(r.get('heun25_img_s'), '12.3f')} "
              f"{fmt(r.get('peak_mem_gib'), '8.2f')} {fmt(r.get('train_vs_torch'), '13.2f')} "
              f"{fmt(r.get('fwd_vs_torch'), '11.2f')}")


def main(argv=None) -> list[dict]:
    ap = command.ArgumentParser("dico_jax.tools.benchmark", description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="DiCo-S")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--batch", type=int, default=8, help="train batch per chip")
    ap.add_argument("--fwd_batch", type=int, default=None, help="forward batch (default: --batch)")
    ap.add_argument("--res", type=int, default=32, help="latent height/width (32 = 256px)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sample_steps", type=int, default=5,
                    help="sampler steps timed (the rates of DDPM-250, Euler-50 and Heun-25 "
                         "are extrapolated)")
    ap.add_argument("--sample_batch", type=int, default=None)
    ap.add_argument("--remat", default="none")
    ap.add_argument("--unrolled", action="store_true",
                    help="blocks as a Python loop (scan=False): longer compile, no stacked residuals")
    ap.add_argument("--parts", default="train,forward,sample",
                    help="what to time besides compile: a comma list of train, forward, sample")
    ap.add_argument("--depthwise", default="auto",
                    help="depthwise 3x3 as 'conv' (grouped conv), 'shift' (9 multiply-adds) or "
                         "'auto' (shift on CPU, conv elsewhere); a comma list times each")
    ap.add_argument("--norm", default="xla",
                    help="layer norms as 'xla' (compiler-fused) or 'pallas' (GPU kernels)")
    ap.add_argument("--cpu_peak_tflops", type=float, default=1.0,
                    help="peak used for MFU when the device is not a known accelerator")
    ap.add_argument("--torch", action="store_true", help="also time the PyTorch reference")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="trace 3 train steps per JAX row into DIR and print device time by op kind")
    args = ap.parse_args(argv)
    retained = host_memory.retain_freed_memory_on_cpu()  # before JAX starts its backend
    if args.sample_steps < 2:
        ap.error(f"--sample_steps must be at least 2 (a respaced sampler keeps >= 2 steps), "
                 f"got {args.sample_steps}")
    parts = tuple(args.parts.split(","))
    if set(parts) - {"train", "forward", "sample"}:
        ap.error(f"--parts takes train, forward and sample, got {args.parts!r}")
    fwd_batch = args.fwd_batch or args.batch
    rows = []

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)

    for name in args.models.split(","):
        for dtype in args.dtypes.split(","):
            ref = None
            if args.torch:
                # PyTorch first, then its cached memory is released for JAX: JAX keeps what
                # it allocates, so the other order can starve the baseline.
                try:
                    ref = bench_torch(name, dtype, args.batch, fwd_batch, args.res, args.repeats)
                except Exception as e:  # a baseline that does not fit must not cost the JAX rows
                    print(f"PyTorch baseline {name} {dtype} failed: {e!r}"[:400])
                _release_torch_memory()
            for depthwise in args.depthwise.split(","):
                row = bench_jax(name, dtype, args.batch, fwd_batch, args.res, args.repeats,
                                args.sample_steps, args.sample_batch or args.batch,
                                args.remat, args.cpu_peak_tflops * 1e12, depthwise, args.profile,
                                not args.unrolled, parts, args.norm)
                if ref is not None:
                    row["train_vs_torch"] = row["train_img_s"] / ref["train_img_s"]
                    if row["fwd_img_s"] is not None:
                        row["fwd_vs_torch"] = row["fwd_img_s"] / ref["fwd_img_s"]
                row["host_memory_retained"] = retained
                rows.append(row)
                save()
            if ref is not None:
                ref["host_memory_retained"] = retained
                rows.append(ref)
                save()
    print_table(rows, retained)
    return rows


if __name__ == "__main__":
    main()
