"""The shortcut objective (dico_jax.diffusion.shortcut) on a case with a known answer: data at
a single point a, where every trajectory is a straight line to a, so the exact step direction
is s(z_t, t, d) = (z_t - a) / t for every step size d."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dico_jax.diffusion.shortcut import Shortcut

A = jnp.linspace(-1.0, 1.0, 8 * 4 * 4 * 3).reshape(8, 4, 4, 3)


def exact_s(z, t, d, data=A):
    del d
    return (z - data) / t[:, None, None, None]


def exact_teacher(z, t, d):
    """The exact direction on the self-consistency rows (0, 4 of the batch of 8)."""
    return exact_s(z, t, d, A[::4])


def test_draws_lie_on_the_step_grids():
    sc = Shortcut(denoise_steps=16)
    draws = sc.sample_times(jax.random.key(0), 4000)
    m = 16
    np.testing.assert_allclose(draws["t_flow"] * m, np.round(draws["t_flow"] * m), atol=1e-5)
    assert float(draws["t_flow"].min()) == 1 / m and float(draws["t_flow"].max()) == 1.0
    # 2d in {1, 1/2, ..., 2/M}, each level about equally often; t a multiple of 2d in (0, 1].
    levels = np.log2(1.0 / np.asarray(draws["d_boot"]))
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-6)
    assert sorted(set(np.round(levels).astype(int))) == [0, 1, 2, 3]
    ratio = np.asarray(draws["t_boot"]) / np.asarray(draws["d_boot"])
    np.testing.assert_allclose(ratio, np.round(ratio), atol=1e-4)
    assert ratio.min() >= 1 - 1e-6 and float(draws["t_boot"].max()) <= 1.0


def test_the_exact_direction_has_zero_loss_and_a_wrong_one_does_not():
    sc = Shortcut(denoise_steps=8, bootstrap_every=4)
    noise = jax.random.normal(jax.random.key(1), A.shape)
    times = sc.sample_times(jax.random.key(2), A.shape[0])
    exact = jax.jit(lambda: sc.training_losses(exact_s, exact_teacher, A, times, noise))()
    np.testing.assert_allclose(exact["loss"], 0.0, atol=1e-8)
    wrong = sc.training_losses(lambda z, t, d: 1.1 * exact_s(z, t, d), exact_teacher, A, times,
                               noise)
    assert float(jnp.min(wrong["loss"])) > 1e-4


def test_self_consistency_rows_regress_on_two_half_steps():
    """A teacher that is exact for half steps of any size except through a known offset: the
    target of a bootstrap row is the mean of its two half-step directions."""
    sc = Shortcut(denoise_steps=8, bootstrap_every=4)
    noise = jax.random.normal(jax.random.key(3), A.shape)
    times = sc.sample_times(jax.random.key(4), A.shape[0])
    teacher = lambda z, t, d: exact_teacher(z, t, d) + 0.5  # noqa: E731
    got = sc.training_losses(exact_s, teacher, A, times, noise)
    boot = np.asarray(sc.bootstrap_rows(A.shape[0]))
    assert boot.tolist() == [True, False, False, False, True, False, False, False]
    # Flow-matching rows: exact. Bootstrap rows, with e the exact direction and h = d / 2:
    # s1 = e + 1/2 moves z off the line by -h/2, so s2 = e - h / (2 (t - h)) + 1/2 and the
    # target misses e by 1/2 - h / (4 (t - h)) in every element.
    np.testing.assert_allclose(np.asarray(got["loss"])[~boot], 0.0, atol=1e-8)
    t, h = np.asarray(times["t_boot"])[boot], 0.5 * np.asarray(times["d_boot"])[boot]
    np.testing.assert_allclose(np.asarray(got["loss"])[boot], (0.5 - h / (4 * (t - h))) ** 2,
                               rtol=1e-4)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sampling_with_the_exact_direction_lands_on_the_data(steps):
    noise = jax.random.normal(jax.random.key(5), A.shape)
    out = Shortcut().sample(lambda z, r, t: exact_s(z, t, t - r), noise, steps)
    np.testing.assert_allclose(out, A, atol=1e-5)


def test_step_counts_must_be_trained_step_sizes():
    for bad in (0, 3, 256):
        with pytest.raises(ValueError, match="power of two"):
            Shortcut(denoise_steps=128).check_num_steps(bad)
    with pytest.raises(ValueError, match="denoise_steps"):
        Shortcut(denoise_steps=96)
