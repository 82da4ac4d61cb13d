"""The DiCo network: structure, init, conditioning, layout ops, variants, FLOPs."""
import csv
import functools
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dico_jax.models import (MODEL_NAMES, OFFICIAL_PARAM_COUNTS, abstract_params, count_params,
                             forward_flops_per_image, get_model)
from dico_jax.models import layers as L

TINY = dict(hidden_size=16, depths=(1, 2, 1, 1, 1), in_channels=1, num_classes=10)
TSV = os.path.join(os.path.dirname(__file__), "data", "official_state_dict.tsv")


def official_rows(model_name):
    with open(TSV) as f:
        return [r for r in csv.DictReader(f, delimiter="\t") if r["model"] == model_name]


def _inputs(n=4, hw=8, c=1, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, hw, hw, c)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, n))
    y = jnp.asarray(rng.integers(0, 10, n))
    return x, t, y


def random_params(model, std=0.1, seed=1):
    """Random values for every parameter (zero-initialized ones too), without compiling init."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(std * rng.standard_normal(s.shape), jnp.float32),
        abstract_params(model, 8, 8))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_count_matches_official(name):
    assert count_params(abstract_params(get_model(name))) == OFFICIAL_PARAM_COUNTS[name]


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="DiCo-S.*DiCo-XL"):
        get_model("DiCo-XXL")
    with pytest.raises(ValueError, match="unknown model fields"):
        get_model("DiCo-S", widht=3)


def test_fresh_model_outputs_exact_zero():
    model = get_model("DiCo-S", **TINY)
    x, t, y = _inputs()
    params = jax.jit(model.init)({"params": jax.random.key(0)}, x, t, y)["params"]
    out = jax.jit(model.apply)({"params": params}, x, t, y)
    assert out.shape == (4, 8, 8, 2)
    assert float(jnp.abs(out).max()) == 0.0


def test_init_matches_official_scheme_dico_s():
    """Zeros where the official init has zeros; elsewhere the std of the official init."""
    from dico_jax.convert import flax_to_torch

    model = get_model("DiCo-S")
    x = jnp.zeros((1, 8, 8, 4))
    t = jnp.zeros((1,), jnp.int32)
    params = jax.jit(lambda k: model.init({"params": k}, x, t, t)["params"])(jax.random.key(0))
    ours = flax_to_torch(params, "DiCo-S")
    rows = official_rows("DiCo-S")
    assert [r["key"] for r in rows] == list(ours), "official state_dict order differs"
    checked = 0
    for r in rows:
        w = ours[r["key"]].numpy()
        if r["init"] == "zeros":
            assert not np.any(w), r["key"]
        elif w.size >= 4096:
            std = float(r["init"].split("=")[1])
            assert abs(w.std() - std) / std < 0.05, (r["key"], w.std(), std)
            checked += 1
    assert checked > 100


def test_label_dropout_and_forced_null():
    model = get_model("DiCo-S", **TINY)
    x, t, y = _inputs(n=64)
    params = random_params(model)
    run = jax.jit(lambda y, drop, key: (
        model.apply({"params": params}, x, t, y),
        model.apply({"params": params}, x, t, y, force_drop=drop),
        model.apply({"params": params}, x, t, y, train=True, rngs={"dropout": key})))
    forced = jnp.arange(64) % 2 == 0
    eval_out, out, train = run(y, forced, jax.random.key(3))
    null_out = run(jnp.full_like(y, 10), forced, jax.random.key(3))[0]
    np.testing.assert_array_equal(out[::2], null_out[::2])
    np.testing.assert_array_equal(out[1::2], eval_out[1::2])
    # Training: about 10% of rows take the null label, chosen by the dropout key.
    dropped = np.array([np.array_equal(train[i], null_out[i]) for i in range(64)])
    kept = np.array([np.array_equal(train[i], eval_out[i]) for i in range(64)])
    assert np.all(dropped ^ kept)
    assert 1 <= dropped.sum() <= 20
    again = run(y, forced, jax.random.key(3))[2]
    np.testing.assert_array_equal(train, again)
    other = run(y, forced, jax.random.key(4))[2]
    assert not np.array_equal(train, other)


def test_pixel_shuffle_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((2, 6, 8, 12)).astype(np.float32)
    ours = np.asarray(L.pixel_unshuffle(jnp.asarray(x)))
    ref = torch.nn.functional.pixel_unshuffle(torch.from_numpy(x).permute(0, 3, 1, 2), 2)
    np.testing.assert_array_equal(ours, ref.permute(0, 2, 3, 1).numpy())
    back = np.asarray(L.pixel_shuffle(jnp.asarray(ours)))
    np.testing.assert_array_equal(back, x)
    ref_up = torch.nn.functional.pixel_shuffle(torch.from_numpy(x).permute(0, 3, 1, 2), 2)
    np.testing.assert_array_equal(np.asarray(L.pixel_shuffle(jnp.asarray(x))),
                                  ref_up.permute(0, 2, 3, 1).numpy())


def _layer_norm_by_autodiff(x, shift, scale):
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    y = (xf - mean) / jnp.sqrt(((xf - mean) ** 2).mean(-1, keepdims=True) + L.LN_EPS)
    return (y * (1 + scale[:, None, None]) + shift[:, None, None]).astype(x.dtype)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
def test_modulated_layer_norm_gradient_matches_autodiff(dtype, tol):
    kx, ks, kc, kg = jax.random.split(jax.random.key(3), 4)
    x = (3.0 * jax.random.normal(kx, (2, 4, 5, 48)) + 1.5).astype(dtype)
    shift, scale = 0.3 * jax.random.normal(ks, (2, 48)), 0.3 * jax.random.normal(kc, (2, 48))
    dy = jax.random.normal(kg, x.shape).astype(dtype)
    ours = jax.vjp(L.modulated_layer_norm, x, shift, scale)
    ref = jax.vjp(_layer_norm_by_autodiff, x, shift, scale)
    np.testing.assert_allclose(np.asarray(ours[0], np.float32), np.asarray(ref[0], np.float32),
                               rtol=tol, atol=tol)
    for got, want, name in zip(ours[1](dy), ref[1](dy), ("x", "shift", "scale")):
        assert got.dtype == want.dtype, name
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err < tol, f"d{name}: relative error {err:.2e}"


def test_layer_norm_gradient_reads_the_saved_statistics():
    """The statistics leave the forward rule through an optimization barrier, so XLA keeps
    them for the backward pass instead of recomputing them inside each consumer (which on
    XLA:GPU wrote a full-size fp32 tensor per layer norm; docs/performance.md). The barrier sits
    in the gradient's forward rule only: inference has none."""
    x = jnp.ones((2, 4, 4, 8), jnp.bfloat16)
    shift = scale = jnp.zeros((2, 8))

    def grads(x, shift, scale, dy):
        return jax.vjp(L.modulated_layer_norm, x, shift, scale)[1](dy)

    barriers = re.findall(r"stablehlo.optimization_barrier (.*) :",
                          jax.jit(grads).lower(x, shift, scale, x).as_text())
    assert len(barriers) == 1 and barriers[0].count("%") == 2, barriers  # mean and 1/std
    assert "optimization_barrier" not in jax.jit(L.modulated_layer_norm).lower(
        x, shift, scale).as_text()


def test_gelu_value_and_gradient_match_exact_erf_gelu():
    x = jnp.linspace(-9.0, 9.0, 2001)
    ref_y, ref_vjp = jax.vjp(lambda v: jax.nn.gelu(v, approximate=False), x)
    y, vjp = jax.vjp(L.gelu, x)
    dy = jnp.cos(x)
    np.testing.assert_allclose(y, ref_y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(vjp(dy)[0], ref_vjp(dy)[0], rtol=1e-5, atol=1e-6)
    # bf16 in, bf16 out, computed in fp32: within one bf16 rounding of the fp32 result.
    xb = x.astype(jnp.bfloat16)
    yb, vjpb = jax.vjp(L.gelu, xb)
    assert yb.dtype == vjpb(dy.astype(jnp.bfloat16))[0].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(yb, np.float32),
                               jax.nn.gelu(xb.astype(jnp.float32), approximate=False),
                               rtol=8e-3, atol=1e-6)


def test_timestep_embedding_formula():
    t = jnp.array([0.0, 1.0, 999.0])
    emb = np.asarray(L.timestep_embedding(t, 256))
    k = 5
    f = math.exp(-math.log(10000) * k / 128)
    np.testing.assert_allclose(emb[2, k], math.cos(999 * f), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(emb[2, 128 + k], math.sin(999 * f), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(emb[0, :128], 1.0)


@pytest.mark.parametrize("impl", ["conv", "shift"])
def test_depthwise_input_bias_equals_convolving_the_sum(impl):
    """The input bias is convolved once as a map; at the borders the zero padding cuts taps,
    so the map is not a constant there. Values and all gradients as convolving x + b."""
    kx, kk, kb, kc = jax.random.split(jax.random.key(7), 4)
    x = jax.random.normal(kx, (2, 5, 6, 12))
    kernel, bias = jax.random.normal(kk, (3, 3, 12)), jax.random.normal(kb, (12,))
    in_bias = jax.random.normal(kc, (12,))
    folded = lambda x, k, b, c: L.depthwise3x3(x, k, b, impl, input_bias=c)  # noqa: E731
    summed = lambda x, k, b, c: L.depthwise3x3(x + c, k, b, impl)  # noqa: E731
    args = (x, kernel, bias, in_bias)
    got, got_vjp = jax.vjp(folded, *args)
    want, want_vjp = jax.vjp(summed, *args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got[:, 0] - folded(x, kernel, bias, 0 * in_bias)[:, 0],
                           got[:, 2] - folded(x, kernel, bias, 0 * in_bias)[:, 2])
    dy = jnp.cos(want)
    for g, w in zip(got_vjp(dy), want_vjp(dy)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.long  # all depthwise, scan, remat and norm variants against each other (slow)
def test_variants_agree_depthwise_scan_remat():
    """shift vs conv depthwise, Python loop vs scan, remat, the Pallas layer norms (through
    Pallas's interpreter here): same function, same gradient."""
    x, t, y = _inputs()
    base = get_model("DiCo-S", **TINY, depthwise_impl="conv")
    params = random_params(base)

    def loss_and_grad(model):
        f = lambda p: jnp.mean(model.apply({"params": p}, x, t, y) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(f))(params)

    ref_loss, ref_grad = loss_and_grad(base)
    for variant in (dict(depthwise_impl="shift", scan=False), dict(remat="full"),
                    dict(remat="dots"), dict(remat="linear", scan=False),
                    dict(norm_impl="pallas_interpret", remat="linear"),
                    dict(norm_impl="pallas_interpret", scan=False)):
        loss, grad = loss_and_grad(base.clone(**variant))
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=str(variant))
        for a, b in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(ref_grad)):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6, err_msg=str(variant))


def test_linear_remat_keeps_the_named_linear_outputs_only(capsys):
    """remat="linear" saves the block input and the outputs of its linear maps; layer norms,
    GELUs and the attention product are recomputed in the backward pass."""
    from jax.ad_checkpoint import print_saved_residuals

    from dico_jax.models import layers as L
    from dico_jax.models.dico import REMAT_POLICIES

    n, hw, d = 2, 4, 8
    p = jax.tree.map(lambda s: jnp.full(s, 0.01), {
        "adaLN_modulation": {"kernel": (d, 6 * d), "bias": (6 * d,)},
        "conv1": {"kernel": (d, d), "bias": (d,)}, "conv2": {"kernel": (3, 3, d), "bias": (d,)},
        "ca": {"kernel": (d, d), "bias": (d,)}, "conv3": {"kernel": (d, d), "bias": (d,)},
        "conv4": {"kernel": (d, 2 * d), "bias": (2 * d,)},
        "conv5": {"kernel": (2 * d, d), "bias": (d,)}}, is_leaf=lambda s: isinstance(s, tuple))
    x, c = jnp.ones((n, hw, hw, d)), jnp.ones((n, d))

    def saved_activations(policy):
        # As BlockStack runs a block under a policy: the policy alone picks the residuals.
        block = jax.checkpoint(functools.partial(L.dico_block, pin_residuals=False),
                               policy=policy)
        capsys.readouterr()
        print_saved_residuals(lambda p, x, c: block(p, x, c).sum(), p, x, c)
        lines = [ln for ln in capsys.readouterr().out.splitlines()
                 if ln.startswith(f"f32[{n},{hw},{hw},")]
        return sorted(ln.split("'")[1] if " named '" in ln else ln.split(" from ")[1]
                      for ln in lines)

    assert saved_activations(REMAT_POLICIES["linear"]) == sorted(
        ["the argument x", "conv1", "depthwise", "conv3", "residual", "conv4", "conv5"])
    # Saving everything keeps more (the layer norm, GELU and attention outputs too); full
    # remat keeps the input only.
    assert len(saved_activations(jax.checkpoint_policies.everything_saveable)) > 7
    assert saved_activations(REMAT_POLICIES["full"]) == ["the argument x"]


def test_bf16_compute_keeps_fp32_params_and_tracks_fp32():
    x, t, y = _inputs()
    model = get_model("DiCo-S", **TINY, dtype="bfloat16")
    abstract = jax.eval_shape(model.init, {"params": jax.random.key(0)}, x, t, y)["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(abstract))
    params = random_params(model)
    out16 = jax.jit(model.apply)({"params": params}, x, t, y)
    out32 = jax.jit(get_model("DiCo-S", **TINY).apply)({"params": params}, x, t, y)
    assert out16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert rel < 0.05


def test_bad_input_shapes():
    model = get_model("DiCo-S", **TINY)
    x, t, y = _inputs()
    with pytest.raises(ValueError, match="divisible by 4"):
        model.init({"params": jax.random.key(0)}, jnp.zeros((1, 6, 6, 1)), t[:1], y[:1])
    with pytest.raises(ValueError, match=r"\(N, H, W, 1\)"):
        model.init({"params": jax.random.key(0)}, jnp.zeros((1, 8, 8, 3)), t[:1], y[:1])


def test_forward_flops_dico_s_matches_paper():
    # Paper: 4.25 GMACs per 256x256 image (32x32x4 latent); XLA counts 2 FLOPs per MAC.
    flops = forward_flops_per_image(get_model("DiCo-S"), 32, 32)
    assert abs(flops / (2 * 4.25e9) - 1) < 0.05, flops


@pytest.mark.slow
@pytest.mark.parametrize("name,gmacs", [("DiCo-B", 16.88), ("DiCo-L", 60.24), ("DiCo-XL", 87.30)])
def test_forward_flops_match_paper(name, gmacs):
    flops = forward_flops_per_image(get_model(name), 32, 32)
    assert abs(flops / (2 * gmacs * 1e9) - 1) < 0.05, flops


def test_rbg_init_is_identical_across_shardings():
    """The trainer draws parameters with the rbg generator (cheap to compile); a sharded init
    must give the same values as an unsharded one."""
    from dico_jax import sharding
    from dico_jax.train_step import seed_keys

    model = get_model("DiCo-S", **TINY)
    x, t, y = _inputs(n=1)
    init = lambda k: model.init({"params": k}, x, t, y)["params"]  # noqa: E731
    key, _ = seed_keys(0)
    mesh = sharding.create_mesh({"data": 2, "fsdp": 4})
    shardings = sharding.param_shardings(jax.eval_shape(init, key), mesh, 64)
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree_util.tree_leaves(shardings))
    sharded = jax.jit(init, out_shardings=shardings)(key)
    for a, b in zip(jax.tree_util.tree_leaves(sharded), jax.tree_util.tree_leaves(jax.jit(init)(key))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
