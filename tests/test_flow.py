"""Flow matching: interpolants, targets, losses, samplers and guidance against closed forms.

Reference values are written here from the formulas (SiT, arXiv 2401.08740; SD3, arXiv
2403.03206), not taken from the module under test.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg, stats

from dico_jax.diffusion import (
    FlowMatching,
    create_diffusion,
    euler_maruyama_sample,
    euler_sample,
    guided_model_fn,
    heun_sample,
    model_time,
    named_beta_schedule,
    time_grid,
)

PATHS = ("linear", "gvp")
PREDICTIONS = ("velocity", "noise", "score")
HALF_PI = math.pi / 2


def ref_coefficients(path, t):
    """(alpha, alpha', sigma, sigma') in float64, data at t = 1."""
    if path == "linear":
        return t, 1.0, 1.0 - t, -1.0
    return math.sin(HALF_PI * t), HALF_PI * math.cos(HALF_PI * t), math.cos(HALF_PI * t), \
        -HALF_PI * math.sin(HALF_PI * t)


def data_and_noise(seed=0, shape=(3, 4, 4, 2)):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return (np.asarray(jax.random.normal(k1, shape)) * 0.7 + 0.3,
            np.asarray(jax.random.normal(k2, shape)))


def batch_t(t, n=3):
    return jnp.full((n,), t, jnp.float32)


# ---------------------------------------------------------------------------------------------
# Interpolants and targets


@pytest.mark.parametrize("path", PATHS)
def test_interpolant_known_values(path):
    x, e = data_and_noise()
    fm = FlowMatching(path=path)
    mid = 0.5 if path == "linear" else 1 / math.sqrt(2.0)
    for t, expected in [(0.0, e), (1.0, x), (0.5, mid * (x + e))]:
        np.testing.assert_allclose(np.asarray(fm.interpolate(x, e, batch_t(t))), expected,
                                   rtol=1e-6, atol=1e-6)
    # Per-example times: each row follows its own t.
    ts = np.array([0.1, 0.6, 0.85])
    got = np.asarray(fm.interpolate(x, e, jnp.asarray(ts, jnp.float32)))
    for i, t in enumerate(ts):
        a, _, s, _ = ref_coefficients(path, t)
        np.testing.assert_allclose(got[i], a * x[i] + s * e[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_targets_at_ends_and_midpoints(path, prediction):
    x, e = data_and_noise(1)
    fm = FlowMatching(path=path, prediction=prediction)
    if path == "linear":
        velocity = {0.0: x - e, 0.5: x - e, 1.0: x - e}
        sigma = {0.0: 1.0, 0.5: 0.5}
    else:
        velocity = {0.0: HALF_PI * x, 0.5: HALF_PI / math.sqrt(2.0) * (x - e), 1.0: -HALF_PI * e}
        sigma = {0.0: 1.0, 0.5: 1 / math.sqrt(2.0)}
    times = (0.0, 0.5) if prediction == "score" else (0.0, 0.5, 1.0)  # the score needs sigma > 0
    for t in times:
        if prediction == "velocity":
            expected = velocity[t]
        elif prediction == "noise":
            expected = e
        else:
            expected = -e / sigma[t]
        np.testing.assert_allclose(np.asarray(fm.target(x, e, batch_t(t))), expected,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_velocity_target_is_the_time_derivative_of_the_interpolant(path):
    x, e = data_and_noise(2)
    fm = FlowMatching(path=path)
    for t in (0.2, 0.5, 0.8):
        h = 1e-3
        numeric = (np.asarray(fm.interpolate(x, e, batch_t(t + h)))
                   - np.asarray(fm.interpolate(x, e, batch_t(t - h)))) / (2 * h)
        np.testing.assert_allclose(np.asarray(fm.velocity_target(x, e, batch_t(t))), numeric,
                                   rtol=1e-2, atol=2e-3)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_training_losses_match_formula(path, prediction):
    x, e = data_and_noise(3)
    ts = np.array([0.25, 0.5, 0.75])
    fm = FlowMatching(path=path, prediction=prediction)
    seen = {}

    def model_fn(x_t, s):
        seen["x_t"], seen["s"] = x_t, s
        return 0.5 * x_t + 0.1  # an arbitrary, imperfect model

    out = fm.training_losses(model_fn, jnp.asarray(x), jnp.asarray(ts, jnp.float32),
                             jnp.asarray(e))
    for i, t in enumerate(ts):
        a, da, s, ds = ref_coefficients(path, t)
        x_t = a * x[i] + s * e[i]
        pred = 0.5 * x_t + 0.1
        target = {"velocity": da * x[i] + ds * e[i], "noise": e[i], "score": -e[i] / s}[prediction]
        mse = np.mean((pred - target) ** 2)
        loss = np.mean((s * pred + e[i]) ** 2) if prediction == "score" else mse
        np.testing.assert_allclose(float(out["mse"][i]), mse, rtol=1e-5)
        np.testing.assert_allclose(float(out["loss"][i]), loss, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(seen["x_t"])[i], x_t, rtol=1e-5, atol=1e-6)
    # The embedder sees 1000 (1 - t): 0 for data, 1000 for pure noise.
    np.testing.assert_allclose(np.asarray(seen["s"]), 1000.0 * (1.0 - ts), rtol=1e-6)
    assert out["loss"].shape == out["mse"].shape == (3,)


def test_perfect_model_has_zero_loss_and_wrong_channels_are_named():
    x, e = data_and_noise(4)
    fm = FlowMatching(path="gvp", prediction="noise")
    out = fm.training_losses(lambda x_t, s: jnp.asarray(e), x, batch_t(0.3), e)
    np.testing.assert_allclose(np.asarray(out["loss"]), 0.0, atol=1e-12)
    with pytest.raises(ValueError, match="no learned variance"):
        fm.training_losses(lambda x_t, s: jnp.concatenate([x_t, x_t], -1), x, batch_t(0.3), e)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_exact_outputs_convert_to_the_exact_velocity(path, prediction):
    """An output equal to its target gives the true velocity, and the velocity the noise/score."""
    x, e = data_and_noise(5)
    fm = FlowMatching(path=path, prediction=prediction)
    for t in (0.1, 0.5, 0.9):
        a, da, s, ds = ref_coefficients(path, t)
        x_t = jnp.asarray(a * x + s * e, jnp.float32)
        v_true = da * x + ds * e
        out = fm.target(x, e, batch_t(t))
        v = fm.to_velocity(out, x_t, batch_t(t))
        np.testing.assert_allclose(np.asarray(v), v_true, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(fm.noise_from_velocity(v, x_t, batch_t(t))), e,
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(fm.score_from_velocity(v, x_t, batch_t(t))),
                                   -e / s, rtol=1e-4, atol=1e-3)


def test_model_time_and_eps_defaults():
    np.testing.assert_allclose(np.asarray(model_time(jnp.array([0.0, 0.25, 1.0]))),
                               [1000.0, 750.0, 0.0])
    assert FlowMatching().train_eps == 0.0 and FlowMatching().sample_eps == 0.0
    assert FlowMatching(prediction="score").train_eps == 1e-3
    assert FlowMatching(prediction="noise").ode_interval() == (1e-3, 1 - 1e-3)
    with pytest.raises(ValueError, match="path"):
        FlowMatching(path="vp")
    with pytest.raises(ValueError, match="SBDM"):
        FlowMatching().sde_start("SBDM")


# ---------------------------------------------------------------------------------------------
# Training-time distribution


def test_uniform_times_with_shift_follow_the_shifted_cdf():
    shift = 3.0
    t = np.asarray(FlowMatching(shift=shift).sample_time(jax.random.key(6), 20000), np.float64)
    # SD3: noise time tau' = s tau / (1 + (s - 1) tau) with tau uniform; here t = 1 - tau', so
    # P(t <= u) = P(tau' >= 1 - u) = 1 - F_tau'(1 - u), F_tau'(v) = v / (s - (s - 1) v).
    cdf = lambda u: 1.0 - (1.0 - u) / (shift - (shift - 1.0) * (1.0 - u))  # noqa: E731
    assert stats.kstest(t, cdf).pvalue > 1e-3
    assert t.mean() < 0.4  # shift > 1 moves time towards noise (t = 0)


def test_logit_normal_times_and_train_eps():
    fm = FlowMatching(time_sampling="logit_normal", logit_mean=-0.5, logit_std=1.3)
    t = np.asarray(fm.sample_time(jax.random.key(7), 20000), np.float64)
    logit = np.log(t / (1 - t))
    assert stats.kstest(logit, stats.norm(-0.5, 1.3).cdf).pvalue > 1e-3
    fm = FlowMatching(prediction="noise", train_eps=0.05)
    t = np.asarray(fm.sample_time(jax.random.key(8), 20000))
    assert t.min() >= 0.05 and t.max() <= 0.95 and t.min() < 0.051 and t.max() > 0.949


def test_time_grid_shift_keeps_end_points():
    g = time_grid(10, shift=3.0)
    assert g[0] == 0.0 and g[-1] == 1.0 and np.all(np.diff(g) > 0)
    assert np.sum(g < 0.5) > np.sum(g > 0.5)  # more steps near noise
    np.testing.assert_allclose(time_grid(4), [0, 0.25, 0.5, 0.75, 1.0])


# ---------------------------------------------------------------------------------------------
# ODE samplers on linear vector fields

A = np.array([[-0.5, 1.2], [-0.8, 0.3]])


def linear_field(x, t):
    return jnp.einsum("ij,n...j->n...i", jnp.asarray(A, jnp.float32), x)


def timed_field(x, t):
    return 2.0 * t.reshape((-1,) + (1,) * (x.ndim - 1)) * x  # dx/dt = 2 t x


def _errors(sampler, field, exact, x0, steps, **kw):
    run = jax.jit(lambda x, n: sampler(field, x, n, **kw), static_argnums=1)
    return [float(np.max(np.abs(np.asarray(run(x0, n)) - exact))) for n in steps]


def test_euler_and_heun_converge_at_their_orders_on_a_linear_field():
    x0 = np.asarray(jax.random.normal(jax.random.key(9), (4, 3, 1, 2)))
    exact = np.einsum("ij,n...j->n...i", linalg.expm(A), x0)
    steps = (8, 16, 32)
    euler = _errors(euler_sample, linear_field, exact, x0, steps)
    heun = _errors(heun_sample, linear_field, exact, x0, steps)
    for e0, e1 in zip(euler, euler[1:]):
        assert 1.6 < e0 / e1 < 2.4, euler  # first order
    for h0, h1 in zip(heun, heun[1:]):
        assert 3.2 < h0 / h1 < 4.8, heun  # second order
    assert heun[-1] < 0.05 * euler[-1]


def test_samplers_use_the_time_argument_and_interval():
    # dx/dt = 2 t x from t0 to t1: x(t1) = x(t0) exp(t1^2 - t0^2); with the grid shift too.
    x0 = np.asarray(jax.random.normal(jax.random.key(10), (2, 2, 2, 1)))
    for t0, t1, shift in [(0.0, 1.0, 1.0), (0.2, 0.9, 1.0), (0.0, 1.0, 3.0)]:
        exact = x0 * math.exp(t1**2 - t0**2)
        euler = _errors(euler_sample, timed_field, exact, x0, (64, 128), t0=t0, t1=t1, shift=shift)
        heun = _errors(heun_sample, timed_field, exact, x0, (64,), t0=t0, t1=t1, shift=shift)
        scale = np.abs(exact).max()
        assert euler[1] < 0.6 * euler[0] and euler[1] < 0.05 * scale, (t0, t1, shift, euler)
        assert heun[0] < 1e-3 * scale, (t0, t1, shift, heun)


# ---------------------------------------------------------------------------------------------
# Gaussian toy problem: data N(m, s^2) per channel, so every field is known in closed form

M, S = np.array([1.5, -0.5]), np.array([0.5, 2.0])


def gaussian_velocity(path):
    """E[alpha' x1 + sigma' eps | x_t] for x1 ~ N(M, S^2), eps ~ N(0, 1), jointly Gaussian."""
    def v(x, t):
        t = t.reshape((-1,) + (1,) * (x.ndim - 1))
        if path == "linear":
            a, da, s, ds = t, 1.0, 1.0 - t, -1.0
        else:
            a, da = jnp.sin(HALF_PI * t), HALF_PI * jnp.cos(HALF_PI * t)
            s, ds = jnp.cos(HALF_PI * t), -HALF_PI * jnp.sin(HALF_PI * t)
        m, var1 = jnp.asarray(M, jnp.float32), jnp.asarray(S**2, jnp.float32)
        var = a * a * var1 + s * s
        r = x - a * m
        return da * (m + a * var1 / var * r) + ds * (s / var * r)
    return v


def gaussian_score(path, x, t):
    a, _, s, _ = ref_coefficients(path, t)
    return -(x - a * M) / (a * a * S**2 + s * s)


@pytest.mark.parametrize("path", PATHS)
def test_score_from_the_exact_velocity_is_the_exact_score(path):
    fm = FlowMatching(path=path)
    x = np.asarray(jax.random.normal(jax.random.key(11), (5, 1, 1, 2))) * 2.0
    for t in (0.05, 0.5, 0.95):
        v = gaussian_velocity(path)(jnp.asarray(x, jnp.float32), batch_t(t, 5))
        np.testing.assert_allclose(np.asarray(fm.score_from_velocity(v, x, batch_t(t, 5))),
                                   gaussian_score(path, x, t), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_heun_transports_the_gaussian_exactly(path):
    # The probability-flow map between Gaussians is affine: x(1) = M + S z for x(0) = z.
    z = np.asarray(jax.random.normal(jax.random.key(12), (64, 1, 1, 2)))
    out = jax.jit(lambda z: heun_sample(gaussian_velocity(path), z, 50))(z)
    np.testing.assert_allclose(np.asarray(out), M + S * z, rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("path,form,last_step", [
    ("linear", "sigma", "mean"), ("gvp", "sigma", "mean"), ("linear", "SBDM", "mean"),
    ("linear", "constant", "euler"), ("gvp", "linear", None),
])
def test_euler_maruyama_marginal_matches_the_data_distribution(path, form, last_step):
    n, steps = 8192, 250
    fm = FlowMatching(path=path, sample_eps=1e-3)
    t0 = fm.sde_start(form)
    kw = {} if last_step is None else {"last_step_size": 0.04}
    sample = jax.jit(lambda key, z: euler_maruyama_sample(
        key, gaussian_velocity(path), z, steps, score_from_velocity=fm.score_from_velocity,
        diffusion_fn=lambda t: fm.diffusion_coefficient(t, form), t0=t0, last_step=last_step,
        **kw))
    k1, k2 = jax.random.split(jax.random.key(13))
    z = jax.random.normal(k1, (n, 1, 1, 2))
    # Start on the exact marginal at t0 (pure noise when t0 = 0).
    a, _, s, _ = ref_coefficients(path, t0)
    x0 = a * jnp.asarray(M, jnp.float32) + np.sqrt(a * a * S**2 + s * s).astype(np.float32) * z
    out = np.asarray(sample(k2, x0)).reshape(n, 2)
    assert np.all(np.isfinite(out))
    # Sampling error: se(mean) = S / sqrt(n), se(std) ~ S / sqrt(2 n); 5 se plus 2% for the
    # discretisation (Euler-Maruyama's weak error is O(step)).
    np.testing.assert_array_less(np.abs(out.mean(0) - M), 5 * S / np.sqrt(n) + 0.02 * S)
    np.testing.assert_array_less(np.abs(out.std(0) - S), 5 * S / np.sqrt(2 * n) + 0.02 * S)
    # The noise is real: samples are not a deterministic function of the start.
    assert np.std(out[:, 0] - (M[0] + S[0] * np.asarray(z).reshape(n, 2)[:, 0])) > 0.05


def test_euler_maruyama_without_diffusion_is_euler():
    z = jax.random.normal(jax.random.key(14), (16, 1, 1, 2))
    fm = FlowMatching()
    got = euler_maruyama_sample(jax.random.key(15), gaussian_velocity("linear"), z, 20,
                                score_from_velocity=fm.score_from_velocity,
                                diffusion_fn=lambda t: jnp.zeros_like(t), last_step=None)
    np.testing.assert_allclose(np.asarray(got),
                               np.asarray(euler_sample(gaussian_velocity("linear"), z, 20)),
                               rtol=1e-5, atol=1e-5)


def test_diffusion_coefficient_forms():
    t = jnp.array([0.25, 0.5])
    lin, gvp = FlowMatching(), FlowMatching(path="gvp")
    # SBDM: alpha'/alpha sigma^2 - sigma sigma'; linear: (1 - t) / t.
    np.testing.assert_allclose(np.asarray(lin.diffusion_coefficient(t, "SBDM")), [3.0, 1.0],
                               rtol=1e-6)
    # GVP: pi/2 (cos^2 / tan + cos sin) = pi/2 cos / sin.
    np.testing.assert_allclose(np.asarray(gvp.diffusion_coefficient(t, "SBDM")),
                               HALF_PI / np.tan(HALF_PI * np.array([0.25, 0.5])), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lin.diffusion_coefficient(t, "sigma", 2.0)), [1.5, 1.0])
    np.testing.assert_allclose(np.asarray(lin.diffusion_coefficient(t, "decreasing")),
                               [0.25 * (np.cos(np.pi / 4) + 1) ** 2, 0.25], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(lin.diffusion_coefficient(t, "increasing-decreasing")),
                               [0.5, 1.0], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Guidance interval


def labelled_apply(calls):
    """An apply_fn whose output depends on x, t and the label; logs the batch sizes it sees.

    With x, t and the labels on coarse binary grids (`dyadic`) every operation is exact in
    float32, so compiled and eager evaluations agree bit for bit and equality is testable.
    """
    def apply_fn(x, t, y):
        calls.append(x.shape[0])
        yf = y.astype(jnp.float32)[:, None, None, None]
        tf = jnp.asarray(t, jnp.float32)[:, None, None, None]
        return x * (1.0 + yf / 8) + jnp.arange(float(x.shape[-1])) * yf / 4 + tf / 1024
    return apply_fn


def dyadic(seed, shape):
    return jax.random.randint(jax.random.key(seed), shape, -16, 17).astype(jnp.float32) / 8


@pytest.mark.parametrize("channels,guided", [(3, 3), (None, 4)])
def test_guidance_interval_is_exact_on_both_sides(channels, guided):
    x = dyadic(16, (5, 2, 2, 4))
    y = jnp.array([1, 2, 3, 4, 5])
    t = jnp.array([0.125, 0.25, 0.5, 0.75, 0.875])  # the ends 0.25 and 0.75 are inside
    fn = jax.jit(guided_model_fn(labelled_apply([]), y, 4.0, null_label=10,
                                 guidance_channels=channels, interval=(0.25, 0.75)))
    out = np.asarray(fn(x, t))
    cond = np.asarray(labelled_apply([])(x, t, y))
    uncond = np.asarray(labelled_apply([])(x, t, jnp.full_like(y, 10)))
    guided_ref = cond.copy()
    guided_ref[..., :guided] = uncond[..., :guided] + 4.0 * (cond[..., :guided]
                                                             - uncond[..., :guided])
    inside = np.array([False, True, True, True, False])
    np.testing.assert_array_equal(out[~inside], cond[~inside])
    np.testing.assert_allclose(out[inside], guided_ref[inside], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out[inside], cond[inside])
    # Without an interval every row is guided, with the same values.
    plain = np.asarray(jax.jit(guided_model_fn(labelled_apply([]), y, 4.0, null_label=10,
                                               guidance_channels=channels))(x, t))
    np.testing.assert_array_equal(out[inside], plain[inside])


def test_guidance_interval_outside_runs_only_the_conditional_pass():
    calls = []
    x = dyadic(17, (2, 2, 2, 4))
    y = jnp.array([1, 2])
    fn = guided_model_fn(labelled_apply(calls), y, 3.0, null_label=10, interval=(400, 800))
    out = fn(x, jnp.array([900, 900]))  # eager: lax.cond takes one branch, both are traced
    assert sorted(calls) == [2, 4]
    np.testing.assert_array_equal(np.asarray(out),
                                  np.asarray(labelled_apply([])(x, jnp.array([900, 900]), y)))


def _ddpm_oracle_apply(x, t, y):
    """A label-dependent stand-in for the eps network (plus variance channels)."""
    yf = y.astype(jnp.float32)[:, None, None, None]
    eps = 0.3 * x + 0.05 * yf
    return jnp.concatenate([eps, jnp.zeros_like(eps)], axis=-1)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_guidance_interval_in_ddpm_and_ddim_samplers(sampler):
    diffusion = create_diffusion("10")
    noise = jax.random.normal(jax.random.key(18), (2, 4, 4, 4))
    y = jnp.array([1, 2])

    def run(scale, interval):
        fn = guided_model_fn(_ddpm_oracle_apply, y, scale, null_label=10, interval=interval)
        loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
        return np.asarray(jax.jit(lambda n: loop(fn, n, jax.random.key(19)))(noise))

    # The model sees original step indices (here 0, 111, ..., 999): an interval holding all of
    # them is plain guidance, an empty one the conditional model, (0, 500) something between.
    if sampler == "ddpm":
        reference, other = run(1.0, None), run(4.0, None)
        np.testing.assert_allclose(run(4.0, (1, 0)), reference, rtol=1e-6, atol=1e-6)
    else:
        reference, other = run(4.0, None), run(1.0, None)
        np.testing.assert_allclose(run(4.0, (0, 999)), reference, rtol=1e-6, atol=1e-6)
    partial = run(4.0, (0, 500))
    assert not np.allclose(partial, reference, atol=1e-3)
    assert not np.allclose(partial, other, atol=1e-3)


def test_ddpm_step_interval_matches_noise_levels():
    abar = np.cumprod(1.0 - named_beta_schedule("linear", 1000))
    snr = abar / (1 - abar)
    fm = FlowMatching()
    assert fm.ddpm_step_interval(0.0, 1.0, abar) == (0, 999)
    first, last = fm.ddpm_step_interval(0.3, 0.7, abar)
    snr_low, snr_high = (0.3 / 0.7) ** 2, (0.7 / 0.3) ** 2  # linear path: t^2 / (1 - t)^2
    assert snr_low <= snr[last] and snr[last + 1] < snr_low
    assert snr[first] <= snr_high < snr[first - 1]
    assert fm.ddpm_step_interval(0.999999, 1.0, abar) == (1, 0)  # beyond the least noisy step


def test_guided_velocity_fn_forms_and_interval():
    x = jax.random.normal(jax.random.key(20), (3, 2, 2, 4))
    y = jnp.array([1, 2, 3])
    t = jnp.array([0.2, 0.5, 0.8])
    for prediction in PREDICTIONS:
        fm = FlowMatching(path="gvp", prediction=prediction)
        apply_fn = labelled_apply([])

        def velocity(labels):
            return np.asarray(fm.to_velocity(apply_fn(x, model_time(t), labels), x, t))

        v_cond, v_uncond = velocity(y), velocity(jnp.full_like(y, 10))
        v_all = np.asarray(fm.guided_velocity_fn(apply_fn, y, 2.0, null_label=10)(x, t))
        np.testing.assert_allclose(v_all, v_uncond + 2.0 * (v_cond - v_uncond), rtol=1e-4,
                                   atol=1e-4)
        v_dico = np.asarray(fm.guided_velocity_fn(apply_fn, y, 2.0, null_label=10,
                                                  guidance_channels=3)(x, t))
        np.testing.assert_allclose(v_dico[..., 3:], v_cond[..., 3:], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(v_dico[..., :3], v_all[..., :3], rtol=1e-5, atol=1e-5)
        v_int = np.asarray(fm.guided_velocity_fn(apply_fn, y, 2.0, null_label=10,
                                                 interval=(0.4, 0.6))(x, t))
        np.testing.assert_allclose(v_int[[0, 2]], v_cond[[0, 2]], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(v_int[1], v_all[1], rtol=1e-5, atol=1e-5)
