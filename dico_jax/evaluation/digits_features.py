"""A small classifier of the built-in 8x8 digits, used as the feature network of their metrics.

It plays Inception's part for the digits demo: penultimate activations (64-d) give FID and
precision/recall, class logits give the Inception Score and the accuracy of class-conditional
samples. It trains from a fixed seed in a few seconds on a CPU; the parameters can be cached.
"""
from __future__ import annotations

import functools
import os

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from dico_jax import storage
from dico_jax.errors import UserError
from dico_jax.data.digits import NUM_CLASSES, NUM_EXAMPLES, digits_arrays
from dico_jax.evaluation import metrics

FEATURE_DIM = 64
HIDDEN_DIM = 256
HELDOUT_COUNT = 360
TRAIN_STEPS = 600
BATCH_SIZE = 128
LEARNING_RATE = 2e-3
SEED = 0
# Changing the network or its training changes this name, so stale caches are never read.
CACHE_NAME = f"digits_features_mlp{HIDDEN_DIM}_f{FEATURE_DIM}_s{TRAIN_STEPS}_seed{SEED}.msgpack"


class DigitsFeatureNet(nn.Module):
    """(N, 8, 8, 1) in [-1, 1] -> (features (N, 64), logits (N, 10))."""

    @nn.compact
    def __call__(self, x):
        # Dense layers only: XLA's CPU convolutions train this size of model far slower than matmuls.
        x = nn.relu(nn.Dense(HIDDEN_DIM, name="hidden")(x.reshape(x.shape[0], -1)))
        # Pre-activation features: no unit is exactly dead, so feature covariances stay full rank.
        features = nn.Dense(FEATURE_DIM, name="penultimate")(x)
        logits = nn.Dense(NUM_CLASSES, name="classifier")(nn.relu(features))
        return features, logits


def heldout_split() -> tuple[np.ndarray, np.ndarray]:
    """Fixed (train indices, held-out indices) of the digits."""
    order = np.random.default_rng(SEED).permutation(NUM_EXAMPLES)
    return np.sort(order[HELDOUT_COUNT:]), np.sort(order[:HELDOUT_COUNT])


@jax.jit
def _train(images, labels, key):
    model = DigitsFeatureNet()
    init_key, data_key = jax.random.split(key)
    params = model.init(init_key, images[:1])["params"]
    optimizer = optax.adamw(LEARNING_RATE, weight_decay=1e-4)

    def loss_fn(p, x, y):
        _, logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(carry, step_key):
        p, opt_state = carry
        idx = jax.random.choice(step_key, images.shape[0], (BATCH_SIZE,), replace=False)
        grads = jax.grad(loss_fn)(p, images[idx], labels[idx])
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), None

    keys = jax.random.split(data_key, TRAIN_STEPS)
    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), keys)
    return params


def train_digits_feature_net() -> dict:
    """Trains the network on the train split (deterministic: fixed seed, fixed split)."""
    images, labels = digits_arrays()
    train_idx, _ = heldout_split()
    params = _train(jnp.asarray(images[train_idx]), jnp.asarray(labels[train_idx]), jax.random.key(SEED))
    return jax.tree_util.tree_map(np.asarray, params)


def _params_template() -> dict:
    shapes = jax.eval_shape(DigitsFeatureNet().init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])


@functools.lru_cache(maxsize=None)
def _trained_params_in_memory() -> dict:
    return train_digits_feature_net()


def digits_feature_params(cache_dir: str | None = None) -> dict:
    """Trained parameters: read from ``cache_dir`` when cached there, else trained (and cached)."""
    if cache_dir is None:
        return _trained_params_in_memory()
    path = os.path.join(cache_dir, CACHE_NAME)
    template = _params_template()
    if epath.Path(path).is_file():
        try:
            params = flax.serialization.from_bytes(template, epath.Path(path).read_bytes())
            if jax.tree_util.tree_all(
                jax.tree_util.tree_map(lambda a, b: np.shape(a) == np.shape(b), params, template)
            ):
                return params
        except (ValueError, KeyError, TypeError):
            pass  # an unreadable cache is retrained and replaced below
    params = _trained_params_in_memory()
    storage.atomic_write(path, lambda f: f.write(flax.serialization.to_bytes(params)))
    return params


def as_digit_images(samples) -> np.ndarray:
    """Samples as (N, 8, 8, 1) float32 in [-1, 1].

    uint8 pixels u map to u / 127.5 - 1, the middle of the values that the sampler's
    truncating 127.5 x + 128 turns into u.
    """
    samples = np.asarray(samples)
    if samples.ndim == 3:
        samples = samples[..., None]
    if samples.ndim != 4 or samples.shape[1:] != (8, 8, 1):
        raise ValueError(f"digit samples must be (N, 8, 8) or (N, 8, 8, 1), got shape {samples.shape}")
    if samples.dtype == np.uint8:
        return samples.astype(np.float32) / 127.5 - 1.0
    if not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f"digit samples must be uint8 or float in [-1, 1], got dtype {samples.dtype}")
    if not np.isfinite(samples).all():
        bad = int((~np.isfinite(samples)).any(axis=(1, 2, 3)).sum())
        raise UserError(f"{bad} of {len(samples)} digit samples hold NaN or infinite values; "
                        "resample them (the run or its guidance scale produced them)")
    low, high = float(samples.min(initial=0.0)), float(samples.max(initial=0.0))
    if low < -1.5 or high > 1.5:
        raise ValueError(f"float digit samples must lie in [-1, 1], found values in [{low:.3g}, {high:.3g}]")
    return samples.astype(np.float32)


@jax.jit
def _apply(params, images):
    return DigitsFeatureNet().apply({"params": params}, images)


def digits_features(images, params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, 64), logits (N, 10)) of digit samples (see ``as_digit_images``)."""
    params = digits_feature_params() if params is None else params
    features, logits = _apply(params, jnp.asarray(as_digit_images(images)))
    return np.asarray(features), np.asarray(logits)


def digits_metrics(samples, labels=None, reference=None, cache_dir: str | None = None) -> dict:
    """FID, IS, precision, recall of digit samples against ``reference`` (default: all real digits).

    With ``labels`` (the classes the samples were asked for), also the classifier's accuracy on
    them: how often a class-conditional sample shows its class.
    """
    params = digits_feature_params(cache_dir)
    if reference is None:
        reference = digits_arrays()[0]
    sample_features, sample_logits = digits_features(samples, params)
    ref_features, _ = digits_features(reference, params)
    fid = metrics.frechet_distance(
        *metrics.feature_statistics(sample_features), *metrics.feature_statistics(ref_features)
    )
    precision, recall = metrics.precision_recall(ref_features, sample_features)
    result = {
        "fid": fid,
        "is": metrics.inception_score_from_logits(sample_logits),
        "precision": precision,
        "recall": recall,
        "num_samples": int(sample_features.shape[0]),
        "num_reference": int(ref_features.shape[0]),
    }
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != sample_features.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {sample_features.shape[0]} samples")
        result["accuracy"] = float(np.mean(np.argmax(sample_logits, axis=1) == labels))
    return result
