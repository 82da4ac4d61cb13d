"""The adaLN layer norm's training path as Pallas kernels for GPUs (Triton backend).

`modulated_layer_norm` is `layers.modulated_layer_norm` with `forward` and `backward` as its
gradient's rules; `kernels.layer_norm_fn` selects it. What XLA does with that layer norm on a
GPU (read off the compiled DiCo-XL step by `dico_jax.tools.roofline`): the forward reads its
input three times (mean, variance, output), and the backward reads the output gradient and the
input twice, once for the input gradient (a reduction over channels) and once more for the
shift and scale gradients (reductions over pixels), which XLA does not fuse with the first.
These kernels read each once:

- forward: a tile of pixel rows with all channels in registers gives mean, variance and the
  modulated output from one read; it writes the output and each pixel's mean and 1/std.
- backward: each program walks a run of one image's pixels, writes the input gradient (plus
  the gradient reaching the input along the block's skip connection, so that sum costs no
  extra pass) and keeps running column sums for the shift and scale gradients; a run's sums
  are written once and added up per image afterwards.

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
from dico_jax.models import layers

Array = jax.Array
EPS = layers.LN_EPS
TILE_ELEMENTS = 8192  # elements of one (rows, padded channels) register tile
RUN_ROWS = 64  # pixels one backward program sums its shift/scale gradients over


def _geometry(x: Array) -> tuple[int, int, int, int, int]:
    """(images, pixels per image, channels, rows per tile, padded channels) of x (N, H, W, C)."""
    n, h, w, c = _check(x).shape
    cpad = pl.next_power_of_2(c)
    rows = min(max(1, TILE_ELEMENTS // cpad), pl.next_power_of_2(h * w))
    return n, h * w, c, rows, cpad


def _vec(a: Array) -> Array:
    """A per-image vector as the kernels read it: flat fp32."""
    return a.astype(jnp.float32).reshape(-1)


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
    at = (row[:, None], col[None, :])
    x = plgpu.load(x_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
    mean = jnp.sum(x, axis=1) / c
    xc = jnp.where(mask, x - mean[:, None], 0.0)
    rstd = lax.rsqrt(jnp.sum(xc * xc, axis=1) / c + EPS)
    shift = plgpu.load(shift_ref.at[n * c + col], mask=col_ok, other=0.0)
    scale = plgpu.load(scale_ref.at[n * c + col], mask=col_ok, other=0.0)
    y = xc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    plgpu.store(y_ref.at[at], y.astype(y_ref.dtype), mask=mask)
    plgpu.store(mean_ref.at[row], mean, mask=row_ok)
    plgpu.store(rstd_ref.at[row], rstd, mask=row_ok)


def _bwd_kernel(*refs, pixels, rows, run, skip):
    x_ref, mean_ref, rstd_ref, scale_ref, dy_ref, *rest = refs
    dskip_ref = rest.pop(0) if skip else None
    dx_ref, d_shift_ref, d_scale_ref = rest
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
        # Padded rows and columns have g = 0 (and dskip = 0), so they add nothing below.
        xhat = (x - mean[:, None]) * rstd[:, None]
        gx = g * gain[None, :]
        m1 = jnp.sum(gx, axis=1) / c
        m2 = jnp.sum(gx * xhat, axis=1) / c
        dx = rstd[:, None] * (gx - m1[:, None] - xhat * m2[:, None])
        if skip:
            dx = dx + plgpu.load(dskip_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
        plgpu.store(dx_ref.at[at], dx.astype(dx_ref.dtype), mask=mask)
        return sums[0] + jnp.sum(g, axis=0), sums[1] + jnp.sum(g * xhat, axis=0)

    zero = jnp.zeros((cpad,), jnp.float32)
    d_shift, d_scale = lax.fori_loop(0, run // rows, tile, (zero, zero))
    out = (n * pl.num_programs(1) + j) * c + col
    plgpu.store(d_shift_ref.at[out], d_shift, mask=col_ok)
    plgpu.store(d_scale_ref.at[out], d_scale, mask=col_ok)


def _launch(kernel, name, grid, rows, cpad, out_shape, args, interpret):
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid,
        compiler_params=plgpu.CompilerParams(num_warps=_warps(rows, cpad), num_stages=1),
        interpret=interpret, name=name)(*args)


def _forward(x, shift, scale, interpret: bool):
    """x (N, H, W, C), shift/scale (N, C) -> (y, mean, 1/std); statistics (N*H*W,) fp32."""
    n, pixels, c, rows, cpad = _geometry(x)
    stat = jax.ShapeDtypeStruct((n * pixels,), jnp.float32)
    y, mean, rstd = _launch(
        functools.partial(_fwd_kernel, pixels=pixels, rows=rows),
        "dico_modulated_layer_norm_fwd", (n, pl.cdiv(pixels, rows)), rows, cpad,
        (jax.ShapeDtypeStruct((n * pixels, c), x.dtype), stat, stat),
        (x.reshape(n * pixels, c), _vec(shift), _vec(scale)), interpret)
    return y.reshape(x.shape), mean, rstd


def _backward(x, mean, rstd, scale, dy, dskip, interpret: bool):
    """Gradients of `_forward`: the input gradient (+ dskip), d_shift, d_scale (N, C) fp32."""
    n, pixels, c, rows, cpad = _geometry(x)
    run = max(rows, min(RUN_ROWS, pl.next_power_of_2(pixels)))
    runs = pl.cdiv(pixels, run)
    flat = lambda a: a.reshape(n * pixels, c)  # noqa: E731
    args = [flat(x), mean, rstd, _vec(scale), flat(dy)]
    if dskip is not None:
        args.append(flat(dskip))
    sums = jax.ShapeDtypeStruct((n * runs * c,), jnp.float32)
    dx, d_shift, d_scale = _launch(
        functools.partial(_bwd_kernel, pixels=pixels, rows=rows, run=run,
                          skip=dskip is not None),
        "dico_modulated_layer_norm_bwd", (n, runs), rows, cpad,
        (jax.ShapeDtypeStruct((n * pixels, c), x.dtype), sums, sums), args, interpret)
    per_image = lambda s: s.reshape(n, runs, c).sum(axis=1)  # noqa: E731
    return dx.reshape(x.shape), per_image(d_shift), per_image(d_scale)


def _per_shard(fn, n_args: int, n_out: int):
    """Runs fn on each batch shard when traced under a mesh that splits the batch (every
    argument and output of the kernels has the batch as its leading axis)."""
    mesh = sharding.batch_split_mesh()
    if mesh is None:
        return fn
    batch = P(sharding.BATCH_AXES)
    # check_vma=False: pallas_call's outputs carry no varying-axes annotation to check.
    return jax.shard_map(fn, mesh=mesh, in_specs=(batch,) * n_args,
                         out_specs=(batch,) * n_out, check_vma=False)


# Pixel statistics live as (N*H*W,) inside the kernels and as (N, H*W) between them, so the
# batch shard is their leading axis like every other argument's.
def forward(x: Array, shift: Array, scale: Array, interpret: bool = False):
    """The modulated layer norm of x (N, H, W, C) with shift/scale (N, C): returns y (x's
    dtype), each pixel's mean and 1/std, (N, H*W) fp32, for `backward`."""
    def fn(x, shift, scale):
        y, mean, rstd = _forward(x, shift, scale, interpret)
        return y, mean.reshape(x.shape[0], -1), rstd.reshape(x.shape[0], -1)

    return _per_shard(fn, 3, 3)(x, shift, scale)


def backward(x: Array, mean: Array, rstd: Array, scale: Array, dy: Array,
             dskip: Array | None = None, interpret: bool = False):
    """The gradients for output gradient dy: dx (+ dskip, when given, in the same pass),
    d_shift and d_scale (N, C) fp32."""
    def fn(x, mean, rstd, scale, dy, *dskip):
        return _backward(x, mean.reshape(-1), rstd.reshape(-1), scale, dy,
                         dskip[0] if dskip else None, interpret)

    args = (x, mean, rstd, scale, dy) + ((dskip,) if dskip is not None else ())
    return _per_shard(fn, len(args), 3)(*args)


# --------------------------------------------------------------------------- as a layer norm
def modulated_layer_norm(x: Array, shift: Array, scale: Array, skip: bool = False,
                         interpret: bool = False):
    """`layers.modulated_layer_norm(x, shift, scale)` (with skip=True, the pair (it, x) of
    `layers.modulated_layer_norm_and_skip`, whose skip gradient the backward kernel adds)
    with these kernels as its gradient's rules. Undifferentiated (sampling, evaluation) it is
    XLA's layer norm: there XLA fuses it with the residual sums around it and never writes
    their result, which a kernel cannot match."""
    with jax.named_scope("modulated_layer_norm"):
        if skip:
            return _norm_and_skip(x, shift, scale, interpret)
        return _norm(x, shift, scale, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _norm(x, shift, scale, interpret):
    return layers.modulated_layer_norm(x, shift, scale)


def _norm_fwd(x, shift, scale, interpret):
    y, mean, rstd = forward(x, shift, scale, interpret)
    return y, (x, mean, rstd, shift, scale)


def _norm_bwd(interpret, res, dy):
    return _norm_and_skip_bwd(interpret, res, (dy, None))


_norm.defvjp(_norm_fwd, _norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _norm_and_skip(x, shift, scale, interpret):
    return layers.modulated_layer_norm(x, shift, scale), x


def _norm_and_skip_fwd(x, shift, scale, interpret):
    y, res = _norm_fwd(x, shift, scale, interpret)
    return (y, x), res


def _norm_and_skip_bwd(interpret, res, grads):  # also `_norm_bwd`'s, with no skip gradient
    x, mean, rstd, shift, scale = res
    dy, dskip = grads
    dx, d_shift, d_scale = backward(x, mean, rstd, scale, dy, dskip, interpret)
    return dx, d_shift.astype(shift.dtype), d_scale.astype(scale.dtype)


_norm_and_skip.defvjp(_norm_and_skip_fwd, _norm_and_skip_bwd)


def _check(x: Array) -> Array:
    if x.ndim != 4:
        raise ValueError(f"fused layer norm: x must be (N, H, W, C), got shape {x.shape}")
    if x.size >= 2 ** 31:  # the kernels index the flattened array with int32
        raise ValueError(f"fused layer norm: x of shape {x.shape} has 2^31 or more elements "
                         "(per device); use norm_impl='xla' or split the batch over more devices")
    return x
