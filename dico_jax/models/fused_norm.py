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
import math

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


def _tile(c: int) -> tuple[int, int]:
    """(rows per tile, padded channels) for c channels."""
    cpad = pl.next_power_of_2(c)
    return max(1, TILE_ELEMENTS // cpad), cpad


def _warps(rows: int, cpad: int) -> int:
    return int(min(8, max(1, rows * cpad // 1024)))


def _fwd_kernel(x_ref, shift_ref, scale_ref, y_ref, mean_ref, rstd_ref, *, pixels, rows):
    n, j = pl.program_id(0), pl.program_id(1)
    c = x_ref.shape[1]
    cpad = pl.next_power_of_2(c)
    col = jnp.arange(cpad)
    pix = j * rows + jnp.arange(rows)
    row_ok, col_ok = pix < pixels, col < c
    mask = row_ok[:, None] & col_ok[None, :]
    row = n * pixels + pix
    x = plgpu.load(x_ref.at[row[:, None], col[None, :]], mask=mask, other=0.0
                   ).astype(jnp.float32)
    mean = jnp.sum(x, axis=1) / c
    xc = jnp.where(mask, x - mean[:, None], 0.0)
    rstd = lax.rsqrt(jnp.sum(xc * xc, axis=1) / c + EPS)
    shift = plgpu.load(shift_ref.at[n * c + col], mask=col_ok, other=0.0)
    scale = plgpu.load(scale_ref.at[n * c + col], mask=col_ok, other=0.0)
    y = xc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    plgpu.store(y_ref.at[row[:, None], col[None, :]], y.astype(y_ref.dtype), mask=mask)
    plgpu.store(mean_ref.at[row], mean, mask=row_ok)
    plgpu.store(rstd_ref.at[row], rstd, mask=row_ok)


def _bwd_kernel(x_ref, mean_ref, rstd_ref, scale_ref, dy_ref, *rest, pixels, rows, run,
                with_skip):
    if with_skip:
        dskip_ref, dx_ref, dshift_ref, dscale_ref = rest
    else:
        dx_ref, dshift_ref, dscale_ref = rest
    n, j = pl.program_id(0), pl.program_id(1)
    c = x_ref.shape[1]
    cpad = pl.next_power_of_2(c)
    col = jnp.arange(cpad)
    col_ok = col < c
    gain = 1.0 + plgpu.load(scale_ref.at[n * c + col], mask=col_ok, other=0.0)

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
        # Padded rows and columns have g = 0, so they add nothing below.
        xhat = (x - mean[:, None]) * rstd[:, None]
        gx = g * gain[None, :]
        m1 = jnp.sum(gx, axis=1) / c
        m2 = jnp.sum(gx * xhat, axis=1) / c
        dx = rstd[:, None] * (gx - m1[:, None] - xhat * m2[:, None])
        if with_skip:
            dx = dx + plgpu.load(dskip_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
        plgpu.store(dx_ref.at[at], dx.astype(dx_ref.dtype), mask=mask)
        d_shift, d_scale = sums
        return d_shift + jnp.sum(g, axis=0), d_scale + jnp.sum(g * xhat, axis=0)

    zero = jnp.zeros((cpad,), jnp.float32)
    d_shift, d_scale = lax.fori_loop(0, run // rows, tile, (zero, zero))
    out = (n * pl.num_programs(1) + j) * c + col
    plgpu.store(dshift_ref.at[out], d_shift, mask=col_ok)
    plgpu.store(dscale_ref.at[out], d_scale, mask=col_ok)


def _forward(x: Array, shift: Array, scale: Array, interpret: bool):
    """x (N, H, W, C), shift/scale (N, C) -> y (x's dtype), mean and 1/std (N*H*W,) fp32."""
    n, h, w, c = _check(x).shape
    pixels = h * w
    rows, cpad = _tile(c)
    rows = min(rows, pl.next_power_of_2(pixels))
    y, mean, rstd = pl.pallas_call(
        functools.partial(_fwd_kernel, pixels=pixels, rows=rows),
        out_shape=(jax.ShapeDtypeStruct((n * pixels, c), x.dtype),
                   jax.ShapeDtypeStruct((n * pixels,), jnp.float32),
                   jax.ShapeDtypeStruct((n * pixels,), jnp.float32)),
        grid=(n, pl.cdiv(pixels, rows)),
        compiler_params=plgpu.CompilerParams(num_warps=_warps(rows, cpad), num_stages=1),
        interpret=interpret,
        name="dico_modulated_layer_norm_fwd",
    )(x.reshape(n * pixels, c), shift.astype(jnp.float32).reshape(-1),
      scale.astype(jnp.float32).reshape(-1))
    return y.reshape(x.shape), mean, rstd


def _backward(x, mean, rstd, scale, dy, dskip, interpret: bool):
    """Gradients of the forward: dx (+ dskip when given), d_shift and d_scale (N, C) fp32."""
    n, h, w, c = _check(x).shape
    pixels = h * w
    rows, cpad = _tile(c)
    rows = min(rows, pl.next_power_of_2(pixels))
    run = max(rows, min(RUN_ROWS, pl.next_power_of_2(pixels)))
    runs = pl.cdiv(pixels, run)
    flat = lambda a: a.reshape(n * pixels, c)  # noqa: E731
    args = [flat(x), mean, rstd, scale.astype(jnp.float32).reshape(-1), flat(dy)]
    if dskip is not None:
        args.append(flat(dskip))
    dx, d_shift, d_scale = pl.pallas_call(
        functools.partial(_bwd_kernel, pixels=pixels, rows=rows, run=run,
                          with_skip=dskip is not None),
        out_shape=(jax.ShapeDtypeStruct((n * pixels, c), x.dtype),
                   jax.ShapeDtypeStruct((n * runs * c,), jnp.float32),
                   jax.ShapeDtypeStruct((n * runs * c,), jnp.float32)),
        grid=(n, runs),
        compiler_params=plgpu.CompilerParams(num_warps=_warps(rows, cpad), num_stages=1),
        interpret=interpret,
        name="dico_modulated_layer_norm_bwd",
    )(*args)
    d_shift = d_shift.reshape(n, runs, c).sum(axis=1)
    d_scale = d_scale.reshape(n, runs, c).sum(axis=1)
    return dx.reshape(x.shape), d_shift, d_scale


def _per_shard(fn, n_in: int, n_out: int):
    """Runs fn on each batch shard when traced under a mesh that splits the batch."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(sharding.BATCH_AXES) <= set(mesh.axis_names):
        return fn
    if math.prod(mesh.shape[a] for a in sharding.BATCH_AXES) == 1:
        return fn
    spec = P(sharding.BATCH_AXES)
    # check_vma=False: pallas_call's outputs carry no varying-axes annotation to check.
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * n_in, out_specs=(spec,) * n_out,
                         check_vma=False)


# Pixel statistics live as (N*H*W,) inside the kernels and as (N, H*W) between them, so the
# batch shard is their leading axis like every other argument's.
def forward(x: Array, shift: Array, scale: Array, interpret: bool = False
            ) -> tuple[Array, Array, Array]:
    """x (N, H, W, C), shift/scale (N, C) -> the modulated layer norm (x's dtype) and each
    pixel's mean and 1/std, (N, H*W) fp32, for `backward`."""
    def fn(x, shift, scale):
        y, mean, rstd = _forward(x, shift, scale, interpret)
        return y, mean.reshape(x.shape[0], -1), rstd.reshape(x.shape[0], -1)

    return _per_shard(fn, 3, 3)(x, shift, scale)


def backward(x: Array, mean: Array, rstd: Array, scale: Array, dy: Array,
             dskip: Array | None = None, interpret: bool = False) -> tuple[Array, Array, Array]:
    """The gradients for output gradient dy: dx (+ dskip, when given, in the same pass), and
    d_shift and d_scale (N, C) fp32."""
    def fn(x, mean, rstd, scale, dy, *dskip):
        return _backward(x, mean.reshape(-1), rstd.reshape(-1), scale, dy,
                         dskip[0] if dskip else None, interpret)

    args = (x, mean, rstd, scale, dy) + ((dskip,) if dskip is not None else ())
    return _per_shard(fn, len(args), 3)(*args)


def _check(x: Array) -> Array:
    if x.ndim != 4:
        raise ValueError(f"fused layer norm: x must be (N, H, W, C), got shape {x.shape}")
    if x.size >= 2 ** 31:  # the kernels index the flattened array with int32
        raise ValueError(f"fused layer norm: x of shape {x.shape} has 2^31 or more elements "
                         "(per device); use norm_impl='xla' or split the batch over more devices")
    return x
