"""Flow matching (stochastic interpolants) beside the DDPM objective, as pure JAX functions.

Conventions (those of SiT, Ma et al. 2024, arXiv 2401.08740):

* Time t runs over [0, 1] with t = 0 pure noise and t = 1 data. The interpolant is
  x_t = alpha_t x_data + sigma_t eps with eps ~ N(0, I):
  "linear": alpha_t = t, sigma_t = 1 - t;  "gvp": alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2).
* Samplers integrate from t = 0 (noise) to t = 1 (data).
* Prediction types: "velocity" regresses d/dt x_t = alpha'_t x_data + sigma'_t eps; "noise"
  regresses eps; "score" regresses grad log p_t(x_t) = -eps / sigma_t (conditional on x_data).
  The network outputs `in_channels` channels (no learned variance). Samplers always work with
  the velocity: `to_velocity` turns any prediction into it through the identities
  x_data = (x - sigma eps) / alpha and v = alpha' x_data + sigma' eps. The way back
  (`noise_from_velocity`, and `score_from_velocity` for the SDE sampler) divides by
  D_t = sigma_t alpha'_t - alpha_t sigma'_t, which is 1 (linear) or pi/2 (GVP) for every t;
  only the score itself is singular, at t = 1 where sigma_t = 0.
* Noise and score predictions are singular at t = 0 (alpha = 0); as SiT does, they train on
  [train_eps, 1 - train_eps] and sample from t = sample_eps, with both defaulting to 1e-3
  (0 for velocity prediction, which is regular on all of [0, 1]).

How continuous time reaches the timestep embedder: the network is called as
model_fn(x_t, model_time(t)) with model_time(t) = 1000 (1 - t). Two reasons. (1) DiCo's
embedder (DiT's) takes sinusoidal features cos/sin(s f_k) with f_k = 10000^(-k/128), k < 128,
designed for DDPM step indices s in [0, 1000): over that range about 105 of the 128
frequencies turn by more than half a radian, whereas over s in [0, 1] (SiT feeds t directly)
only about 10 do, leaving the rest nearly constant for the MLP to amplify. (2) 1000 (1 - t)
grows with the noise level as the DDPM step index does (999 is the noisiest DDPM step, 1000 is
flow's pure noise), so both objectives present the same kind of conditioning to the same
network and a DDPM checkpoint is a sensible initialisation for flow fine-tuning.

Timestep sampling: "uniform" draws t ~ U(0, 1); "logit_normal" draws t = sigmoid(m + s z),
z ~ N(0, 1), with m = `logit_mean` and s = `logit_std` given for this t (data at 1): SD3
(Esser et al. 2024), whose time has noise at 1, uses m there, which is -m here. Then the
resolution shift of SD3 / LightningDiT is applied, with `shift` in SD3's meaning: on the noise
time tau = 1 - t, tau' = shift tau / (1 + (shift - 1) tau), so shift > 1 moves time towards
noise (SD3 uses 3 at 1024 px). In this module's t that is t' = t / (shift - (shift - 1) t).
LightningDiT, whose time has data at 1 like SiT's, writes the same map with its own parameter
1/shift (its 0.3 is shift = 1/0.3 here). The sampler time grid takes the same shift
(`time_grid`) unless `sample_shift` gives its own: LightningDiT shifts only its sampler's
grid (sample: timestep_shift), so its recipe is shift = 1, sample_shift = 1/0.3. Finally,
training times are mapped affinely onto [train_eps, 1 - train_eps].

LightningDiT's velocity-direction term: with `cosine_weight` w > 0 (velocity prediction only)
the loss adds w (1 - cos(output, target)), the cosine taken over the channels at each
position and averaged over positions (transport/transport.py, use_cosine_loss; it adds the
term with weight 1).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dico_jax.diffusion.guidance import guided_model_fn

PATHS = ("linear", "gvp")
PREDICTIONS = ("velocity", "noise", "score")
TIME_SAMPLINGS = ("uniform", "logit_normal")
DIFFUSION_FORMS = ("sigma", "SBDM", "constant", "linear", "decreasing", "increasing-decreasing")
MODEL_TIME_SCALE = 1000.0
DEFAULT_EPS = 1e-3  # SiT's train/sample eps for noise and score predictions

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check(name: str, value, accepted) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(map(repr, accepted))}")


def path_coefficients(path: str, t):
    """(alpha_t, alpha'_t, sigma_t, sigma'_t) of x_t = alpha_t x_data + sigma_t eps."""
    _check("path", path, PATHS)
    t = jnp.asarray(t, jnp.float32)
    if path == "linear":
        one = jnp.ones_like(t)
        return t, one, 1.0 - t, -one
    half_pi = 0.5 * math.pi
    c, s = jnp.cos(half_pi * t), jnp.sin(half_pi * t)
    return s, half_pi * c, c, -half_pi * s


def model_time(t):
    """The timestep the network's embedder sees for flow time t: 1000 (1 - t) (see module doc)."""
    return MODEL_TIME_SCALE * (1.0 - jnp.asarray(t, jnp.float32))


def shift_time(t, shift: float):
    """SD3's resolution shift in this module's time (data at 1); shift > 1 moves t towards noise.

    Fixes t = 0 and t = 1; shift = 1 is the identity.
    """
    t = jnp.asarray(t, jnp.float32)
    if shift == 1.0:
        return t
    return t / (shift - (shift - 1.0) * t)


def cosine_similarity(a, b, eps: float = 1e-8):
    """Cosine of the angle between a and b along the last (channel) axis, as
    torch.nn.functional.cosine_similarity computes it (each norm floored at eps). The floor is
    taken under the square root so that the gradient stays finite at a zero vector (the
    zero-initialised output layer's first outputs)."""
    na = jnp.sqrt(jnp.maximum(jnp.sum(a * a, axis=-1), eps * eps))
    nb = jnp.sqrt(jnp.maximum(jnp.sum(b * b, axis=-1), eps * eps))
    return jnp.sum(a * b, axis=-1) / (na * nb)


def _bcast(a, ndim: int):
    """A per-example (N,) coefficient shaped (N, 1, ..., 1); scalars pass through."""
    a = jnp.asarray(a, jnp.float32)
    return a.reshape(a.shape + (1,) * (ndim - a.ndim)) if a.ndim else a


def _mean_flat(x):
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


@dataclasses.dataclass(frozen=True)
class FlowMatching:
    """A flow-matching objective: path, prediction type, training-time distribution, eps.

    Hashable, so it can be a static argument of jitted functions. `train_eps`/`sample_eps` of
    None take SiT's defaults: 0 for velocity prediction, 1e-3 for noise and score.
    """

    path: str = "linear"
    prediction: str = "velocity"
    time_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    train_eps: float | None = None
    sample_eps: float | None = None
    sample_shift: float | None = None  # the sampler grid's shift; None: `shift`
    cosine_weight: float = 0.0

    def __post_init__(self):
        _check("path", self.path, PATHS)
        _check("prediction", self.prediction, PREDICTIONS)
        _check("time_sampling", self.time_sampling, TIME_SAMPLINGS)
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.sample_shift is not None and not self.sample_shift > 0:
            raise ValueError(f"sample_shift must be > 0, got {self.sample_shift}")
        if self.cosine_weight < 0 or (self.cosine_weight and self.prediction != "velocity"):
            raise ValueError(f"cosine_weight must be >= 0 and needs velocity prediction, got "
                             f"{self.cosine_weight} with {self.prediction!r}")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")
        default = 0.0 if self.prediction == "velocity" else DEFAULT_EPS
        for name in ("train_eps", "sample_eps"):
            value = getattr(self, name)
            value = default if value is None else float(value)
            if not 0.0 <= value < 0.5:
                raise ValueError(f"{name} must lie in [0, 0.5), got {value}")
            object.__setattr__(self, name, value)

    @property
    def sampling_shift(self) -> float:
        """The shift of the samplers' time grid."""
        return self.shift if self.sample_shift is None else float(self.sample_shift)

    # -- the path ---------------------------------------------------------------------------

    def coefficients(self, t, ndim: int = 1):
        """(alpha, alpha', sigma, sigma') at t, each shaped to broadcast against ndim-D arrays."""
        return tuple(_bcast(c, ndim) for c in path_coefficients(self.path, t))

    def interpolate(self, x_data, noise, t):
        """x_t = alpha_t x_data + sigma_t noise."""
        a, _, s, _ = self.coefficients(t, x_data.ndim)
        return a * x_data + s * noise

    def velocity_target(self, x_data, noise, t):
        """d/dt x_t = alpha'_t x_data + sigma'_t noise."""
        _, da, _, ds = self.coefficients(t, x_data.ndim)
        return da * x_data + ds * noise

    def target(self, x_data, noise, t):
        """What the network regresses: the velocity, the noise, or the score -noise / sigma_t."""
        if self.prediction == "velocity":
            return self.velocity_target(x_data, noise, t)
        if self.prediction == "noise":
            return noise
        _, _, s, _ = self.coefficients(t, x_data.ndim)
        return -noise / s

    # -- training ---------------------------------------------------------------------------

    def sample_time(self, key, n: int):
        """n training times: uniform or logit-normal, then shifted, then put on [eps, 1 - eps]."""
        if self.time_sampling == "uniform":
            t = jax.random.uniform(key, (n,), jnp.float32)
        else:
            z = jax.random.normal(key, (n,), jnp.float32)
            t = jax.nn.sigmoid(self.logit_mean + self.logit_std * z)
        t = shift_time(t, self.shift)
        return self.train_eps + (1.0 - 2.0 * self.train_eps) * t

    def training_losses(self, model_fn: ModelFn, x_start, t, noise):
        """{"loss", "mse"} (and "cos" with `cosine_weight`), each (N,), from one call
        model_fn(x_t, model_time(t)).

        "mse" is the mean squared error between the output and `target`. "loss" equals it for
        velocity and noise prediction; for score prediction it is SiT's unweighted score loss,
        mean (sigma_t output + noise)^2 = sigma_t^2 mse, which stays bounded as sigma_t -> 0.
        With `cosine_weight` w, "cos" is 1 - cos(output, target) over the channels, averaged
        over positions, and "loss" is mse + w cos.
        """
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {noise.shape} != x_start shape {x_start.shape}")
        x_start = x_start.astype(jnp.float32)
        noise = noise.astype(jnp.float32)
        x_t = self.interpolate(x_start, noise, t)
        out = model_fn(x_t, model_time(t))
        if tuple(out.shape) != tuple(x_t.shape):
            raise ValueError(
                f"model output has shape {tuple(out.shape)}; expected {tuple(x_t.shape)} "
                f"(flow matching predicts the input channels, no learned variance)"
            )
        out = out.astype(jnp.float32)
        target = self.target(x_start, noise, t)
        mse = _mean_flat(jnp.square(out - target))
        if self.prediction == "score":
            _, _, s, _ = self.coefficients(t, x_t.ndim)
            loss = _mean_flat(jnp.square(s * out + noise))
        else:
            loss = mse
        if not self.cosine_weight:
            return {"loss": loss, "mse": mse}
        cos = _mean_flat(1.0 - cosine_similarity(out, target))
        return {"loss": loss + self.cosine_weight * cos, "mse": mse, "cos": cos}

    # -- conversions for the samplers -------------------------------------------------------

    def to_velocity(self, model_output, x, t):
        """The velocity field implied by a model output of this prediction type at (x, t)."""
        out = model_output.astype(jnp.float32)
        if self.prediction == "velocity":
            return out
        a, da, s, ds = self.coefficients(t, x.ndim)
        eps = out if self.prediction == "noise" else -s * out
        x_data = (x - s * eps) / a
        return da * x_data + ds * eps

    def noise_from_velocity(self, velocity, x, t):
        """eps = (alpha' x - alpha v) / D_t with D_t = sigma alpha' - alpha sigma' (never 0)."""
        a, da, s, ds = self.coefficients(t, x.ndim)
        return (da * x - a * velocity) / (s * da - a * ds)

    def score_from_velocity(self, velocity, x, t):
        """grad log p_t(x) = -eps / sigma_t, eps from `noise_from_velocity` (singular at t = 1)."""
        _, _, s, _ = self.coefficients(t, x.ndim)
        return -self.noise_from_velocity(velocity, x, t) / s

    def velocity_fn(self, model_fn: ModelFn) -> VelocityFn:
        """v(x, t) for flow time t (shape (N,)) from model_fn(x, model_time) of any prediction."""
        return lambda x, t: self.to_velocity(model_fn(x, model_time(t)), x, t)

    def guided_velocity_fn(self, apply_fn, y, cfg_scale: float, *, null_label: int,
                           guidance_channels: int | str | None = None,
                           interval: tuple[float, float] | None = None) -> VelocityFn:
        """v(x, t) from `apply_fn(x, model_time, y)` with classifier-free guidance.

        `guidance_channels=None` (or "all") is standard guidance on every channel; 3 is the
        official DiCo/DiT form (only the first 3 channels). `interval=(low, high)` is in flow
        time: guidance applies only for low <= t <= high, elsewhere the conditional output is
        used as is. Guiding the model output equals guiding the velocity, since `to_velocity`
        is affine in the output with coefficients that do not depend on the label.
        """
        in_model_time = lambda x, t, labels: apply_fn(x, model_time(t), labels)  # noqa: E731
        guided = guided_model_fn(in_model_time, y, cfg_scale, null_label=null_label,
                                 guidance_channels=guidance_channels, interval=interval)
        return lambda x, t: self.to_velocity(guided(x, t), x, t)

    # -- sampling helpers -------------------------------------------------------------------

    def diffusion_coefficient(self, t, form: str = "sigma", norm: float = 1.0):
        """SiT's SDE diffusion w_t: dx = [v + w_t score] dt + sqrt(2 w_t) dW keeps p_t's marginals.

        "SBDM" (w = alpha'/alpha sigma^2 - sigma sigma', the score-based-diffusion coefficient,
        singular at t = 0), "sigma" (norm sigma_t, SiT's sampling default), "constant" (norm),
        "linear" (norm (1 - t)), "decreasing" ((norm cos(pi t) + 1)^2 / 4),
        "increasing-decreasing" (norm sin^2(pi t)). All but "decreasing" scale with `norm`.
        """
        _check("diffusion form", form, DIFFUSION_FORMS)
        t = jnp.asarray(t, jnp.float32)
        a, da, s, ds = path_coefficients(self.path, t)
        if form == "SBDM":
            return norm * (da / a * s * s - s * ds)
        if form == "sigma":
            return norm * s
        if form == "constant":
            return norm * jnp.ones_like(t)
        if form == "linear":
            return norm * (1.0 - t)
        if form == "decreasing":
            return 0.25 * jnp.square(norm * jnp.cos(math.pi * t) + 1.0)
        return norm * jnp.square(jnp.sin(math.pi * t))

    def sde_start(self, form: str = "sigma") -> float:
        """First SDE time: sample_eps for noise/score prediction and for "SBDM", as in SiT."""
        if form == "SBDM" or self.prediction != "velocity":
            if self.sample_eps == 0.0:
                raise ValueError(
                    "the SBDM diffusion is infinite at t = 0; set sample_eps > 0 (SiT uses 1e-3)")
            return self.sample_eps
        return 0.0

    def ode_interval(self) -> tuple[float, float]:
        """(t0, t1) of the probability-flow ODE: [0, 1] for velocity, [eps, 1 - eps] otherwise."""
        if self.prediction == "velocity":
            return 0.0, 1.0
        return self.sample_eps, 1.0 - self.sample_eps

    def ddpm_step_interval(self, low: float, high: float, alphas_cumprod) -> tuple[int, int]:
        """The DDPM steps k (0 = least noisy) whose noise level lies in flow times [low, high].

        Noise levels are matched by signal-to-noise ratio: a DDPM step k with
        abar_k / (1 - abar_k) between alpha^2 / sigma^2 at `low` and at `high` is inside. Since
        the SNR falls with k the result is an inclusive range (k_first, k_last), for the
        `interval` of `guided_model_fn` around a DDPM/DDIM sampler, whose model_fn sees the
        original step index. `alphas_cumprod` is the unrespaced schedule (one entry per
        original step). An empty range comes back as (1, 0).
        """
        abar = np.asarray(alphas_cumprod, dtype=np.float64)
        snr_steps = abar / (1.0 - abar)

        def snr(t):
            t = min(max(float(t), 0.0), 1.0)
            if self.path == "linear":
                a, s = t, 1.0 - t
            else:
                a, s = math.sin(0.5 * math.pi * t), math.cos(0.5 * math.pi * t)
            return math.inf if t == 1.0 else (a * a) / (s * s)

        inside = np.nonzero((snr_steps >= snr(low)) & (snr_steps <= snr(high)))[0]
        if inside.size == 0:
            return 1, 0
        return int(inside[0]), int(inside[-1])
