"""The layout-spelled matmul equals the plain dot, in value and in gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.kernels.matmul import dense_dot_general, matmul


def _inputs(shape_x, shape_w, dtype, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(kx, shape_x, jnp.float32).astype(dtype),
            jax.random.normal(kw, shape_w, jnp.float32).astype(dtype))


@pytest.mark.parametrize("rhs_t", [False, True])
def test_matmul_value_and_grads_equal_the_plain_dot(rhs_t):
    x, w = _inputs((7, 5), (3, 5) if rhs_t else (5, 3), jnp.float32)
    probe = jax.random.normal(jax.random.key(1), (7, 3))  # a non-uniform cotangent

    def ours(x, w):
        return jnp.sum(matmul(x, w, rhs_t, jnp.float32) * probe)

    def plain(x, w):
        return jnp.sum((x @ (w.T if rhs_t else w)) * probe)

    np.testing.assert_allclose(ours(x, w), plain(x, w), rtol=1e-6)
    for a, b in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_matmul_accumulates_in_float32_and_keeps_dtypes():
    x, w = _inputs((16, 64), (64, 8), jnp.bfloat16)
    out = matmul(x, w, False, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    exact = np.asarray(x, np.float32) @ np.asarray(w, np.float32)
    np.testing.assert_allclose(np.asarray(out, np.float32), exact, rtol=1e-2, atol=1e-2)
    gx, gw = jax.grad(lambda x, w: jnp.sum(matmul(x, w, False, jnp.float32)), (0, 1))(x, w)
    assert gx.dtype == gw.dtype == jnp.bfloat16


@pytest.mark.parametrize("dims, shape_x, shape_w", [
    ((((2,), (0,)), ((), ())), (2, 3, 4), (4, 5, 6)),  # Dense to [H, K]: [B, T, D] x [D, H, K]
    ((((2, 3), (0, 1)), ((), ())), (2, 3, 4, 5), (4, 5, 6)),  # [B, T, H, K] x [H, K, D]
    ((((1,), (1,)), ((), ())), (3, 4), (5, 4)),  # not a Dense contraction: left to lax
])
def test_dense_dot_general_equals_lax_dot_general(dims, shape_x, shape_w):
    x, w = _inputs(shape_x, shape_w, jnp.float32)
    want = jax.lax.dot_general(x, w, dims)
    got = dense_dot_general(x, w, dims)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    g_got = jax.grad(lambda w: jnp.sum(jnp.sin(dense_dot_general(x, w, dims))))(w)
    g_want = jax.grad(lambda w: jnp.sum(jnp.sin(jax.lax.dot_general(x, w, dims))))(w)
    np.testing.assert_allclose(g_got, g_want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout_matmul", [True, False])
@pytest.mark.parametrize("rhs_t", [False, True])
def test_project_equals_einsum_on_either_path(monkeypatch, layout_matmul, rhs_t):
    import jaxgpt.kernels.matmul as mm

    monkeypatch.setattr(mm, "use_layout_matmul", lambda: layout_matmul)
    x, w = _inputs((2, 3, 5), (4, 5) if rhs_t else (5, 4), jnp.float32)
    want = jnp.einsum("btc,nc->btn" if rhs_t else "btc,cn->btn", x, w)
    got = mm.project(x, w, rhs_t, jnp.float32)
    assert got.shape == (2, 3, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rhs_t", [False, True])
def test_float32_weight_with_bfloat16_input_gets_an_unrounded_float32_gradient(monkeypatch, rhs_t):
    """On the layout path the weight is cast inside the matmul: same value as casting it first,
    and its gradient is the float32 product of the bfloat16 operands, not that product rounded
    to bfloat16 (which the plain dot elsewhere still does, like torch autocast)."""
    import jaxgpt.kernels.matmul as mm

    monkeypatch.setattr(mm, "use_layout_matmul", lambda: True)
    x, _ = _inputs((2, 24, 40), (1,), jnp.bfloat16)
    _, w = _inputs((1,), (30, 40) if rhs_t else (40, 30), jnp.float32, seed=2)
    probe = jax.random.normal(jax.random.key(3), (2, 24, 30))

    def loss(w, cast_first):
        out = mm.project(x, w.astype(jnp.bfloat16) if cast_first else w, rhs_t, jnp.float32)
        return jnp.sum(out * probe)

    np.testing.assert_array_equal(loss(w, False), loss(w, True))
    gw = jax.grad(loss)(w, False)
    assert gw.dtype == jnp.float32
    # Reference in float64 from the bfloat16-rounded operands the matmul actually multiplies.
    x64 = np.asarray(x, np.float64).reshape(-1, 40)
    g64 = np.asarray(np.asarray(probe, jnp.bfloat16), np.float64).reshape(-1, 30)
    want = (g64.T @ x64) if rhs_t else (x64.T @ g64)
    np.testing.assert_allclose(gw, want, rtol=1e-5, atol=1e-5)
    rounded = np.asarray(jax.grad(loss)(w, True), np.float64)  # cast outside: bfloat16 gradient
    assert np.abs(rounded - want).max() > 10 * np.abs(np.asarray(gw, np.float64) - want).max()


@pytest.mark.parametrize("layout_matmul", [True, False])
@pytest.mark.parametrize("kind", ["Dense", "DenseGeneral", "Dense-no-bias"])
def test_dense_layers_with_kept_kernels_compute_the_float32_sum_rounded_once(
        monkeypatch, layout_matmul, kind):
    """keep_kernel_dtype hands kernel and bias to dense_dot_general. On the layout path the bias
    is added to the float32 product, one rounding to bfloat16 (flax's default rounds the
    product, then the sum), and the parameter gradients are float32 and equal the float64
    reference. On the plain path (off CPU) everything equals flax's default exactly."""
    import flax.linen as nn

    import jaxgpt.kernels.matmul as mm

    monkeypatch.setattr(mm, "use_layout_matmul", lambda: layout_matmul)
    x, _ = _inputs((3, 6, 8), (1,), jnp.bfloat16)
    make = {"Dense": lambda **kw: nn.Dense(10, **kw),
            "Dense-no-bias": lambda **kw: nn.Dense(10, use_bias=False, **kw),
            "DenseGeneral": lambda **kw: nn.DenseGeneral((2, 5), **kw)}[kind]
    layer = lambda **kw: make(dtype=jnp.bfloat16, dot_general=dense_dot_general, **kw)  # noqa: E731
    params = layer().init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(5), p.shape), params)
    ours = layer(promote_dtype=mm.keep_kernel_dtype)
    out = ours.apply(params, x)
    assert out.dtype == jnp.bfloat16 and out.shape == layer().apply(params, x).shape
    probe = jax.random.normal(jax.random.key(6), out.shape)
    loss = lambda layer: lambda prm: jnp.sum(layer.apply(prm, x).astype(jnp.float32) * probe)  # noqa: E731
    grads = jax.grad(loss(ours))(params)
    if not layout_matmul:
        np.testing.assert_array_equal(out, layer().apply(params, x))
        jax.tree.map(np.testing.assert_array_equal, grads, jax.grad(loss(layer()))(params))
        return

    p = params["params"]
    x64 = np.asarray(x, np.float64).reshape(18, 8)
    w64 = np.asarray(np.asarray(p["kernel"], jnp.bfloat16), np.float64).reshape(8, 10)
    b32 = np.asarray(p["bias"], np.float32).reshape(10) if "bias" in p else np.zeros(10, np.float32)
    want = (np.asarray(jnp.asarray(x64 @ w64, jnp.float32)) + b32).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out).reshape(18, 10), want)

    g64 = np.asarray(np.asarray(probe, jnp.bfloat16), np.float64).reshape(18, 10)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    np.testing.assert_allclose(np.asarray(grads["params"]["kernel"]).reshape(8, 10), x64.T @ g64,
                               rtol=1e-5, atol=1e-5)
    if "bias" in p:
        np.testing.assert_allclose(np.asarray(grads["params"]["bias"]).reshape(10), g64.sum(0),
                                   rtol=1e-5, atol=1e-5)
