"""Compile time of DiCo's `init` and training forward+backward: stacked (scan) vs Python loop.

    python -m dico_jax.tools.compile_time --model DiCo-XL [--dtype bfloat16] [--batch 8] [--json out.json]

Prints a table; nothing here is a test. Compilation only: abstract inputs, no execution.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp


from dico_jax import command
from dico_jax.models import abstract_params, get_model


def compile_seconds(fn, *args) -> float:
    t0 = time.perf_counter()
    jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - t0


def measure(name: str, scan: bool, dtype: str, batch: int, res: int, remat: str) -> dict:
    model = get_model(name, scan=scan, dtype=dtype, remat=remat)
    x = jax.ShapeDtypeStruct((batch, res, res, model.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    params = abstract_params(model, res, res)

    def init(k, x, t):
        return model.init({"params": k}, x, t, t)["params"]

    def loss(p, x, t):
        out = model.apply({"params": p}, x, t, t, train=True, rngs={"dropout": jax.random.key(1)})
        return jnp.mean(jnp.square(out))

    return {
        "model": name, "blocks": "scan" if scan else "loop", "dtype": dtype, "remat": remat,
        "init_s": compile_seconds(init, key, x, t),
        "fwd_bwd_s": compile_seconds(jax.value_and_grad(loss), params, x, t),
    }


def main(argv=None):
    ap = command.ArgumentParser("dico_jax.tools.compile_time", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="DiCo-XL")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--res", type=int, default=32, help="latent height/width")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = [measure(args.model, scan, args.dtype, args.batch, args.res, args.remat)
            for scan in (True, False)]
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"{'model':8} {'blocks':6} {'dtype':9} {'remat':6} {'init compile s':>15} {'fwd+bwd compile s':>18}")
    for r in rows:
        print(f"{r['model']:8} {r['blocks']:6} {r['dtype']:9} {r['remat']:6} {r['init_s']:15.1f} {r['fwd_bwd_s']:18.1f}")
    scan_row, loop_row = rows
    print(f"scan / loop: init {scan_row['init_s'] / loop_row['init_s']:.2f}, "
          f"fwd+bwd {scan_row['fwd_bwd_s'] / loop_row['fwd_bwd_s']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
