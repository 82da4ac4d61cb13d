"""Pure array functions the DiCo network is built from (NHWC layout).

Parameters are plain arrays in the layouts below; `dico.py` owns them as Flax params.
1x1 convolutions are matrices (C_in, C_out); 3x3 convolutions are HWIO kernels; the
depthwise 3x3 kernel is (3, 3, C).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array
LN_EPS = 1e-6


def _scoped(fn: Callable) -> Callable:
    """Runs `fn` under a named scope, so profiles and HLO metadata name the op it came from."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.named_scope(fn.__name__):
            return fn(*args, **kwargs)

    return wrapped


# --------------------------------------------------------------------------- init
def xavier_uniform(fan_in: int, fan_out: int) -> Callable:
    """Xavier-uniform with explicit fans, so PyTorch's conv fan rules can be followed."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def normal(std: float) -> Callable:
    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.normal(key, shape, dtype)

    return init


def zeros(key, shape, dtype=jnp.float32):
    del key
    return jnp.zeros(shape, dtype)


def stacked(init: Callable) -> Callable:
    """Initializer for a (depth, ...) stack: each layer drawn independently by `init`."""

    def init_stack(key, shape, dtype=jnp.float32):
        keys = jax.random.split(key, shape[0])
        return jax.vmap(lambda k: init(k, shape[1:], dtype))(keys)

    return init_stack


# --------------------------------------------------------------------------- ops
def timestep_embedding(t: Array, dim: int = 256, max_period: float = 10000.0) -> Array:
    """Sinusoidal features [cos(t f), sin(t f)] with f_k = exp(-ln(max_period) k / (dim/2))."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def dense(x: Array, kernel: Array, bias: Array | None = None, dtype: Any = None) -> Array:
    """x @ kernel (+ bias) over the last axis; also the 1x1 convolution in NHWC."""
    dtype = dtype or x.dtype
    # A 2-D matrix product: XLA:CPU's fast GEMM path needs one contracting dimension, also
    # for the kernel gradient, which contracts over N, H and W.
    lead = x.shape[:-1]
    y = jnp.matmul(x.reshape(-1, x.shape[-1]).astype(dtype), kernel.astype(dtype))
    y = y.reshape(*lead, kernel.shape[-1])
    if bias is not None:
        y = y + bias.astype(dtype)
    return y


def conv3x3(x: Array, kernel: Array, bias: Array | None = None, dtype: Any = None) -> Array:
    """3x3 convolution, stride 1, zero padding 1; kernel HWIO."""
    dtype = dtype or x.dtype
    y = lax.conv_general_dilated(
        x.astype(dtype), kernel.astype(dtype), (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if bias is not None:
        y = y + bias.astype(dtype)
    return y


@_scoped
def depthwise3x3(x: Array, kernel: Array, bias: Array, impl: str = "conv",
                 input_bias: Array | None = None, pin_residuals: bool = True) -> Array:
    """Depthwise 3x3 convolution (groups = channels), padding 1; kernel (3, 3, C).

    impl="conv" is one grouped convolution (what accelerators' conv libraries fuse best);
    impl="shift" is nine shifted multiply-adds, which XLA fuses into one loop on CPU.
    With `input_bias` (C,) it convolves x + input_bias without forming that sum (a full pass
    over memory each way that XLA does not fuse into the matmul producing x): the bias's
    share is the same for every image, convolved once (by `impl`: XLA:CPU runs a grouped
    convolution as a dense one) as a (1, H, W, C) map in fp32 (it differs at the borders,
    where the zero padding cuts taps off) and added with `bias`. `pin_residuals`: see
    `_tangent_fn`.
    """
    if impl not in ("conv", "shift"):
        raise ValueError(f"depthwise impl must be 'conv' or 'shift', got {impl!r}")
    out_bias = bias.astype(jnp.float32)
    if input_bias is not None:
        plane = jnp.broadcast_to(input_bias.astype(jnp.float32), (1, *x.shape[1:]))
        out_bias = _depthwise(plane, kernel.astype(jnp.float32), impl, pin_residuals) + out_bias
    return (_depthwise(x, kernel.astype(x.dtype), impl, pin_residuals)
            + out_bias.astype(x.dtype))


def _depthwise(x: Array, kernel: Array, impl: str, pin_residuals: bool = True) -> Array:
    if impl == "shift":
        return _depthwise_shift(x, kernel, pin_residuals)
    return lax.conv_general_dilated(
        x, kernel[:, :, None, :], (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def _shifted_sum(x: Array, kernel: Array) -> Array:
    """sum over taps (a, b) of pad(x)[a:a+H, b:b+W] * kernel[a, b]: one fused loop on XLA."""
    h, w = x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(xp[:, a:a + h, b:b + w, :] * kernel[a, b] for a in range(3) for b in range(3))


def _shift(x: Array, a: int, b: int) -> Array:
    """x moved by tap (a, b) of a 3x3 stencil, zero-filled: pad(x)[a:a+H, b:b+W] as one pad.
    A pad with negative edges transposes to the opposite shift, again one pad, so the
    transpose of a sum of shifted products stays one fused loop."""
    zero = jnp.zeros((), x.dtype)
    return lax.pad(x, zero, ((0, 0, 0), (1 - a, a - 1, 0), (1 - b, b - 1, 0), (0, 0, 0)))


def _taps(x: Array, kernel: Array) -> Array:
    return sum(_shift(x, a, b) * kernel[a, b] for a in range(3) for b in range(3))


def _taps_f32(x: Array, kernel: Array) -> Array:
    return sum(_shift(x, a, b).astype(jnp.float32) * kernel[a, b].astype(jnp.float32)
               for a in range(3) for b in range(3))


# The hand-written layers below are `jax.custom_jvp` functions whose tangent is linear in the
# tangents, so forward mode (jax.jvp, jax.linearize) works, to any order, and reverse mode is
# the transpose of the tangent. What the transpose keeps for the backward pass follows from
# where the tangent first meets a value computed from the primal alone: differentiating the
# forward formula would keep full-size fp32 intermediates (the normalized x, the GELU's
# slope, nine shifted copies of x). With `pin_residuals` the tangent is evaluated under
# `jax.checkpoint`, so the transpose keeps only the layer's inputs (x in the compute dtype,
# and the small statistics) and recomputes the rest inside the backward pass's fused loops.
# Inside a block that is itself rematerialized with a policy (`dico.REMAT_POLICIES`) the
# outer policy already decides what is kept, and a nested checkpoint would add a second copy
# of each pinned input to what it saves: there the blocks pass pin_residuals=False.
def _tangent_fn(fn: Callable, pin_residuals: bool) -> Callable:
    return jax.checkpoint(fn, prevent_cse=False) if pin_residuals else fn


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _depthwise_shift(x: Array, kernel: Array, pin_residuals: bool = True) -> Array:
    return _shifted_sum(x, kernel)


@_depthwise_shift.defjvp
def _depthwise_shift_jvp(pin_residuals, primals, tangents):
    # Bilinear: d(x * k) = dx * k + x * dk. The transpose of the first term is the same
    # nine-tap loop over the cotangent with the taps moved the opposite way; the kernel's
    # share sums N*H*W products per tap, so it is formed, and transposed, in fp32 in every
    # dtype.
    x, kernel = primals
    dx, dkernel = tangents
    dy = _taps(dx, kernel) + _tangent_fn(_taps_f32, pin_residuals)(x, dkernel).astype(x.dtype)
    return _depthwise_shift(x, kernel, pin_residuals), dy


@_scoped
def modulated_layer_norm(x: Array, shift: Array, scale: Array,
                         pin_residuals: bool = True) -> Array:
    """LayerNorm over channels (no affine, eps 1e-6), then x (1 + scale) + shift.

    Statistics are taken in fp32 whatever the compute dtype; shift and scale are (N, C).
    The derivative is written out (a JVP rule; the gradient is its transpose) so that the
    backward pass keeps only x and the per-pixel mean and 1/std: autodiff of the fp32
    forward would keep three full-size fp32 tensors per
    call, which dominates memory traffic in bf16 training. Opt-in GPU kernels for its training
    path are in `dico_jax.models.kernels` (`kernels.layer_norm_fn`). `pin_residuals`: see
    `_tangent_fn`.
    """
    return _modulated_layer_norm(x, shift, scale, pin_residuals)


def modulated_layer_norm_and_skip(x: Array, shift: Array, scale: Array,
                                  pin_residuals: bool = True) -> tuple[Array, Array]:
    """(modulated_layer_norm(x, shift, scale), x): the layer norm of a block's residual stream
    with the stream passed along, the form in which a kernel implementation can take the
    stream's gradient into its backward pass (`kernels.layer_norm_fn(impl, skip=True)`)."""
    return modulated_layer_norm(x, shift, scale, pin_residuals), x


def _ln_stats(x: Array) -> tuple[Array, Array, Array]:
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return xf, mean, lax.rsqrt(var + LN_EPS)


def _mln_apply(x: Array, shift: Array, scale: Array) -> tuple[Array, Array, Array]:
    xf, mean, rstd = _ln_stats(x)
    y = (xf - mean) * rstd * (1.0 + scale[:, None, None, :]) + shift[:, None, None, :]
    return y.astype(x.dtype), mean, rstd


def _mln_tangent(x: Array, mean: Array, rstd: Array, scale: Array, dx: Array, dshift: Array,
                 dscale: Array) -> Array:
    """Tangent of x_hat (1 + scale) + shift, x_hat = (x - mean) rstd, at (x, shift, scale):
    d x_hat = rstd (dx - mean(dx) - x_hat mean(x_hat dx)), means over channels."""
    xhat = (x.astype(jnp.float32) - mean) * rstd
    dxf = dx.astype(jnp.float32)
    dxhat = rstd * (dxf - jnp.mean(dxf, axis=-1, keepdims=True)
                    - xhat * jnp.mean(xhat * dxf, axis=-1, keepdims=True))
    dy = (dxhat * (1.0 + scale[:, None, None, :]) + xhat * dscale[:, None, None, :]
          + dshift[:, None, None, :])
    return dy.astype(x.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _modulated_layer_norm(x: Array, shift: Array, scale: Array, pin_residuals: bool) -> Array:
    return _mln_apply(x, shift, scale)[0]


@_modulated_layer_norm.defjvp
def _mln_jvp(pin_residuals, primals, tangents):
    x, shift, scale = primals
    dx, dshift, dscale = tangents
    y, mean, rstd = _mln_apply(x, shift, scale)
    # The barrier makes the backward pass read the per-pixel statistics instead of recomputing
    # them: XLA:GPU otherwise re-derives them inside each consumer, which keeps it from fusing
    # the modulation gradient's product into its reduction over pixels (an extra full-size
    # fp32 tensor per layer norm).
    mean, rstd = lax.optimization_barrier((mean, rstd))
    dy = _tangent_fn(_mln_tangent, pin_residuals)(x, mean, rstd, scale, dx, dshift, dscale)
    return y, dy


@_scoped
def gelu(x: Array, pin_residuals: bool = True) -> Array:
    """GELU in its exact erf form, as torch.nn.functional.gelu.

    The derivative is written out (a JVP rule; the gradient is its transpose) and keeps only
    x: autodiff keeps erf(x/sqrt 2) and
    exp(-x^2/2) as well, and XLA then computes the (fused) producer of x once per residual.
    """
    return _gelu(x, pin_residuals)


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _normal_cdf(xf: Array) -> Array:
    return 0.5 * (1.0 + lax.erf(xf * _SQRT_HALF))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _gelu(x: Array, pin_residuals: bool) -> Array:
    xf = x.astype(jnp.float32)
    return (xf * _normal_cdf(xf)).astype(x.dtype)


def _gelu_tangent(x: Array, dx: Array) -> Array:
    xf = x.astype(jnp.float32)
    pdf = jnp.exp(-0.5 * jnp.square(xf)) * _INV_SQRT_2PI
    return (dx.astype(jnp.float32) * (_normal_cdf(xf) + xf * pdf)).astype(x.dtype)


@_gelu.defjvp
def _gelu_jvp(pin_residuals, primals, tangents):
    (x,), (dx,) = primals, tangents
    return _gelu(x, pin_residuals), _tangent_fn(_gelu_tangent, pin_residuals)(x, dx)


def pixel_unshuffle(x: Array, r: int = 2) -> Array:
    """PyTorch PixelUnshuffle in NHWC: (N, rh, rw, c) -> (N, h, w, c r r), channel c*r*r + i*r + j."""
    n, hh, ww, c = x.shape
    x = x.reshape(n, hh // r, r, ww // r, r, c)
    x = x.transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(n, hh // r, ww // r, c * r * r)


def pixel_shuffle(x: Array, r: int = 2) -> Array:
    """PyTorch PixelShuffle in NHWC, the inverse of `pixel_unshuffle`."""
    n, h, w, crr = x.shape
    c = crr // (r * r)
    x = x.reshape(n, h, w, c, r, r)
    x = x.transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(n, h * r, w * r, c)


@_scoped
def channel_attention(x: Array, kernel: Array, bias: Array) -> Array:
    """Compact channel attention: x * sigmoid(Linear(mean over H, W)).

    The pooled mean is taken in fp32 (a sum over H*W values) whatever the compute dtype.
    """
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    attn = checkpoint_name(jax.nn.sigmoid(dense(pooled, kernel, bias, jnp.float32)), "attention")
    return x * attn[:, None, None, :].astype(x.dtype)


# --------------------------------------------------------------------------- DiCo block
# Outputs of a block's linear maps (the 1x1 and depthwise convolutions, the attention weights)
# and its mid-block residual: enough to recompute the layer norms, GELUs and the attention
# product in the backward pass without another matmul or 3x3 stencil.
LINEAR_OUTPUTS = ("conv1", "depthwise", "attention", "conv3", "residual", "conv4", "conv5")


@_scoped
def dico_block(p: dict, x: Array, c: Array, depthwise_impl: str = "conv",
               norm: Callable | None = None, pin_residuals: bool = True) -> Array:
    """One DiCo block on x (N, H, W, D) conditioned on c (N, D); `p` holds one layer's params.

    adaLN (shift, scale, gate) x 2; conv branch 1x1 -> depthwise 3x3 -> GELU -> compact
    channel attention -> 1x1; MLP branch 1x1 (D -> rD) -> GELU -> 1x1 (rD -> D); each branch
    added to x through its gate. `norm` is the layer norm in its skip form
    (by default `modulated_layer_norm_and_skip`, or the one `kernels.layer_norm_fn` selects).
    `pin_residuals=False` where the block runs under a rematerialization policy (`_tangent_fn`).
    """
    if norm is None:
        norm = functools.partial(modulated_layer_norm_and_skip, pin_residuals=pin_residuals)
    dtype = x.dtype
    mod = dense(jax.nn.silu(c), p["adaLN_modulation"]["kernel"], p["adaLN_modulation"]["bias"],
                dtype=jnp.float32)
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)

    # The names mark what remat="linear" keeps for the backward pass (LINEAR_OUTPUTS).
    h, x = norm(x, shift1, scale1)
    h = checkpoint_name(dense(h, p["conv1"]["kernel"], None, dtype), "conv1")
    h = checkpoint_name(depthwise3x3(h, p["conv2"]["kernel"], p["conv2"]["bias"], depthwise_impl,
                                     input_bias=p["conv1"]["bias"], pin_residuals=pin_residuals),
                        "depthwise")
    h = channel_attention(gelu(h, pin_residuals), p["ca"]["kernel"], p["ca"]["bias"])
    h = checkpoint_name(dense(h, p["conv3"]["kernel"], p["conv3"]["bias"], dtype), "conv3")
    x = checkpoint_name(x + gate1[:, None, None, :].astype(dtype) * h, "residual")

    m, x = norm(x, shift2, scale2)
    m = checkpoint_name(dense(m, p["conv4"]["kernel"], p["conv4"]["bias"], dtype), "conv4")
    m = checkpoint_name(dense(gelu(m, pin_residuals), p["conv5"]["kernel"], p["conv5"]["bias"],
                              dtype), "conv5")
    return x + gate2[:, None, None, :].astype(dtype) * m
