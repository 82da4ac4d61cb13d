"""The KL autoencoders of latent diffusion in Flax, NHWC: the Stable Diffusion VAE and the
VA-VAE of LightningDiT.

Both are the LDM AutoencoderKL (CompVis `ldm.modules.diffusionmodules.model`); they differ
in widths, latent channels and where attention sits. Defaults are the
`stabilityai/sd-vae-ft-ema` / `sd-vae-ft-mse` configuration; `va_vae()` builds the f16d32
VA-VAE (`hustvl/LightningDiT`, tokenizer/autoencoder.py with tokenizer/configs/vavae_f16d32.yaml).
Parameter names mirror diffusers' module names (``down_blocks.0.resnets.1`` becomes
``down_blocks_0/resnets_1``) so that `dico_jax.convert.vae` is a rename plus transposes, from
diffusers' names or from LDM's.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Latents are multiplied by this before diffusion so that they have roughly unit variance.
SD_VAE_SCALING_FACTOR = 0.18215
# diffusers clamps the posterior log-variance to this range before using it.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
GROUP_NORM_EPS = 1e-6

Dtype = Any


def _conv(features, kernel, name, dtype, precision, stride=1, padding=None):
    pad = kernel // 2 if padding is None else padding
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=jnp.float32,
        precision=precision,
        name=name,
    )


def _group_norm(x, num_groups, name, dtype):
    """GroupNorm with statistics in float32 whatever the compute dtype (bf16 statistics drift)."""
    norm = nn.GroupNorm(
        num_groups=num_groups,
        epsilon=GROUP_NORM_EPS,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        name=name,
    )
    return norm(x.astype(jnp.float32)).astype(dtype)


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D without a time embedding: two norm-SiLU-conv steps plus a skip."""

    out_channels: int
    norm_num_groups: int
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        h = _group_norm(x, self.norm_num_groups, "norm1", self.dtype)
        h = _conv(self.out_channels, 3, "conv1", self.dtype, self.precision)(nn.silu(h))
        h = _group_norm(h, self.norm_num_groups, "norm2", self.dtype)
        h = _conv(self.out_channels, 3, "conv2", self.dtype, self.precision)(nn.silu(h))
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "conv_shortcut", self.dtype, self.precision)(x)
        return x + h


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all pixels with a residual (the VAE mid-block attention)."""

    norm_num_groups: int
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        n, height, width, channels = x.shape
        h = _group_norm(x, self.norm_num_groups, "group_norm", self.dtype)
        h = h.reshape(n, height * width, channels)

        def dense(name):
            return nn.Dense(
                channels, dtype=self.dtype, param_dtype=jnp.float32, precision=self.precision, name=name
            )

        q, k, v = dense("to_q")(h), dense("to_k")(h), dense("to_v")(h)
        logits = jnp.einsum("nqc,nkc->nqk", q, k, precision=self.precision).astype(jnp.float32)
        weights = jax.nn.softmax(logits / jnp.sqrt(jnp.float32(channels)), axis=-1)
        h = jnp.einsum("nqk,nkc->nqc", weights.astype(self.dtype), v, precision=self.precision)
        h = dense("to_out")(h)
        return x + h.reshape(n, height, width, channels)


class Downsample(nn.Module):
    """Pad right/bottom by one, then a stride-2 3x3 conv without padding (as the SD encoder does)."""

    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(x.shape[-1], 3, "conv", self.dtype, self.precision, stride=2, padding=0)(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(x.shape[-1], 3, "conv", self.dtype, self.precision)(x)


class MidBlock(nn.Module):
    """Resnet, attention, resnet at the lowest resolution."""

    norm_num_groups: int
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        kw = dict(norm_num_groups=self.norm_num_groups, dtype=self.dtype, precision=self.precision)
        x = ResnetBlock(channels, name="resnets_0", **kw)(x)
        x = SpatialSelfAttention(name="attentions_0", **kw)(x)
        return ResnetBlock(channels, name="resnets_1", **kw)(x)


class ResnetStage(nn.Module):
    """Resnets at one resolution, each followed by self-attention when ``attention`` (LDM's
    attn_resolutions), then an optional 2x resample ("down" or "up")."""

    out_channels: int
    num_layers: int
    resample: str | None
    norm_num_groups: int
    attention: bool = False
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        kw = dict(norm_num_groups=self.norm_num_groups, dtype=self.dtype, precision=self.precision)
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, name=f"resnets_{j}", **kw)(x)
            if self.attention:
                x = SpatialSelfAttention(name=f"attentions_{j}", **kw)(x)
        if self.resample == "down":
            x = Downsample(self.dtype, self.precision, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample(self.dtype, self.precision, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Images (N, H, W, in) -> moments (N, H/f, W/f, 2*latent) before quant_conv."""

    latent_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int
    norm_num_groups: int
    attention_levels: Sequence[int] = ()
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        kw = dict(norm_num_groups=self.norm_num_groups, dtype=self.dtype, precision=self.precision)
        x = _conv(self.block_out_channels[0], 3, "conv_in", self.dtype, self.precision)(x)
        for i, channels in enumerate(self.block_out_channels):
            last = i == len(self.block_out_channels) - 1
            x = ResnetStage(channels, self.layers_per_block, None if last else "down",
                            attention=i in self.attention_levels, name=f"down_blocks_{i}", **kw)(x)
        x = MidBlock(name="mid_block", **kw)(x)
        x = _group_norm(x, self.norm_num_groups, "conv_norm_out", self.dtype)
        return _conv(2 * self.latent_channels, 3, "conv_out", self.dtype, self.precision)(nn.silu(x))


class Decoder(nn.Module):
    """Latents (N, h, w, latent) after post_quant_conv -> images (N, h*f, w*f, out)."""

    out_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int
    norm_num_groups: int
    attention_levels: Sequence[int] = ()
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, z):
        kw = dict(norm_num_groups=self.norm_num_groups, dtype=self.dtype, precision=self.precision)
        widths = tuple(reversed(self.block_out_channels))
        x = _conv(widths[0], 3, "conv_in", self.dtype, self.precision)(z)
        x = MidBlock(name="mid_block", **kw)(x)
        for i, channels in enumerate(widths):
            last = i == len(widths) - 1
            level = len(widths) - 1 - i  # up block i works at the resolution of encoder level
            # The decoder has one more resnet per block than the encoder.
            x = ResnetStage(channels, self.layers_per_block + 1, None if last else "up",
                            attention=level in self.attention_levels, name=f"up_blocks_{i}", **kw)(x)
        x = _group_norm(x, self.norm_num_groups, "conv_norm_out", self.dtype)
        return _conv(self.out_channels, 3, "conv_out", self.dtype, self.precision)(nn.silu(x))


class AutoencoderKL(nn.Module):
    """The KL autoencoder of Stable Diffusion; images in [-1, 1], NHWC.

    ``attention_levels`` are the encoder levels (indices into ``block_out_channels``; the
    decoder's matching up blocks too) whose resnets are each followed by self-attention:
    none in the SD VAE, the 16x16 level of a 256x256 input in the VA-VAE.
    ``dtype`` is the compute dtype (params stay float32, group norms and softmax run in float32);
    ``precision`` is passed to every conv and matmul (use ``jax.lax.Precision.HIGHEST`` for
    float32-exact results on TPU). Outputs of ``encode`` and ``decode`` are float32.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    attention_levels: Sequence[int] = ()
    scaling_factor: float = SD_VAE_SCALING_FACTOR
    dtype: Dtype = jnp.float32
    precision: Any = None

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self):
        arch = dict(
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            attention_levels=tuple(self.attention_levels),
            dtype=self.dtype,
            precision=self.precision,
        )
        self.encoder = Encoder(latent_channels=self.latent_channels, **arch)
        self.decoder = Decoder(out_channels=self.out_channels, **arch)
        self.quant_conv = _conv(2 * self.latent_channels, 1, None, self.dtype, self.precision)
        self.post_quant_conv = _conv(self.latent_channels, 1, None, self.dtype, self.precision)

    def encode(self, images):
        """Images (N, H, W, in) -> (mean, logvar), each (N, H/f, W/f, latent) float32."""
        self._check_input(images, self.in_channels, self.downsample_factor, "images")
        moments = self.quant_conv(self.encoder(images.astype(self.dtype))).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, latents):
        """Unscaled latents (N, h, w, latent) -> images (N, h*f, w*f, out) float32, about [-1, 1]."""
        self._check_input(latents, self.latent_channels, 1, "latents")
        return self.decoder(self.post_quant_conv(latents.astype(self.dtype))).astype(jnp.float32)

    def __call__(self, images):
        """Reconstruction from the posterior mean; used to create all parameters at init."""
        mean, _ = self.encode(images)
        return self.decode(mean)

    @staticmethod
    def _check_input(x, channels, multiple, name):
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"{name} must be (N, H, W, {channels}) NHWC, got shape {tuple(x.shape)}")
        if x.shape[1] % multiple or x.shape[2] % multiple:
            raise ValueError(f"{name} height and width must be multiples of {multiple}, got {tuple(x.shape)}")


# The VA-VAE f16d32 (LightningDiT tokenizer/autoencoder.py, tokenizer/configs/vavae_f16d32.yaml
# ddconfig): ch 128, ch_mult (1, 1, 2, 2, 4), num_res_blocks 2, attn_resolutions [16] at
# resolution 256 (the fifth level), z_channels = embed_dim = 32, double_z. Its latents are
# normalised per channel with dataset statistics instead of one scale (scaling_factor 1).
VA_VAE_ARCHITECTURE = dict(
    latent_channels=32,
    block_out_channels=(128, 128, 256, 256, 512),
    layers_per_block=2,
    norm_num_groups=32,
    attention_levels=(4,),
    scaling_factor=1.0,
)
# The kinds of VAE a latent dataset or a config names (`config.vae`, the manifest's vae_kind).
VAE_KINDS = ("sd-vae", "va-vae")


def va_vae(**overrides) -> AutoencoderKL:
    """The f16d32 VA-VAE; ``overrides`` change fields (small widths for tests, dtype...)."""
    return AutoencoderKL(**{**VA_VAE_ARCHITECTURE, **overrides})


def vae_for_kind(kind: str, **overrides) -> AutoencoderKL:
    """The AutoencoderKL of a VAE kind ("sd-vae" or "va-vae")."""
    if kind == "va-vae":
        return va_vae(**overrides)
    if kind == "sd-vae":
        return AutoencoderKL(**overrides)
    raise ValueError(f"unknown VAE kind {kind!r}; valid: {', '.join(VAE_KINDS)}")


def sample_latents(mean, logvar, rng, scale_factor: float = SD_VAE_SCALING_FACTOR):
    """Draw from the diagonal Gaussian posterior and scale: (mean + std * eps) * scale_factor."""
    mean = jnp.asarray(mean, jnp.float32)
    noise = jax.random.normal(rng, mean.shape, jnp.float32)
    return (mean + jnp.exp(0.5 * jnp.asarray(logvar, jnp.float32)) * noise) * scale_factor
