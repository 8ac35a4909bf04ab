"""GELU with float32 inside (jaxgpt/gelu.py) against jax.nn.gelu and a float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.kernels.gelu import gelu


def _gelu64(x):
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


X = jax.random.normal(jax.random.key(0), (20000,)) * 4.0


def test_float32_forward_is_jax_gelu_bit_for_bit():
    np.testing.assert_array_equal(jax.jit(gelu)(X),
                                  jax.jit(lambda x: jax.nn.gelu(x, approximate=True))(X))


def test_gradient_matches_a_float64_central_difference():
    """Float32 arithmetic near x << 0 cancels (1 + tanh -> 0): no worse than autodiff of
    jax.nn.gelu, which makes the same error, and close to it."""
    x64 = np.asarray(X, np.float64)
    h = 1e-5
    want = (_gelu64(x64 + h) - _gelu64(x64 - h)) / (2 * h)
    got = np.asarray(jax.grad(lambda x: jnp.sum(gelu(x)))(X), np.float64)
    autodiff = np.asarray(jax.grad(lambda x: jnp.sum(jax.nn.gelu(x, approximate=True)))(X))
    assert np.abs(got - want).max() <= np.abs(autodiff - want).max() + 1e-7
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got, autodiff, atol=1e-6)


def test_bfloat16_rounds_once():
    """On bfloat16 the value and the input gradient are the float64 ones rounded once (at
    most half a unit in the last place: 2**-8 relative, plus float32 noise), more accurate
    than jax.nn.gelu's chain of bfloat16 operations; the dtype is kept."""
    xb = X.astype(jnp.bfloat16)
    x64 = np.asarray(xb.astype(jnp.float32), np.float64)
    exact = _gelu64(x64)
    y = gelu(xb)
    assert y.dtype == jnp.bfloat16
    err = np.abs(np.asarray(y.astype(jnp.float32), np.float64) - exact)
    assert np.all(err <= 2.0**-8 * np.abs(exact) + 1e-6)
    chain = jax.nn.gelu(xb, approximate=True).astype(jnp.float32)
    assert err.mean() < np.abs(np.asarray(chain, np.float64) - exact).mean()

    g = jax.grad(lambda x: jnp.sum(gelu(x).astype(jnp.float32)))(xb)
    assert g.dtype == jnp.bfloat16
    slope = (_gelu64(x64 + 1e-6) - _gelu64(x64 - 1e-6)) / 2e-6
    gerr = np.abs(np.asarray(g.astype(jnp.float32), np.float64) - slope)
    assert np.all(gerr <= 2.0**-8 * np.abs(slope) + 1e-5)
