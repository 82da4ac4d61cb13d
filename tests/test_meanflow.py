"""The MeanFlow objective (dico_jax.diffusion.meanflow) on a case with a known answer: data
at a single point a, where every trajectory is a straight line to a and the average velocity
is u(z_t, r, t) = (z_t - a) / t for every r."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dico_jax.diffusion.meanflow import MeanFlow

A = jnp.linspace(-1.0, 1.0, 2 * 4 * 4 * 3).reshape(2, 4, 4, 3)


def exact_u(z, r, t):
    del r
    return (z - A) / t[:, None, None, None]


def test_times_are_ordered_and_a_quarter_differ():
    r, t = MeanFlow().sample_times(jax.random.key(0), 20_000)
    assert bool(jnp.all(r <= t)) and bool(jnp.all((t > 0) & (t < 1)))
    assert abs(float(jnp.mean(r < t)) - 0.25) < 0.02


def test_the_exact_average_velocity_has_zero_loss_and_a_wrong_one_does_not():
    mf = MeanFlow()
    noise = jax.random.normal(jax.random.key(1), A.shape)
    r, t = jnp.array([0.2, 0.5]), jnp.array([0.7, 0.5])
    exact = jax.jit(lambda: mf.training_losses(exact_u, A, r, t, noise))()
    np.testing.assert_allclose(exact["mse"], 0.0, atol=1e-10)
    wrong = mf.training_losses(lambda z, r, t: 1.1 * exact_u(z, r, t), A, r, t, noise)
    assert float(jnp.min(wrong["mse"])) > 1e-3
    # Adaptive weighting with p = 1: each example's loss is ||D||^2 / (||D||^2 + c) < 1.
    assert bool(jnp.all(wrong["loss"] < 1.0)) and bool(jnp.all(wrong["loss"] > 0.9))


def test_guidance_folds_into_the_target_except_for_dropped_labels():
    mf = MeanFlow(cfg_omega=2.0, cfg_kappa=0.5)
    v = jnp.ones((2, 1, 1, 1))
    out = mf.guided_velocity(v, lambda: 3.0 * v, lambda: 5.0 * v, jnp.array([False, True]))
    # 2 * 1 + 0.5 * 3 + (1 - 2 - 0.5) * 5 = -4; a dropped label keeps v.
    np.testing.assert_allclose(out.ravel(), [-4.0, 1.0])
    with pytest.raises(ValueError, match="kappa"):
        MeanFlow(cfg_kappa=1.0)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sampling_with_the_exact_average_velocity_lands_on_the_data(steps):
    noise = jax.random.normal(jax.random.key(2), A.shape)
    np.testing.assert_allclose(MeanFlow().sample(exact_u, noise, steps), A, atol=1e-5)
