"""Gaussian diffusion (improved-DDPM / DiT recipe) as pure JAX functions on NHWC arrays.

Schedules and every derived coefficient table are computed in float64 with numpy on the host
and cast to float32 once; the traced code only gathers from those tables.
"""
from __future__ import annotations

import math
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dico_jax.diffusion import sampling

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]

BETA_SCHEDULES = ("linear", "cosine")
_SCHEDULE_ALIASES = {"squaredcos_cap_v2": "cosine"}


def named_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """Float64 betas for `num_steps` steps: "linear" (Ho et al., rescaled to T) or "cosine"."""
    name = _SCHEDULE_ALIASES.get(name, name)
    if num_steps < 2:
        raise ValueError(f"diffusion_steps must be >= 2, got {num_steps}")
    if name == "linear":
        # Rescaled so that any T keeps the T=1000 endpoints' total noise.
        scale = 1000.0 / num_steps
        return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(
            num_steps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    raise ValueError(
        f"unknown noise_schedule {name!r}; accepted: {', '.join(map(repr, BETA_SCHEDULES))}"
        f" (or 'squaredcos_cap_v2' for 'cosine')"
    )


def betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
    """Discretizes a continuous alpha_bar(s), s in [0, 1], into float64 betas capped at max_beta."""
    s = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    bar = np.array([alpha_bar(v) for v in s], dtype=np.float64)
    return np.minimum(1.0 - bar[1:] / bar[:-1], max_beta)


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over every axis but the batch axis."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF used by the reference decoder NLL."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log-probability (nats) of data in [-1, 1] quantized to 256 levels under N(means, e^2log_scales).

    Each value owns the bin x +- 1/255; the two edge bins extend to -inf and +inf.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"x, means and log_scales must share a shape; got {x.shape}, {means.shape}, "
            f"{log_scales.shape}"
        )
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(
        x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


def _f32(a: np.ndarray) -> jax.Array:
    return jnp.asarray(np.asarray(a, dtype=np.float64).astype(np.float32))


@flax.struct.dataclass
class GaussianDiffusion:
    """A (possibly respaced) diffusion process; epsilon prediction.

    Array fields are float32 tables indexed by the kept-step index t in [0, num_timesteps).
    `timestep_map[t]` is the original step index the model is conditioned on. With
    `learn_sigma` the model output has 2C channels (eps, then variance values v in [-1, 1]
    interpolating log beta_t and the clipped log posterior variance); otherwise C channels and
    the fixed "large" variance (beta_t, with the posterior variance at t = 0).
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    log_betas: jax.Array
    fixed_variance: jax.Array
    fixed_log_variance: jax.Array
    timestep_map: jax.Array
    num_timesteps: int = flax.struct.field(pytree_node=False)
    learn_sigma: bool = flax.struct.field(pytree_node=False)

    @classmethod
    def from_betas(cls, betas, timestep_map=None, *, learn_sigma: bool = True):
        """Builds every table in float64 from `betas` (one per kept step), then casts once."""
        b = np.asarray(betas, dtype=np.float64)
        if b.ndim != 1 or b.shape[0] < 2:
            raise ValueError(f"betas must be 1-D with at least 2 steps, got shape {b.shape}")
        if not ((b > 0).all() and (b <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        n = b.shape[0]
        tmap = np.arange(n) if timestep_map is None else np.asarray(timestep_map)
        if tmap.shape != (n,):
            raise ValueError(f"timestep_map must have shape ({n},), got {tmap.shape}")
        ac = np.cumprod(1.0 - b)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value.
        post_logvar = np.log(np.append(post_var[1], post_var[1:]))
        fixed_var = np.append(post_var[1], b[1:])
        return cls(
            betas=_f32(b),
            alphas_cumprod=_f32(ac),
            alphas_cumprod_prev=_f32(ac_prev),
            sqrt_alphas_cumprod=_f32(np.sqrt(ac)),
            sqrt_one_minus_alphas_cumprod=_f32(np.sqrt(1.0 - ac)),
            sqrt_recip_alphas_cumprod=_f32(np.sqrt(1.0 / ac)),
            sqrt_recipm1_alphas_cumprod=_f32(np.sqrt(1.0 / ac - 1.0)),
            posterior_variance=_f32(post_var),
            posterior_log_variance_clipped=_f32(post_logvar),
            posterior_mean_coef1=_f32(b * np.sqrt(ac_prev) / (1.0 - ac)),
            posterior_mean_coef2=_f32((1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac)),
            log_betas=_f32(np.log(b)),
            fixed_variance=_f32(fixed_var),
            fixed_log_variance=_f32(np.log(fixed_var)),
            timestep_map=jnp.asarray(tmap, dtype=jnp.int32),
            num_timesteps=int(n),
            learn_sigma=bool(learn_sigma),
        )

    # -- forward process -------------------------------------------------------------------

    def q_sample(self, x_start, t, noise):
        """Samples x_t ~ q(x_t | x_0) with the given standard-normal noise."""
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {noise.shape} != x_start shape {x_start.shape}")
        return (_gather(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
                + _gather(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        nd = x_t.ndim
        mean = (_gather(self.posterior_mean_coef1, t, nd) * x_start
                + _gather(self.posterior_mean_coef2, t, nd) * x_t)
        var = jnp.broadcast_to(_gather(self.posterior_variance, t, nd), x_t.shape)
        logvar = jnp.broadcast_to(_gather(self.posterior_log_variance_clipped, t, nd), x_t.shape)
        return mean, var, logvar

    def predict_xstart_from_eps(self, x_t, t, eps):
        return (_gather(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
                - _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((_gather(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - pred_xstart)
                / _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))

    # -- reverse process -------------------------------------------------------------------

    def expected_output_shape(self, x_shape) -> tuple[int, ...]:
        channels = x_shape[-1] * (2 if self.learn_sigma else 1)
        return (*x_shape[:-1], channels)

    def check_model_output(self, model_output, x_t) -> None:
        """Raises ValueError (at trace time) when the model output has the wrong shape."""
        expected = self.expected_output_shape(x_t.shape)
        if tuple(model_output.shape) != expected:
            what = ("eps and variance values: 2x the input channels" if self.learn_sigma
                    else "eps: the input channels")
            raise ValueError(
                f"model output has shape {tuple(model_output.shape)}; expected {expected} "
                f"(NHWC, {what}) for x_t of shape {tuple(x_t.shape)}"
            )

    def p_mean_variance(self, model_output, x_t, t, *, clip_denoised: bool = False):
        """p(x_{t-1} | x_t) from a model output: dict(mean, variance, log_variance, pred_xstart)."""
        self.check_model_output(model_output, x_t)
        model_output = model_output.astype(jnp.float32)
        nd = x_t.ndim
        if self.learn_sigma:
            eps, var_values = jnp.split(model_output, 2, axis=-1)
            frac = (var_values + 1.0) / 2.0
            log_variance = (frac * _gather(self.log_betas, t, nd)
                            + (1.0 - frac) * _gather(self.posterior_log_variance_clipped, t, nd))
            variance = jnp.exp(log_variance)
        else:
            eps = model_output
            variance = jnp.broadcast_to(_gather(self.fixed_variance, t, nd), x_t.shape)
            log_variance = jnp.broadcast_to(_gather(self.fixed_log_variance, t, nd), x_t.shape)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance,
                "pred_xstart": pred_xstart}

    # -- losses ----------------------------------------------------------------------------

    def vb_terms_bpd(self, model_output, x_start, x_t, t):
        """Per-example VLB term in bits/dim: decoder NLL at t = 0, else KL(q || p)."""
        true_mean, _, true_logvar = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_logvar, out["mean"], out["log_variance"]))
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]))
        return jnp.where(t == 0, decoder_nll, kl) / math.log(2.0)

    def training_losses(self, model_fn: ModelFn, x_start, t, noise):
        """{"loss", "mse", "vb"}, each (N,): eps MSE plus the VLB term (no rescaling).

        `model_fn(x_t, timestep_map[t])` is called once. The VLB term sees the eps channels
        through a stop-gradient so it trains only the variance channels. Without a learned
        variance, vb is zero and loss = mse.
        """
        x_start = x_start.astype(jnp.float32)
        x_t = self.q_sample(x_start, t, noise)
        model_output = model_fn(x_t, self.timestep_map[t])
        self.check_model_output(model_output, x_t)
        model_output = model_output.astype(jnp.float32)
        if self.learn_sigma:
            eps, var_values = jnp.split(model_output, 2, axis=-1)
            frozen = jnp.concatenate([jax.lax.stop_gradient(eps), var_values], axis=-1)
            vb = self.vb_terms_bpd(frozen, x_start, x_t, t)
        else:
            eps = model_output
            vb = jnp.zeros(x_start.shape[:1], jnp.float32)
        mse = mean_flat(jnp.square(noise - eps))
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # -- samplers (see sampling.py) --------------------------------------------------------

    def p_sample_loop(self, model_fn: ModelFn, noise, rng, *, clip_denoised: bool = False):
        """Ancestral sampling over all kept steps; see `sampling.p_sample_loop`."""
        return sampling.p_sample_loop(self, model_fn, noise, rng, clip_denoised=clip_denoised)

    def ddim_sample_loop(self, model_fn: ModelFn, noise, rng, eta: float = 0.0, *,
                         clip_denoised: bool = False):
        """DDIM sampling over all kept steps; see `sampling.ddim_sample_loop`."""
        return sampling.ddim_sample_loop(self, model_fn, noise, rng, eta=eta,
                                         clip_denoised=clip_denoised)


def _gather(table, t, ndim: int):
    """table[t] shaped (N, 1, ..., 1) to broadcast against an ndim-D batch."""
    return jnp.take(table, t, axis=0).reshape((-1,) + (1,) * (ndim - 1))
