"""Forward-mode differentiation (jax.jvp, jax.linearize) through the DiCo network.

The hand-written layers (modulated layer norm, GELU, nine-tap depthwise convolution) carry JVP
rules; the reference here is the same network with those layers as plain jnp, differentiated
by JAX itself.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dico_jax.models import get_model
from dico_jax.models import layers as L

from tests.test_models import TINY, _inputs, random_params


def _plain_layer_norm(x, shift, scale, pin_residuals=True):
    return L._mln_apply(x, shift, scale)[0]


def _plain_gelu(x, pin_residuals=True):
    return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


def _plain_depthwise_shift(x, kernel, pin_residuals=True):
    return L._shifted_sum(x, kernel)


@pytest.fixture
def plain_layers(monkeypatch):
    """Within the test, `plain()` is a context in which the network runs on plain-jnp layers."""
    import contextlib

    @contextlib.contextmanager
    def plain():
        with monkeypatch.context() as m:
            m.setattr(L, "_modulated_layer_norm", _plain_layer_norm)
            m.setattr(L, "_gelu", _plain_gelu)
            m.setattr(L, "_depthwise_shift", _plain_depthwise_shift)
            yield
    return plain


def _rel_err(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


@pytest.mark.parametrize("pin", [True, False])
def test_layer_jvps_match_plain_jnp(pin):
    kx, ks, kc, kk, kt = jax.random.split(jax.random.key(0), 5)
    x = 2.0 * jax.random.normal(kx, (2, 5, 6, 16)) + 0.5
    shift, scale = 0.3 * jax.random.normal(ks, (2, 16)), 0.3 * jax.random.normal(kc, (2, 16))
    kernel = jax.random.normal(kk, (3, 3, 16))
    tx, ts, tc, tk = (jax.random.normal(k, a.shape) for k, a in
                      zip(jax.random.split(kt, 4), (x, shift, scale, kernel)))
    cases = [
        (functools.partial(L.modulated_layer_norm, pin_residuals=pin), _plain_layer_norm,
         (x, shift, scale), (tx, ts, tc)),
        (functools.partial(L.gelu, pin_residuals=pin), _plain_gelu, (x,), (tx,)),
        (lambda x, k: L._depthwise_shift(x, k, pin), _plain_depthwise_shift,
         (x, kernel), (tx, tk)),
    ]
    for ours, plain, primals, tangents in cases:
        y, dy = jax.jvp(ours, primals, tangents)
        want_y, want_dy = jax.jvp(plain, primals, tangents)
        np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
        assert _rel_err(dy, want_dy) < 1e-5, ours
        # Second order (the gradient of a JVP) agrees too.
        g = jax.grad(lambda *p: jnp.sum(jnp.cos(jax.jvp(ours, p, tangents)[1])),
                     argnums=tuple(range(len(primals))))(*primals)
        want_g = jax.grad(lambda *p: jnp.sum(jnp.cos(jax.jvp(plain, p, tangents)[1])),
                          argnums=tuple(range(len(primals))))(*primals)
        for a, b in zip(g, want_g):
            assert _rel_err(a, b) < 1e-4, ours


def _model_jvp(model, params, x, t, y, dparams, dx, dt):
    def f(p, x, t):
        return model.apply({"params": p}, x, t, y)
    return jax.jvp(f, (params, x, t), (dparams, dx, dt))


# The block options between them: stacked (scan) and looped blocks, no rematerialization and
# two policies (under which the layers' tangents are not pinned), both depthwise formulations,
# bf16 compute.
VARIANTS = [
    dict(depthwise_impl="shift"),
    dict(depthwise_impl="conv", scan=False, remat="linear"),
    dict(depthwise_impl="shift", remat="dots_no_batch", dtype="bfloat16"),
]


@pytest.mark.long  # minutes per variant; the layer and gradient tests cover the rules
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_model_jvp_matches_plain_jnp_network(variant, plain_layers):
    model = get_model("DiCo-S", **TINY, **variant)
    params = random_params(model)
    x, t, y = _inputs()
    t = t.astype(jnp.float32)
    rng = np.random.default_rng(5)
    dparams = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), params)
    dx, dt = jnp.asarray(rng.standard_normal(x.shape), jnp.float32), jnp.full(t.shape, 30.0)
    args = (model, params, x, t, y, dparams, dx, dt)
    out, dout = jax.jit(_model_jvp, static_argnums=0)(*args)
    out_lin, lin = jax.linearize(lambda p, x, t: model.apply({"params": p}, x, t, y),
                                 params, x, t)
    with plain_layers():
        want, want_dout = jax.jit(lambda *a: _model_jvp(*a), static_argnums=0)(*args)
    tol = 2e-2 if variant.get("dtype") == "bfloat16" else 2e-5
    assert _rel_err(out, want) < tol
    assert _rel_err(dout, want_dout) < tol
    # linearize runs op by op, the jitted JVP fused: equal up to the compute dtype's rounding.
    lin_tol = tol if variant.get("dtype") == "bfloat16" else 1e-5
    assert _rel_err(lin(dparams, dx, dt), dout) < lin_tol
    assert _rel_err(out_lin, out) < lin_tol


@pytest.mark.slow
def test_gradient_of_a_jvp_loss_matches_finite_differences():
    """A loss of the network's JVP (as MeanFlow's target is): its gradient against central
    differences along a random direction (the layers' rules against plain jnp are checked one
    by one above)."""
    model = get_model("DiCo-S", **TINY, depthwise_impl="shift")
    params = random_params(model, std=0.2)
    x, t, y = _inputs(n=2)
    t = t.astype(jnp.float32)
    dx = jnp.asarray(np.random.default_rng(2).standard_normal(x.shape), jnp.float32)

    def loss(p):
        f = lambda x, t: model.apply({"params": p}, x, t, y)  # noqa: E731
        out, dout = jax.jvp(f, (x, t), (dx, jnp.ones_like(t)))
        return jnp.mean(out * dout) + jnp.mean(jnp.square(dout))

    grad = jax.jit(jax.grad(loss))(params)
    direction = jax.tree.map(
        lambda a: jnp.asarray(np.random.default_rng(3).standard_normal(a.shape), a.dtype), params)
    eps = 3e-4  # small: the loss is strongly curved along the direction
    shifted = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, params, direction)  # noqa: E731
    f = jax.jit(loss)
    fd = (float(f(shifted(1.0))) - float(f(shifted(-1.0)))) / (2 * eps)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in
                   zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    assert abs(fd - analytic) <= 1e-2 * abs(analytic) + 1e-5, (fd, analytic)


@pytest.mark.long  # minutes; test_meanflow checks the objective on a point mass
def test_second_timestep_and_a_meanflow_step_through_the_network():
    """The second timestep adds its own embedders (and only then); MeanFlow's loss, one JVP
    of the network inside a gradient, runs through it and its gradient reaches them."""
    from dico_jax.diffusion.meanflow import MeanFlow
    from dico_jax.models import abstract_params

    plain = get_model("DiCo-S", **TINY, depthwise_impl="shift")
    model = plain.clone(second_time=True)
    names = set(abstract_params(model, 8, 8))
    assert names - set(abstract_params(plain, 8, 8)) == {f"h_embedder_{i}" for i in (1, 2, 3)}
    params = random_params(model)
    x, _, y = _inputs()
    r, t = MeanFlow().sample_times(jax.random.key(0), x.shape[0])
    r = r.at[0].set(0.25 * t[0])  # one example with r != t for certain

    def loss(p):
        def u_fn(z, r, t):
            return model.apply({"params": p}, z, 1000.0 * t, y, h=1000.0 * (t - r))
        terms = MeanFlow().training_losses(u_fn, x, r, t, jnp.cos(x))
        return jnp.mean(terms["loss"])

    value, grad = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(float(value))
    assert float(jnp.abs(grad["h_embedder_1"]["mlp_0"]["kernel"]).max()) > 0
    with pytest.raises(ValueError, match="second timestep"):
        plain.apply({"params": random_params(plain)}, x, 1000.0 * t, y, h=t)
