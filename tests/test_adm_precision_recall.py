"""Precision and recall against ADM's evaluator arithmetic, written here in TensorFlow ops.

ADM's evaluator (guided-diffusion ``evaluations/evaluator.py``) computes its distance blocks in
a TensorFlow graph: features cast to float16, float16 squared norms and matmul, the whole block
recomputed in float32 when any float16 entry is not finite. The reference below runs those
TensorFlow ops on this CPU and follows ADM's ManifoldEstimator (row batches of full distance
rows, k-th neighbour by partition, per-block "less than" tests); the project's JAX/numpy path
must print the same digits.
"""
import numpy as np
import pytest

from dico_jax.evaluation import metrics

tf = pytest.importorskip("tensorflow")


def _tf_pairwise(u, v):
    norm_u = tf.reshape(tf.reduce_sum(tf.square(u), 1), [-1, 1])
    norm_v = tf.reshape(tf.reduce_sum(tf.square(v), 1), [1, -1])
    return tf.maximum(norm_u - 2 * tf.matmul(u, v, transpose_b=True) + norm_v, 0.0)


def _tf_distance_block(u, v, fallbacks):
    u, v = tf.constant(u, tf.float32), tf.constant(v, tf.float32)
    block16 = _tf_pairwise(tf.cast(u, tf.float16), tf.cast(v, tf.float16))
    if bool(tf.reduce_all(tf.math.is_finite(block16))):
        return tf.cast(block16, tf.float32).numpy()
    fallbacks.append(1)
    return _tf_pairwise(u, v).numpy()


def _tf_reference(ref, samples, batch, k=3):
    """(precision, recall, ref radii, number of float32 fallbacks) following ADM's estimator."""
    fallbacks = []

    def radii(features):
        n = len(features)
        out = np.zeros((n,), np.float32)
        for begin1 in range(0, n, batch):
            rows = features[begin1 : begin1 + batch]
            dist = np.concatenate(
                [_tf_distance_block(rows, features[b : b + batch], fallbacks) for b in range(0, n, batch)], axis=1
            )
            out[begin1 : begin1 + len(rows)] = np.partition(dist, np.arange(k + 1), axis=1)[:, k]
        return out

    ref_radii, sample_radii = radii(ref), radii(samples)
    ref_in = np.zeros((len(ref),), bool)
    sample_in = np.zeros((len(samples),), bool)
    for b1 in range(0, len(ref), batch):
        for b2 in range(0, len(samples), batch):
            dist = _tf_distance_block(ref[b1 : b1 + batch], samples[b2 : b2 + batch], fallbacks)
            ref_in[b1 : b1 + batch] |= np.any(dist <= sample_radii[None, b2 : b2 + batch], axis=1)
            sample_in[b2 : b2 + batch] |= np.any(dist <= ref_radii[b1 : b1 + batch, None], axis=0)
    return float(sample_in.mean()), float(ref_in.mean()), ref_radii, len(fallbacks)


def _inception_like(rng, n, dim=2048, scale=1.0):
    # Pool features of Inception-v3 are non-negative and skewed, most of them small.
    return (rng.gamma(0.35, 1.2, size=(n, dim)) * scale).astype(np.float32)


@pytest.mark.parametrize("dim", [5, 100, 1601, 2048, 2051])
def test_float16_squared_norms_equal_tensorflows(dim):
    block = np.random.default_rng(dim).gamma(0.5, 2.0, size=(13, dim)).astype(np.float16)
    expected = tf.reduce_sum(tf.square(tf.constant(block)), 1).numpy()
    np.testing.assert_array_equal(metrics.adm_float16_squared_norms(block), expected)


def test_precision_recall_prints_adms_digits_on_float16_distances():
    rng = np.random.default_rng(0)
    ref = _inception_like(rng, 150)
    samples = _inception_like(rng, 170) * 1.03 + 0.01
    precision, recall, ref_radii, fallbacks = _tf_reference(ref, samples, batch=64)
    assert fallbacks == 0
    ours = metrics.precision_recall(ref, samples, block_size=64)
    assert f"{ours[0]:.4f} {ours[1]:.4f}" == f"{precision:.4f} {recall:.4f}"
    radii = metrics.manifold_radii(ref, block_size=64)
    assert np.mean(radii == ref_radii) > 0.99
    # The float16 rounding matters: float32 distances give other radii.
    assert np.mean(metrics.manifold_radii(ref, block_size=64, distances="float32") == ref_radii) < 0.5


def test_precision_recall_falls_back_to_float32_per_block_like_adm():
    rng = np.random.default_rng(1)
    ref = _inception_like(rng, 130)
    samples = _inception_like(rng, 140) * 1.02
    # Squared norms past float16's 65504 in one block of each set: those blocks fall back.
    ref[64:80] *= 8.0
    samples[:10] *= 8.0
    precision, recall, ref_radii, fallbacks = _tf_reference(ref, samples, batch=64)
    assert 0 < fallbacks < 30
    ours = metrics.precision_recall(ref, samples, block_size=64)
    assert f"{ours[0]:.4f} {ours[1]:.4f}" == f"{precision:.4f} {recall:.4f}"
    # Float32 blocks agree to float32 rounding (summation order), float16 ones exactly.
    radii = metrics.manifold_radii(ref, block_size=64)
    np.testing.assert_allclose(radii, ref_radii, rtol=1e-6)
    assert not np.allclose(metrics.manifold_radii(ref, block_size=64, distances="float32"), ref_radii, rtol=1e-4)


def test_the_float32_variant_is_named_and_unknown_modes_refused(tmp_path):
    from dico_jax import evaluate

    samples = tmp_path / "s.npz"
    samples.touch()  # evaluate checks that the files it is given exist
    args = evaluate.parse_args(["--samples", str(samples), "--digits", "--pr_distances", "float32"])
    assert args.pr_distances == "float32"
    assert evaluate.parse_args(["--samples", str(samples), "--digits"]).pr_distances == "adm_float16"
    with pytest.raises(ValueError, match="unknown distances 'float64'"):
        metrics.precision_recall(np.zeros((8, 3)), np.ones((8, 3)), distances="float64")
