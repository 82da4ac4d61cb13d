"""The Pallas layer-norm kernels (run by Pallas's interpreter here) against XLA's layer norm."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dico_jax import sharding as sharding_lib
from dico_jax.models import get_model, kernels
from dico_jax.models import layers as L

KERNEL = kernels.layer_norm_fn("pallas_interpret")
KERNEL_AND_SKIP = kernels.layer_norm_fn("pallas_interpret", skip=True)


def _args(shape, dtype, seed=0):
    kx, ks, kc, kg, kk = jax.random.split(jax.random.key(seed), 5)
    x = (2.0 * jax.random.normal(kx, shape) + 0.7).astype(dtype)
    shift = 0.5 * jax.random.normal(ks, (shape[0], shape[-1]))
    scale = 0.5 * jax.random.normal(kc, (shape[0], shape[-1]))
    dy = jax.random.normal(kg, shape).astype(dtype)
    dskip = jax.random.normal(kk, shape).astype(dtype)
    return x, shift, scale, dy, dskip


def _close(got, want, tol, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
    assert err < tol, f"{what}: relative error {err:.2e}"


# Shapes: channels below, at and past a power of two (masked columns); pixel counts that leave
# a partial row tile and several backward runs per image (masked rows, partial sums added).
@pytest.mark.parametrize("shape,dtype,tol", [
    ((2, 4, 4, 32), jnp.float32, 1e-6),
    ((3, 8, 6, 130), jnp.float32, 1e-6),
    ((2, 16, 12, 300), jnp.float32, 1e-6),
    ((2, 6, 4, 48), jnp.bfloat16, 1e-2),
])
def test_kernels_match_the_xla_layer_norm(shape, dtype, tol):
    x, shift, scale, dy, dskip = _args(shape, dtype)
    want, want_vjp = jax.vjp(L.modulated_layer_norm, x, shift, scale)
    got, got_vjp = jax.vjp(KERNEL, x, shift, scale)
    assert got.dtype == dtype and got.shape == shape
    _close(got, want, tol, "y")
    want_grads = want_vjp(dy)
    for g, w, name in zip(got_vjp(dy), want_grads, ("x", "shift", "scale")):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        _close(g, w, tol, f"d{name}")

    # The skip variant: same output, x passed through, its gradient added to dx.
    (got, skip), vjp = jax.vjp(KERNEL_AND_SKIP, x, shift, scale)
    assert skip is x or np.array_equal(np.asarray(skip), np.asarray(x))
    _close(got, want, tol, "y (skip)")
    dx, d_shift, d_scale = vjp((dy, dskip))
    _close(dx, want_grads[0].astype(jnp.float32) + dskip.astype(jnp.float32), tol, "dx + dskip")
    _close(d_shift, want_grads[1], tol, "dshift (skip)")
    _close(d_scale, want_grads[2], tol, "dscale (skip)")


def _residual_args(shape, dtype, seed=0):
    x, shift, scale, dy, dr = _args(shape, dtype, seed)
    kz, kb, kg = jax.random.split(jax.random.key(seed + 100), 3)
    z = jax.random.normal(kz, shape).astype(dtype)
    bias = 0.3 * jax.random.normal(kb, shape[-1:])
    gate = jax.random.normal(kg, (shape[0], shape[-1]))
    return (x, z, bias, gate, shift, scale), (dy, dr)


def test_kernels_run_per_batch_shard_under_a_mesh():
    """Under a (data, fsdp) mesh the kernels run on each device's images (shard_map): the
    compiled program moves no activations between devices (the bias gradient's per-shard
    sums are the only values added across them), and the result is the same."""
    mesh = sharding_lib.create_mesh({"data": 2, "fsdp": 4})
    args, (dy, dr) = _residual_args((8, 4, 4, 24), jnp.float32, seed=1)

    def grads(args, dy, dr, impl):
        norm = kernels.layer_norm_fn(impl, skip=True)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            def block(x, z, bias, gate, shift, scale):  # two layer norms around a gated sum
                h, x = norm(x, shift, scale)
                return norm(x + gate[:, None, None, :] * (z + h + bias), shift, scale)

            outs, vjp = jax.vjp(block, *args)
            return outs + vjp((dy, dr))

    split = NamedSharding(mesh, P(sharding_lib.BATCH_AXES))
    placed = [jax.device_put(a, split if a.ndim and a.shape[0] == 8 else
                             NamedSharding(mesh, P())) for a in args]
    dy, dr = (jax.device_put(a, split) for a in (dy, dr))
    step = jax.jit(lambda a, dy, dr: grads(a, dy, dr, "pallas_interpret"))
    hlo = step.lower(placed, dy, dr).compile().as_text()
    gathered = [line for line in hlo.splitlines() if "all-gather(" in line or "all-to-all(" in line
                or ("all-reduce(" in line and "f32[24]" not in line.split("all-reduce(")[0])]
    assert not gathered, gathered[:3]
    want = jax.jit(lambda a, dy, dr: grads(a, dy, dr, "xla"))(placed, dy, dr)
    names = ("y", "r", "dx", "dz", "dbias", "dgate", "dshift", "dscale")
    for got, w, name in zip(step(placed, dy, dr), want, names):
        _close(got, w, 1e-5, name)


def test_kernels_run_only_when_differentiated():
    """Sampling and evaluation keep XLA's layer norm (which XLA fuses with the residual sums
    around it); a gradient brings in the forward and backward kernels."""
    x, shift, scale, dy, _ = _args((2, 4, 4, 16), jnp.float32)
    plain = str(jax.make_jaxpr(KERNEL)(x, shift, scale))
    trained = str(jax.make_jaxpr(lambda *a: jax.vjp(KERNEL, *a[:3])[1](a[3]))(x, shift, scale, dy))
    assert "pallas_call" not in plain
    assert trained.count("pallas_call") == 2, "expected the forward and the backward kernel"
    np.testing.assert_array_equal(KERNEL(x, shift, scale), L.modulated_layer_norm(x, shift, scale))


def test_unknown_norm_impl_is_named():
    model = get_model("DiCo-S", hidden_size=16, depths=(1, 1, 1, 1, 1), in_channels=1,
                      num_classes=10, norm_impl="triton")
    with pytest.raises(ValueError, match="norm_impl must be one of .*'triton'"):
        model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros(1), jnp.zeros(1))


def test_pallas_off_a_gpu_is_named():
    from configs import default
    from dico_jax import train
    from dico_jax.models import check_norm_impl

    config = default.get_config()
    config.model.norm_impl = "pallas"
    assert jax.default_backend() == "cpu"
    with pytest.raises(ValueError, match=r"config\.model\.norm_impl='pallas' .* on 'cpu'"):
        train.validate_config(config)
    with pytest.raises(ValueError, match="on 'tpu'"):
        check_norm_impl("pallas", "tpu")
    check_norm_impl("pallas", "gpu")
    for impl in ("xla", "pallas_interpret"):
        check_norm_impl(impl, "tpu")
    config.model.norm_impl = "pallas_interpret"
    train.validate_config(config)
    # The kernels give no forward mode, which MeanFlow's objective needs.
    default.use_few_step(config, "meanflow")
    with pytest.raises(ValueError, match=r"config\.model\.norm_impl='pallas_interpret': MeanFlow"):
        train.validate_config(config)
