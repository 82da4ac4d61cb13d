"""The adaLN layer norm's training path as Pallas kernels for GPUs (Triton backend).

`layers.modulated_layer_norm(..., impl="pallas")` uses `forward` and `backward` as its
gradient's rules. What XLA does with that layer norm on a GPU (read off the compiled DiCo-XL
step by `dico_jax.tools.roofline`): the forward reads its input three times (mean, variance,
output), and the backward reads the output gradient and the input twice, once for the input
gradient (a reduction over channels) and once more for the shift and scale gradients
(reductions over pixels), which XLA does not fuse with the first. These kernels read each once:

- forward: a tile of pixel rows with all channels in registers gives mean, variance and the
  modulated output from one read; it writes the output and each pixel's mean and 1/std.
- backward: each program walks a run of one image's pixels, writes the input gradient (plus
  the gradient reaching the input along the block's skip connection, so that sum costs no
  extra pass) and keeps running column sums for the shift and scale gradients; a run's sums
  are written once and added up per image afterwards (about 3% of the kernel's bytes in bf16).

Triton wants power-of-two tile shapes: channels are padded to the next power of two with
masked loads and stores (DiCo's 416, 832, 1664 -> 512, 1024, 2048), so padding costs
registers, not memory traffic. The math is `layers.modulated_layer_norm`'s (fp32 statistics,
eps 1e-6). `interpret=True` runs the same kernels in Pallas's interpreter on any backend; the
tests check them that way. Under a device mesh the kernels run per batch shard (`shard_map`):
every statistic is per image, so no collective is needed.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from dico_jax import sharding

Array = jax.Array
EPS = 1e-6  # layers.LN_EPS
TILE_ELEMENTS = 8192  # elements of one (rows, padded channels) register tile
RUN_ROWS = 64  # pixels one backward program sums its shift/scale gradients over


def _geometry(x: Array) -> tuple[int, int, int, int, int]:
    """(images, pixels per image, channels, rows per tile, padded channels) of x (N, H, W, C)."""
    n, h, w, c = _check(x).shape
    cpad = pl.next_power_of_2(c)
    rows = min(max(1, TILE_ELEMENTS // cpad), pl.next_power_of_2(h * w))
    return n, h * w, c, rows, cpad


def _vec(a: Array) -> Array:
    """A per-image or per-channel vector as the kernels read it: flat fp32."""
    return a.astype(jnp.float32).reshape(-1)


def _warps(rows: int, cpad: int) -> int:
    return int(min(8, max(1, rows * cpad // 1024)))


def _fwd_kernel(*refs, pixels, rows, residual):
    if residual:
        x_ref, z_ref, bias_ref, gate_ref, shift_ref, scale_ref, xnew_ref, *outs = refs
    else:
        x_ref, shift_ref, scale_ref, *outs = refs
    y_ref, mean_ref, rstd_ref = outs
    n, j = pl.program_id(0), pl.program_id(1)
    c = x_ref.shape[1]
    cpad = pl.next_power_of_2(c)
    col = jnp.arange(cpad)
    pix = j * rows + jnp.arange(rows)
    row_ok, col_ok = pix < pixels, col < c
    mask = row_ok[:, None] & col_ok[None, :]
    row = n * pixels + pix
    at = (row[:, None], col[None, :])
    x = plgpu.load(x_ref.at[at], mask=mask, other=0.0)
    if residual:  # x + gate (z + bias), rounded to x's dtype as stored
        z = plgpu.load(z_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
        bias = plgpu.load(bias_ref.at[col], mask=col_ok, other=0.0).astype(jnp.float32)
        gate = plgpu.load(gate_ref.at[n * c + col], mask=col_ok, other=0.0)
        x = (x.astype(jnp.float32) + gate[None, :] * (z + bias[None, :])).astype(x_ref.dtype)
        plgpu.store(xnew_ref.at[at], x, mask=mask)
    x = x.astype(jnp.float32)
    mean = jnp.sum(x, axis=1) / c
    xc = jnp.where(mask, x - mean[:, None], 0.0)
    rstd = lax.rsqrt(jnp.sum(xc * xc, axis=1) / c + EPS)
    shift = plgpu.load(shift_ref.at[n * c + col], mask=col_ok, other=0.0)
    scale = plgpu.load(scale_ref.at[n * c + col], mask=col_ok, other=0.0)
    y = xc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    plgpu.store(y_ref.at[at], y.astype(y_ref.dtype), mask=mask)
    plgpu.store(mean_ref.at[row], mean, mask=row_ok)
    plgpu.store(rstd_ref.at[row], rstd, mask=row_ok)


def _bwd_kernel(*refs, pixels, rows, run, skip, residual):
    refs = list(refs)
    x_ref, mean_ref, rstd_ref, scale_ref, dy_ref = refs[:5]
    del refs[:5]
    dskip_ref = refs.pop(0) if skip else None
    if residual:
        z_ref, gate_ref = refs[:2]
        del refs[:2]
    dx_ref = refs.pop(0)
    dz_ref = refs.pop(0) if residual else None
    sum_refs = refs  # d_shift, d_scale [, sum of dx, sum of dx z]
    n, j = pl.program_id(0), pl.program_id(1)
    c = x_ref.shape[1]
    cpad = pl.next_power_of_2(c)
    col = jnp.arange(cpad)
    col_ok = col < c
    gain = 1.0 + plgpu.load(scale_ref.at[n * c + col], mask=col_ok, other=0.0)
    if residual:
        gate = plgpu.load(gate_ref.at[n * c + col], mask=col_ok, other=0.0)

    def tile(t, sums):
        pix = j * run + t * rows + jnp.arange(rows)
        row_ok = pix < pixels
        mask = row_ok[:, None] & col_ok[None, :]
        row = n * pixels + pix
        at = (row[:, None], col[None, :])
        x = plgpu.load(x_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
        g = plgpu.load(dy_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
        mean = plgpu.load(mean_ref.at[row], mask=row_ok, other=0.0)
        rstd = plgpu.load(rstd_ref.at[row], mask=row_ok, other=0.0)
        # Padded rows and columns have g = 0 (and dskip = 0), so they add nothing below.
        xhat = (x - mean[:, None]) * rstd[:, None]
        gx = g * gain[None, :]
        m1 = jnp.sum(gx, axis=1) / c
        m2 = jnp.sum(gx * xhat, axis=1) / c
        dx = rstd[:, None] * (gx - m1[:, None] - xhat * m2[:, None])
        if skip:
            dx = dx + plgpu.load(dskip_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
        plgpu.store(dx_ref.at[at], dx.astype(dx_ref.dtype), mask=mask)
        new = [sums[0] + jnp.sum(g, axis=0), sums[1] + jnp.sum(g * xhat, axis=0)]
        if residual:
            z = plgpu.load(z_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
            plgpu.store(dz_ref.at[at], (gate[None, :] * dx).astype(dz_ref.dtype), mask=mask)
            new += [sums[2] + jnp.sum(dx, axis=0), sums[3] + jnp.sum(dx * z, axis=0)]
        return tuple(new)

    zero = jnp.zeros((cpad,), jnp.float32)
    sums = lax.fori_loop(0, run // rows, tile, (zero,) * len(sum_refs))
    out = (n * pl.num_programs(1) + j) * c + col
    for ref, total in zip(sum_refs, sums):
        plgpu.store(ref.at[out], total, mask=col_ok)


def _launch(kernel, name, grid, rows, cpad, out_shape, args, interpret):
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid,
        compiler_params=plgpu.CompilerParams(num_warps=_warps(rows, cpad), num_stages=1),
        interpret=interpret, name=name)(*args)


def _forward(x, shift, scale, residual, interpret: bool):
    """x (N, H, W, C), shift/scale (N, C), residual None or (z, bias, gate) -> (y, x + gate
    (z + bias) when residual is given, mean, 1/std); statistics (N*H*W,) fp32."""
    n, pixels, c, rows, cpad = _geometry(x)
    flat = lambda a: a.reshape(n * pixels, c)  # noqa: E731
    tensor = jax.ShapeDtypeStruct((n * pixels, c), x.dtype)
    stat = jax.ShapeDtypeStruct((n * pixels,), jnp.float32)
    args = [flat(x)]
    if residual is not None:
        z, bias, gate = residual
        args += [flat(z), bias, _vec(gate)]
    outs = _launch(
        functools.partial(_fwd_kernel, pixels=pixels, rows=rows, residual=residual is not None),
        "dico_modulated_layer_norm_fwd", (n, pl.cdiv(pixels, rows)), rows, cpad,
        (tensor,) * (1 + (residual is not None)) + (stat, stat),
        args + [_vec(shift), _vec(scale)], interpret)
    if residual is not None:
        x_new, y, mean, rstd = outs
        return y.reshape(x.shape), x_new.reshape(x.shape), mean, rstd
    y, mean, rstd = outs
    return y.reshape(x.shape), mean, rstd


def _backward(x, mean, rstd, scale, dy, dskip, residual, interpret: bool):
    """Gradients of `_forward` (x is its x + gate (z + bias) when residual is given): the
    input gradient (+ dskip), d_shift, d_scale (N, C) fp32, and with residual = (z, bias,
    gate) also dz and d_bias, d_gate."""
    n, pixels, c, rows, cpad = _geometry(x)
    run = max(rows, min(RUN_ROWS, pl.next_power_of_2(pixels)))
    runs = pl.cdiv(pixels, run)
    flat = lambda a: a.reshape(n * pixels, c)  # noqa: E731
    args = [flat(x), mean, rstd, _vec(scale), flat(dy)]
    if dskip is not None:
        args.append(flat(dskip))
    out_shape = [jax.ShapeDtypeStruct((n * pixels, c), x.dtype)]
    if residual is not None:
        z, bias, gate = residual
        args += [flat(z), _vec(gate)]
        out_shape.append(jax.ShapeDtypeStruct((n * pixels, c), z.dtype))
    n_sums = 2 if residual is None else 4
    out_shape += [jax.ShapeDtypeStruct((n * runs * c,), jnp.float32)] * n_sums
    outs = _launch(
        functools.partial(_bwd_kernel, pixels=pixels, rows=rows, run=run,
                          skip=dskip is not None, residual=residual is not None),
        "dico_modulated_layer_norm_bwd", (n, runs), rows, cpad, tuple(out_shape), args,
        interpret)
    grads = [outs[0].reshape(x.shape)]
    sums = [s.reshape(n, runs, c).sum(axis=1) for s in outs[-n_sums:]]
    if residual is None:
        return grads[0], sums[0], sums[1]
    dz = outs[1].reshape(x.shape)
    d_shift, d_scale, s_dx, s_dxz = sums
    gate = gate.astype(jnp.float32)
    d_gate = s_dxz + s_dx * bias.astype(jnp.float32)[None, :]  # sum over pixels of dx (z + b)
    d_bias = jnp.sum(s_dx * gate, axis=0)  # sum over images and pixels of dz
    return grads[0], d_shift, d_scale, dz, d_bias, d_gate


def _per_shard(fn, specs, n_out: int):
    """Runs fn on each batch shard when traced under a mesh that splits the batch; `specs`
    says per argument whether it has the batch axis ("b") or is replicated ("r")."""
    mesh = sharding.batch_split_mesh()
    if mesh is None:
        return fn
    batch = P(sharding.BATCH_AXES)
    in_specs = tuple(batch if s == "b" else P() for s in specs)
    # Every output has a batch axis (`backward` gives its per-shard d_bias one).
    # check_vma=False: pallas_call's outputs carry no varying-axes annotation to check.
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=(batch,) * n_out,
                         check_vma=False)


# Pixel statistics live as (N*H*W,) inside the kernels and as (N, H*W) between them, so the
# batch shard is their leading axis like every other argument's.
def forward(x: Array, shift: Array, scale: Array, residual=None, interpret: bool = False):
    """The modulated layer norm of x (N, H, W, C) with shift/scale (N, C): returns y (x's
    dtype), each pixel's mean and 1/std, (N, H*W) fp32, for `backward`. With residual =
    (z, bias, gate) it normalizes x + gate (z + bias) instead (z like x, bias (C,), gate
    (N, C)) and returns (y, that sum, mean, 1/std)."""
    def fn(x, shift, scale, *res):
        outs = _forward(x, shift, scale, res or None, interpret)
        return outs[:-2] + tuple(a.reshape(x.shape[0], -1) for a in outs[-2:])

    if residual is None:
        return _per_shard(fn, "bbb", 3)(x, shift, scale)
    return _per_shard(fn, "bbbbrb", 4)(x, shift, scale, *residual)


def backward(x: Array, mean: Array, rstd: Array, scale: Array, dy: Array,
             dskip: Array | None = None, residual=None, interpret: bool = False):
    """The gradients for output gradient dy: dx (+ dskip, when given, in the same pass),
    d_shift and d_scale (N, C) fp32; x is what was normalized (the sum, with residual). With
    residual = (z, bias, gate) as given to `forward` (dskip is then required) also dz,
    d_bias (C,) and d_gate (N, C), fp32."""
    if residual is not None and dskip is None:
        raise ValueError("fused layer norm: the residual form's backward needs dskip")

    def fn(x, mean, rstd, scale, dy, *rest):
        dskip = rest[0] if rest else None
        res = rest[1:] or None
        outs = _backward(x, mean.reshape(-1), rstd.reshape(-1), scale, dy, dskip, res,
                         interpret)
        if res is not None:  # d_bias as a per-shard partial with a batch axis of 1
            outs = outs[:4] + (outs[4][None],) + outs[5:]
        return outs

    args = (x, mean, rstd, scale, dy) + ((dskip,) if dskip is not None else ())
    if residual is None:
        return _per_shard(fn, "b" * len(args), 3)(*args)
    outs = _per_shard(fn, "bbbbbbbrb", 6)(*args, *residual)
    return outs[:4] + (jnp.sum(outs[4], axis=0),) + outs[5:]


def _check(x: Array) -> Array:
    if x.ndim != 4:
        raise ValueError(f"fused layer norm: x must be (N, H, W, C), got shape {x.shape}")
    if x.size >= 2 ** 31:  # the kernels index the flattened array with int32
        raise ValueError(f"fused layer norm: x of shape {x.shape} has 2^31 or more elements "
                         "(per device); use norm_impl='xla' or split the batch over more devices")
    return x
