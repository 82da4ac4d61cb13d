"""Sample-quality metrics of the ADM evaluation protocol, as pure functions of feature arrays.

Definitions follow the ADM evaluator (guided-diffusion ``evaluations/evaluator.py``):
Fréchet distance of Gaussian statistics, Inception Score over splits of 5,000, and
improved precision/recall with k-NN manifolds (k = 3) on *squared* Euclidean distances,
rounded to float16 as ADM's evaluator rounds them (``distances="float32"`` for the float32
variant); docs/evaluation.md says where the project departs from ADM and why.
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg, special

from dico_jax.errors import UserError

ADM_IS_SPLIT_SIZE = 5000
ADM_NEIGHBORHOOD = 3
# Rows/columns of the distance matrix computed at once: ADM's row and column batch size (its
# float16 overflow fallback applies per block, so other sizes can change the result).
DEFAULT_DISTANCE_BLOCK = 10000


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, rows are samples) of (N, D) features, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be (num_samples, dim), got shape {features.shape}")
    if features.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {features.shape[0]}")
    check_finite(features, "features")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _trace_sqrt_product_sqrtm(sigma1, sigma2, eps):
    """ADM's way: scipy's matrix square root, retried with ``eps`` on the diagonals if singular."""
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"Fréchet distance: singular covariance product; adding {eps} to the diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"Fréchet distance: matrix square root has an imaginary component of "
                f"{np.max(np.abs(covmean.imag)):.3g}"
            )
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrt_product_eigh(sigma1, sigma2):
    """Tr((Σ1Σ2)^½) = Tr((Σ1^½ Σ2 Σ1^½)^½): two symmetric eigendecompositions, no general one."""
    def nonnegative(eigenvalues, what):
        if np.min(eigenvalues) < -1e-6 * max(float(np.max(np.abs(eigenvalues))), 1e-30):
            raise ValueError(f"Fréchet distance: {what} is not positive semi-definite")
        return np.maximum(eigenvalues, 0.0)

    values, vectors = linalg.eigh(sigma1, driver="evd")
    root1 = (vectors * np.sqrt(nonnegative(values, "sigma1"))) @ vectors.T
    inner = linalg.eigvalsh(root1 @ sigma2 @ root1)
    return float(np.sum(np.sqrt(nonnegative(inner, "sigma1^½ sigma2 sigma1^½"))))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """‖mu1 - mu2‖² + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^½).

    ``method="sqrtm"`` computes it as the ADM evaluator does: a singular product gets ``eps``
    added to both diagonals (with a warning), and an imaginary part of the matrix square root
    above 1e-3 on the diagonal raises ValueError. ``method="eigh"`` takes the trace from the
    symmetric form Tr((sigma1^½ sigma2 sigma1^½)^½) instead: the same value up to rounding,
    several times faster for 2048-d Inception features on a small CPU.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(
            f"covariances must both be {(mu1.shape[0],) * 2}, got {sigma1.shape} and {sigma2.shape}"
        )
    if method == "sqrtm":
        trace_sqrt = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    elif method == "eigh":
        trace_sqrt = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        raise ValueError(f"unknown Fréchet distance method {method!r}; use 'sqrtm' or 'eigh'")
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def _inception_score_of_log_probs(log_probs: np.ndarray, split_size: int) -> float:
    scores = []
    for start in range(0, log_probs.shape[0], split_size):
        part = log_probs[start : start + split_size]
        # log of the split's marginal in log space: a mean of subnormal probabilities underflows.
        log_marginal = special.logsumexp(part, axis=0, keepdims=True) - np.log(part.shape[0])
        probs = np.exp(part)
        with np.errstate(invalid="ignore"):
            kl = np.where(probs > 0, probs * (part - log_marginal), 0.0)  # 0·log 0 = 0
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def _check_class_scores(array, name: str) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"{name} must be (num_samples > 0, num_classes), got shape {array.shape}")
    return check_finite(array, name)


def inception_score(probs, split_size: int = ADM_IS_SPLIT_SIZE) -> float:
    """exp(E[KL(p(y|x) ‖ p(y))]) per consecutive split of ``split_size`` rows, averaged over splits.

    ``probs`` is (N, classes) class probabilities; zero probabilities contribute 0.
    """
    probs = _check_class_scores(probs, "probs")
    with np.errstate(divide="ignore"):
        return _inception_score_of_log_probs(np.log(probs), split_size)


def inception_score_from_logits(logits, split_size: int = ADM_IS_SPLIT_SIZE) -> float:
    """Inception Score of unnormalized class logits (log-softmax in float64)."""
    logits = _check_class_scores(logits, "logits")
    return _inception_score_of_log_probs(special.log_softmax(logits, axis=-1), split_size)


# --- improved precision and recall ------------------------------------------------------------
#
# ADM's DistanceBlock computes each block of squared distances in float16 (features cast to
# float16, float16 squared norms, a float16 matmul, float16 arithmetic), and recomputes the whole
# block in float32 only when some float16 entry is not finite. Distances in float16 are coarse
# (11-bit significands), so a sample can land inside or outside a ball depending on that
# rounding: to print ADM's digits the project rounds the same way.

# ``distances`` of precision_recall / manifold_radii: "adm_float16" is the ADM evaluator's
# arithmetic; "float32" computes every block in float32 (closer to exact distances).
DISTANCE_MODES = ("adm_float16", "float32")
# Eigen's vectorised sum over a row of float16 values (what TensorFlow's reduce_sum runs on a
# CPU): packets of 8 lanes, 4 packet accumulators, rows longer than 8 x 200 split in halves.
_EIGEN_PACKET = 8
_EIGEN_HALF_LEAF = 200


def _eigen_packet_total(packet: np.ndarray) -> np.ndarray:
    """Horizontal sum of (n, 8) float16 lanes as Eigen does it: in float32, halves then pairs."""
    lanes = packet.astype(np.float32)
    quads = lanes[:, :4] + lanes[:, 4:]
    pairs = quads[:, :2] + quads[:, 2:]
    return (pairs[:, 0] + pairs[:, 1]).astype(np.float16)


def _eigen_half_leaf_sum(values: np.ndarray) -> np.ndarray:
    """Sum of each row of (n, m) float16 ``values`` with m <= 1600, rounding as Eigen's CPU kernel."""
    n, m = values.shape
    step = 4 * _EIGEN_PACKET
    full4, full = m - m % step, m - m % _EIGEN_PACKET
    accumulators = np.zeros((4, n, _EIGEN_PACKET), np.float16)
    for start in range(0, full4, step):
        accumulators += values[:, start : start + step].reshape(n, 4, _EIGEN_PACKET).transpose(1, 0, 2)
    packet = accumulators[0]
    for other in accumulators[1:]:
        packet = packet + other
    for start in range(full4, full, _EIGEN_PACKET):
        packet = packet + values[:, start : start + _EIGEN_PACKET]
    scalar = np.zeros((n,), np.float16)
    for column in range(full, m):
        scalar = scalar + values[:, column]
    return scalar + _eigen_packet_total(packet)


def _eigen_half_row_sums(values: np.ndarray, first: int = 0) -> np.ndarray:
    """Sums of the rows of (n, m) float16 ``values`` whose first element sits at flat index
    ``first`` of its tensor (same for every row; Eigen aligns its split points on that index)."""
    m = values.shape[1]
    if m <= _EIGEN_PACKET * _EIGEN_HALF_LEAF:
        return _eigen_half_leaf_sum(values)
    split = _EIGEN_PACKET * -(-(first + -(-m // 2)) // _EIGEN_PACKET)
    left = min(split - first, m)
    total = _eigen_half_row_sums(values[:, :left], first)
    if left < m:
        total = total + _eigen_half_row_sums(values[:, left:], split)
    return total


def adm_float16_squared_norms(block: np.ndarray) -> np.ndarray:
    """Squared norms of the rows of a float16 ``block`` as TensorFlow's CPU kernels compute
    ``reduce_sum(square(block), 1)``: float16 squares, Eigen's float16 row sums."""
    with np.errstate(over="ignore"):  # an infinite norm is what sends a block to float32
        return _float16_squared_norms(np.square(block.astype(np.float16)))


def _float16_squared_norms(squares: np.ndarray) -> np.ndarray:
    n, m = squares.shape
    norms = np.empty((n,), np.float16)
    # A row's split points depend on its flat offset modulo the packet size.
    for residue in range(_EIGEN_PACKET if m % _EIGEN_PACKET else 1):
        rows = np.arange(n)
        rows = rows[(rows * m) % _EIGEN_PACKET == residue] if m % _EIGEN_PACKET else rows
        if rows.size:
            norms[rows] = _eigen_half_row_sums(squares[rows], residue)
    return norms


def _squared_distances(rows, cols):
    """Pairwise squared Euclidean distances in float32, clipped at 0 like the ADM evaluator."""
    dot = jnp.matmul(rows, cols.T, precision=jax.lax.Precision.HIGHEST)
    sq = jnp.sum(rows * rows, axis=1)[:, None] - 2.0 * dot + jnp.sum(cols * cols, axis=1)[None, :]
    return jnp.maximum(sq, 0.0)


def _adm_float16_distances(rows, rows_norm16, cols, cols_norm16):
    """One block of ADM's DistanceBlock: float16 distances, or float32 ones for the whole block
    when any float16 entry overflows. The float16 matmul accumulates in float32 and rounds once,
    as TensorFlow's CPU kernel and cuBLAS's default both do; the remaining arithmetic rounds to
    float16 after every operation."""
    rows16, cols16 = rows.astype(jnp.float16), cols.astype(jnp.float16)
    dot16 = jnp.matmul(rows16.astype(jnp.float32), cols16.astype(jnp.float32).T,
                       precision=jax.lax.Precision.HIGHEST).astype(jnp.float16)
    dist16 = jnp.maximum(rows_norm16[:, None] - 2 * dot16 + cols_norm16[None, :], 0)
    return jax.lax.cond(
        jnp.all(jnp.isfinite(dist16)),
        lambda: dist16.astype(jnp.float32),
        lambda: _squared_distances(rows, cols),
    )


def _block_distances(rows, cols, mode):
    """``rows`` and ``cols`` are (features float32, float16 squared norms) pairs."""
    if mode == "float32":
        return _squared_distances(rows[0], cols[0])
    return _adm_float16_distances(rows[0], rows[1], cols[0], cols[1])


@functools.partial(jax.jit, static_argnames=("k", "mode"))
def _merge_nearest(best, rows, cols, cols_valid, k, mode):
    dist = jnp.where(cols_valid[None, :], _block_distances(rows, cols, mode), jnp.inf)
    negated, _ = jax.lax.top_k(-jnp.concatenate([best, dist], axis=1), k + 1)
    return -negated


@functools.partial(jax.jit, static_argnames="mode")
def _within_radii(rows, rows_radii, cols, cols_radii, mode):
    """Which rows lie in some column's ball, and which columns lie in some row's ball."""
    dist = _block_distances(rows, cols, mode)
    rows_in = jnp.any(dist <= cols_radii[None, :], axis=1)
    cols_in = jnp.any(dist <= rows_radii[:, None], axis=0)
    return rows_in, cols_in


def _blocks(features: np.ndarray, block: int):
    """Yields (start, (block of exactly ``block`` rows zero-padded, its float16 squared norms as
    ADM computes them on the unpadded block), number of real rows). Blocks start at multiples of
    ``block``, as ADM's row and column batches do, so its overflow fallback covers the same
    entries."""
    n = features.shape[0]
    for start in range(0, n, block):
        chunk = features[start : start + block]
        real = chunk.shape[0]
        norms = adm_float16_squared_norms(chunk.astype(np.float16))
        if real < block:
            chunk = np.concatenate([chunk, np.zeros((block - real, features.shape[1]), chunk.dtype)])
            norms = np.concatenate([norms, np.zeros((block - real,), np.float16)])
        yield start, (chunk, norms), real


def _as_features(features, name: str) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise ValueError(f"{name} must be (num_samples, dim), got shape {features.shape}")
    return check_finite(features, name)


def check_finite(array: np.ndarray, name: str) -> np.ndarray:
    """`array`, or an error naming how many rows hold NaN or infinite values (a metric of such
    inputs is meaningless, and scipy's matrix square root fails on them obscurely)."""
    finite = np.isfinite(array)
    if not finite.all():
        rows = int((~finite).reshape(len(array), -1).any(axis=1).sum())
        raise UserError(f"{name}: {rows} of {len(array)} rows hold NaN or infinite values; "
                        "the samples they come from are not finite: resample them")
    return array


def _check_mode(distances: str) -> str:
    if distances not in DISTANCE_MODES:
        raise ValueError(f"unknown distances {distances!r}; use one of {DISTANCE_MODES}")
    return distances


def manifold_radii(
    features, k: int = ADM_NEIGHBORHOOD, block_size: int = DEFAULT_DISTANCE_BLOCK,
    distances: str = "adm_float16",
) -> np.ndarray:
    """Squared distance from each row to its k-th nearest neighbour (the row itself is the 0-th)."""
    mode = _check_mode(distances)
    features = _as_features(features, "features")
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} feature vectors, got {n}")
    block = min(block_size, n)
    radii = np.empty((n,), np.float32)
    blocks = list(_blocks(features, block))  # the norms of each block once
    for row_start, rows, num_rows in blocks:
        best = jnp.full((block, k + 1), jnp.inf, jnp.float32)
        for _, cols, num_cols in blocks:
            best = _merge_nearest(best, rows, cols, np.arange(block) < num_cols, k, mode)
        radii[row_start : row_start + num_rows] = np.asarray(best[:num_rows, k])
    return radii


def precision_recall(
    ref_features, sample_features, k: int = ADM_NEIGHBORHOOD, block_size: int = DEFAULT_DISTANCE_BLOCK,
    distances: str = "adm_float16",
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al.) as the ADM evaluator computes them.

    Precision: fraction of samples within the k-NN ball of some reference vector.
    Recall: fraction of reference vectors within the k-NN ball of some sample.
    ``distances="adm_float16"`` (default) rounds the distances as ADM's evaluator does and prints
    its digits; ``"float32"`` computes them in float32 throughout.
    """
    mode = _check_mode(distances)
    ref = _as_features(ref_features, "ref_features")
    samples = _as_features(sample_features, "sample_features")
    if ref.shape[1] != samples.shape[1]:
        raise ValueError(f"feature dims differ: reference {ref.shape[1]}, samples {samples.shape[1]}")
    ref_radii = manifold_radii(ref, k, block_size, mode)
    sample_radii = manifold_radii(samples, k, block_size, mode)
    # ADM batches both sets by the same row/column size, so blocks start at multiples of it.
    ref_block, sample_block = min(block_size, ref.shape[0]), min(block_size, samples.shape[0])
    # Padding rows get radius -inf: nothing lies within them, and their own flags are dropped.
    ref_radii_padded = np.concatenate([ref_radii, np.full((ref_block,), -np.inf, np.float32)])
    sample_radii_padded = np.concatenate([sample_radii, np.full((sample_block,), -np.inf, np.float32)])
    ref_in = np.zeros((ref.shape[0],), bool)
    sample_in = np.zeros((samples.shape[0],), bool)
    sample_blocks = list(_blocks(samples, sample_block))
    for ref_start, ref_rows, num_ref in _blocks(ref, ref_block):
        for sample_start, sample_rows, num_samples in sample_blocks:
            ref_hit, sample_hit = _within_radii(
                ref_rows,
                ref_radii_padded[ref_start : ref_start + ref_block],
                sample_rows,
                sample_radii_padded[sample_start : sample_start + sample_block],
                mode,
            )
            ref_in[ref_start : ref_start + num_ref] |= np.asarray(ref_hit[:num_ref])
            sample_in[sample_start : sample_start + num_samples] |= np.asarray(sample_hit[:num_samples])
    return float(sample_in.mean()), float(ref_in.mean())
