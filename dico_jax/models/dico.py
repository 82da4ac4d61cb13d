"""The DiCo network as Flax Linen modules (NHWC), parameter for parameter the official model.

Each resolution level keeps its blocks' parameters stacked along a leading depth axis and
runs them with `lax.scan`, so compile time does not grow with depth. The parameter tree
mirrors the official PyTorch names (see `dico_jax.convert`).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from dico_jax import sharding
from dico_jax.models import kernels
from dico_jax.models import layers as L

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "linear": jax.checkpoint_policies.save_only_these_names(*L.LINEAR_OUTPUTS),
}


class _Params(nn.Module):
    """A named group of raw parameters (gives the tree its official-looking nesting)."""

    spec: tuple  # ((name, shape, init), ...)

    @nn.compact
    def __call__(self):
        return {name: self.param(name, init, shape) for name, shape, init in self.spec}


def _linear(name: str, d_in: int, d_out: int, kernel_init, bias: bool = True,
            depth: Optional[int] = None) -> _Params:
    k_shape, b_shape, b_init = (d_in, d_out), (d_out,), L.zeros
    if depth is not None:
        k_shape, b_shape = (depth, *k_shape), (depth, *b_shape)
        kernel_init, b_init = L.stacked(kernel_init), L.stacked(b_init)
    spec = (("kernel", k_shape, kernel_init),) + ((("bias", b_shape, b_init),) if bias else ())
    return _Params(spec, name=name)


def _conv3x3(name: str, c_in: int, c_out: int, kernel_init=None, bias: bool = True) -> _Params:
    kernel_init = kernel_init or L.xavier_uniform(c_in * 9, c_out * 9)
    spec = (("kernel", (3, 3, c_in, c_out), kernel_init),)
    if bias:
        spec += (("bias", (c_out,), L.zeros),)
    return _Params(spec, name=name)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features (256) -> Linear -> SiLU -> Linear, both weights N(0, 0.02)."""

    width: int
    frequency_dim: int = 256

    @nn.compact
    def __call__(self, t):
        p0 = _linear("mlp_0", self.frequency_dim, self.width, L.normal(0.02))()
        p2 = _linear("mlp_2", self.width, self.width, L.normal(0.02))()
        h = L.dense(L.timestep_embedding(t, self.frequency_dim), p0["kernel"], p0["bias"])
        return L.dense(jax.nn.silu(h), p2["kernel"], p2["bias"])


class BlockStack(nn.Module):
    """`depth` DiCo blocks at one width, parameters stacked on a leading axis."""

    width: int
    depth: int
    mlp_ratio: float
    remat: str = "none"
    scan: bool = True
    depthwise_impl: str = "conv"
    norm_impl: str = "xla"

    @nn.compact
    def __call__(self, x, c):
        d, n = self.width, self.depth
        hidden = int(self.mlp_ratio * d)
        xu = L.xavier_uniform
        params = {
            "conv1": _linear("conv1", d, d, xu(d, d), depth=n)(),
            "conv2": _Params((("kernel", (n, 3, 3, d), L.stacked(xu(9, 9 * d))),
                              ("bias", (n, d), L.zeros)), name="conv2")(),
            "conv3": _linear("conv3", d, d, xu(d, d), depth=n)(),
            "ca": _linear("ca", d, d, xu(d, d), depth=n)(),
            "conv4": _linear("conv4", d, hidden, xu(d, hidden), depth=n)(),
            "conv5": _linear("conv5", hidden, d, xu(hidden, d), depth=n)(),
            "adaLN_modulation": _linear("adaLN_modulation", d, 6 * d, L.zeros, depth=n)(),
        }
        if n == 0:
            return x

        x, c = sharding.constrain_batch(x), sharding.constrain_batch(c)
        # Under a rematerialization policy the policy decides what the backward pass keeps.
        pin = self.remat == "none"
        norm = kernels.layer_norm_fn(self.norm_impl, skip=True, pin_residuals=pin)

        def block(x, p):
            return sharding.constrain_batch(L.dico_block(p, x, c, self.depthwise_impl, norm,
                                                         pin_residuals=pin))

        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        if self.remat != "none":
            block = jax.checkpoint(block, policy=REMAT_POLICIES[self.remat])

        if self.scan:
            x, _ = jax.lax.scan(lambda h, p: (block(h, p), None), x, params)
        else:
            # One split per stacked leaf: its gradient is one concatenation, where per-layer
            # indexing would pad every layer's gradient to the whole stack and add them up.
            leaves, treedef = jax.tree_util.tree_flatten(params)
            per_leaf = [[jnp.squeeze(s, 0) for s in jax.lax.split(a, (1,) * n, axis=0)]
                        for a in leaves]
            for i in range(n):
                x = block(x, treedef.unflatten([layers[i] for layers in per_leaf]))
        return x


def depthwise_for(platform: str) -> str:
    """The depthwise 3x3 formulation `depthwise_impl="auto"` runs on a platform ("cpu", "gpu",
    "tpu"): nine shifted multiply-adds on CPU, where XLA fuses them into one loop; the grouped
    convolution elsewhere, which the accelerators' convolution emitters handle."""
    return "shift" if platform == "cpu" else "conv"


class DiCo(nn.Module):
    """Diffusion ConvNet: three-level U-shaped stack of DiCo blocks with adaLN conditioning.

    Call with x (N, H, W, in_channels), t (N,), y (N,) (null label = num_classes); returns
    (N, H, W, out_channels) in float32. With `second_time` the network takes a second
    timestep h (N,) (MeanFlow's t - r, arXiv 2505.13447), embedded by its own
    `h_embedder_{1,2,3}` and added to the conditioning, as the first; without it the
    parameters are the official ones.
    """

    hidden_size: int = 416
    depths: Sequence[int] = (9, 9, 10, 9, 9)
    mlp_ratio: float = 2.0
    in_channels: int = 4
    out_channels: int = 8
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    dtype: Any = jnp.float32
    remat: str = "none"
    scan: bool = True
    depthwise_impl: str = "auto"
    norm_impl: str = "xla"
    second_time: bool = False

    @property
    def null_label(self) -> int:
        return self.num_classes

    def _depthwise_impl(self) -> str:
        if self.depthwise_impl != "auto":
            return self.depthwise_impl
        return depthwise_for(jax.default_backend())

    @nn.compact
    def __call__(self, x, t, y, *, h=None, train: bool = False, force_drop=None):
        C = self.hidden_size
        if len(self.depths) != 5:
            raise ValueError(f"depths must have 5 entries (enc1, enc2, mid, dec2, dec1), got {self.depths}")
        kernels.layer_norm_fn(self.norm_impl)  # refuses an unknown name before any work
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"x must be (N, H, W, {self.in_channels}), got {x.shape}")
        if x.shape[1] % 4 or x.shape[2] % 4:
            raise ValueError(f"H and W must be divisible by 4, got {x.shape[1:3]}")
        has_null = self.class_dropout_prob > 0
        rows = self.num_classes + int(has_null)

        # Label dropout (training) and forced null labels (guidance).
        y = y.astype(jnp.int32)
        if force_drop is not None or (train and has_null):
            if not has_null:
                raise ValueError("force_drop needs a null-label row: class_dropout_prob must be > 0")
            drop = jnp.zeros(y.shape, bool) if force_drop is None else jnp.asarray(force_drop, bool)
            if train:
                u = jax.random.uniform(self.make_rng("dropout"), y.shape)
                drop = drop | (u < self.class_dropout_prob)
            y = jnp.where(drop, self.num_classes, y)

        tables = _Params(tuple((f"embedding_table_{i}", (rows, C * 2 ** i), L.normal(0.02))
                               for i in range(3)), name="y_embedder")()
        c1, c2, c3 = (TimestepEmbedder(C * 2 ** i, name=f"t_embedder_{i + 1}")(t)
                      + jnp.take(tables[f"embedding_table_{i}"], y, axis=0) for i in range(3))
        if self.second_time != (h is not None):
            raise ValueError("a second timestep h is given exactly when the model has "
                             f"second_time=True (it has {self.second_time})")
        if self.second_time:
            c1, c2, c3 = (c + TimestepEmbedder(C * 2 ** i, name=f"h_embedder_{i + 1}")(h)
                          for i, c in enumerate((c1, c2, c3)))

        dtype, impl = self.dtype, self._depthwise_impl()
        level = lambda name, width, depth: BlockStack(  # noqa: E731
            width, depth, self.mlp_ratio, self.remat, self.scan, impl, self.norm_impl, name=name)

        # Patch embed: xavier-uniform on the (C, in*9) view, as for a Linear.
        pe = _conv3x3("x_embedder", self.in_channels, C,
                      L.xavier_uniform(self.in_channels * 9, C))()
        h = L.conv3x3(x, pe["kernel"], pe["bias"], dtype)

        enc1 = level("encoder_level_1", C, self.depths[0])(h, c1)
        h = L.pixel_unshuffle(L.conv3x3(enc1, _conv3x3("down1_2", C, C // 2, bias=False)()["kernel"],
                                        dtype=dtype))
        enc2 = level("encoder_level_2", 2 * C, self.depths[1])(h, c2)
        h = L.pixel_unshuffle(L.conv3x3(enc2, _conv3x3("down2_3", 2 * C, C, bias=False)()["kernel"],
                                        dtype=dtype))
        h = level("latent", 4 * C, self.depths[2])(h, c3)

        h = L.pixel_shuffle(L.conv3x3(h, _conv3x3("up3_2", 4 * C, 8 * C, bias=False)()["kernel"],
                                      dtype=dtype))
        r2 = _linear("reduce_chan_level2", 4 * C, 2 * C, L.xavier_uniform(4 * C, 2 * C))()
        h = L.dense(jnp.concatenate([h, enc2], axis=-1), r2["kernel"], r2["bias"], dtype)
        h = level("decoder_level_2", 2 * C, self.depths[3])(h, c2)

        h = L.pixel_shuffle(L.conv3x3(h, _conv3x3("up2_1", 2 * C, 4 * C, bias=False)()["kernel"],
                                      dtype=dtype))
        r1 = _linear("reduce_chan_level1", 2 * C, 2 * C, L.xavier_uniform(2 * C, 2 * C))()
        h = L.dense(jnp.concatenate([h, enc1], axis=-1), r1["kernel"], r1["bias"], dtype)
        h = level("decoder_level_1", 2 * C, self.depths[4])(h, c2)

        return FinalLayer(self.out_channels, self.norm_impl, name="final_layer")(h, c2, dtype)


class FinalLayer(nn.Module):
    """LayerNorm with adaLN (shift, scale) on c, then a 3x3 conv to out_channels; zero-init."""

    out_channels: int
    norm_impl: str = "xla"

    @nn.compact
    def __call__(self, x, c, dtype):
        d = x.shape[-1]
        ada = _linear("adaLN_modulation", d, 2 * d, L.zeros)()
        out = _conv3x3("out_proj", d, self.out_channels, L.zeros)()
        shift, scale = jnp.split(L.dense(jax.nn.silu(c), ada["kernel"], ada["bias"]), 2, axis=-1)
        h = kernels.layer_norm_fn(self.norm_impl)(x, shift, scale)
        return L.conv3x3(h, out["kernel"], out["bias"], dtype).astype(jnp.float32)
