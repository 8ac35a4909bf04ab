"""The layout-spelled matmul and the CPU dense path equal the plain dot and the reference dense
(flax's arithmetic), in value and in gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.kernels.dense import (
    layout_dense,
    layout_project,
    reference_dense,
    reference_project,
)
from jaxgpt.kernels.matmul import matmul


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


@pytest.mark.parametrize("n_in, shape_x, shape_w", [
    (1, (2, 3, 4), (4, 5, 6)),  # [B, T, D] x [D, H, K]
    (2, (2, 3, 4, 5), (4, 5, 6)),  # [B, T, H, K] x [H, K, D]
])
@pytest.mark.parametrize("bias", [False, True])
def test_layout_dense_equals_reference_dense(n_in, shape_x, shape_w, bias):
    x, w = _inputs(shape_x, shape_w, jnp.float32)
    b = jax.random.normal(jax.random.key(4), shape_w[n_in:]) if bias else None
    want = reference_dense(x, w, b, n_in, jnp.float32)
    got = layout_dense(x, w, b, n_in, jnp.float32)
    assert got.shape == want.shape == shape_x[:-n_in] + shape_w[n_in:]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    loss = lambda f: lambda x, w, b: jnp.sum(jnp.sin(f(x, w, b, n_in, jnp.float32)))  # noqa: E731
    argnums = (0, 1, 2) if bias else (0, 1)
    g_got = jax.grad(loss(layout_dense), argnums)(x, w, b)
    g_want = jax.grad(loss(reference_dense), argnums)(x, w, b)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_got, g_want)


@pytest.mark.parametrize("project", [layout_project, reference_project])
@pytest.mark.parametrize("rhs_t", [False, True])
def test_project_equals_einsum_on_either_path(project, rhs_t):
    x, w = _inputs((2, 3, 5), (4, 5) if rhs_t else (5, 4), jnp.float32)
    want = jnp.einsum("btc,nc->btn" if rhs_t else "btc,cn->btn", x, w)
    got = project(x, w, rhs_t, jnp.float32)
    assert got.shape == (2, 3, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rhs_t", [False, True])
def test_float32_weight_with_bfloat16_input_gets_an_unrounded_float32_gradient(rhs_t):
    """On the layout path the weight is cast inside the matmul: same value as casting it first,
    and its gradient is the float32 product of the bfloat16 operands, not that product rounded
    to bfloat16 (which the plain dot elsewhere still does, like torch autocast)."""
    x, _ = _inputs((2, 24, 40), (1,), jnp.bfloat16)
    _, w = _inputs((1,), (30, 40) if rhs_t else (40, 30), jnp.float32, seed=2)
    probe = jax.random.normal(jax.random.key(3), (2, 24, 30))

    def loss(w, cast_first):
        out = layout_project(x, w.astype(jnp.bfloat16) if cast_first else w, rhs_t, jnp.float32)
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


@pytest.mark.parametrize("kernel_set", ["auto", "reference"])
@pytest.mark.parametrize("kind", ["Dense", "DenseGeneral", "Dense-no-bias"])
def test_model_dense_computes_the_float32_sum_rounded_once(kernel_set, kind):
    """jaxgpt's Dense under the reference set equals flax's Dense/DenseGeneral exactly (value and
    gradients). Under the CPU layout path (auto on CPU) the bias is added to the float32 product,
    one rounding to bfloat16 (flax's default rounds the product, then the sum), and the parameter
    gradients are float32 and equal the float64 reference."""
    import flax.linen as nn

    from jaxgpt.kernels import select
    from jaxgpt.models.layers import Dense

    layout = select(kernel_set).dense is layout_dense
    x, _ = _inputs((3, 6, 8), (1,), jnp.bfloat16)
    init = nn.initializers.normal(0.5)
    feats, flax_layer = {"Dense": ((10,), nn.Dense(10, dtype=jnp.bfloat16)),
                         "Dense-no-bias": ((10,), nn.Dense(10, use_bias=False, dtype=jnp.bfloat16)),
                         "DenseGeneral": ((2, 5), nn.DenseGeneral((2, 5), dtype=jnp.bfloat16))}[kind]
    ours = Dense(feats, (None, None, None)[: 1 + len(feats)], init,
                 None if kind == "Dense-no-bias" else nn.initializers.normal(0.5),
                 dtype=jnp.bfloat16, kernels=kernel_set)
    params = nn.meta.unbox(ours.init(jax.random.key(0), x))
    out = ours.apply(params, x)
    assert out.dtype == jnp.bfloat16 and out.shape == flax_layer.apply(params, x).shape
    probe = jax.random.normal(jax.random.key(6), out.shape)
    loss = lambda layer: lambda prm: jnp.sum(layer.apply(prm, x).astype(jnp.float32) * probe)  # noqa: E731
    grads = jax.grad(loss(ours))(params)
    if not layout:
        np.testing.assert_array_equal(out, flax_layer.apply(params, x))
        jax.tree.map(np.testing.assert_array_equal, grads, jax.grad(loss(flax_layer))(params))
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
