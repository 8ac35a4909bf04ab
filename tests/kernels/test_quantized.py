"""The int8 weight-only kernel against float64 numpy: the product is the dequantized matmul up to
float32 rounding, its error from the float product is within |x| @ |W - deq(W)|, and the scales
have the layout that lets them shard with their kernel."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import kernels
from jaxgpt.kernels.quantized import QMAX, dequantize, is_quantized, quantize_kernel, scale_shape

RNG = np.random.default_rng(0)
# (kernel shape, lead, n_in): a [D, H, K] projection, the attention output [H, K, D] (two input
# axes), an MLP kernel [F, D] and a scanned stack [L, D, F]; odd, distinct sizes.
LAYOUTS = [((12, 3, 5), 0, 1), ((3, 6, 13), 0, 2), ((18, 7), 0, 1), ((2, 12, 9), 1, 1)]


def _np_dequantize(k) -> np.ndarray:
    """q * scale in float64, each scale repeated over its run of rows (numpy only)."""
    q, s = np.asarray(k["q"], np.float64), np.asarray(k["scale"], np.float64)
    for axis, (qd, sd) in enumerate(zip(q.shape, s.shape)):
        s = np.repeat(s, qd // sd, axis=axis)
    return q * s


def _np_dense(x, w, bias, n_in):
    y = np.tensordot(np.asarray(x, np.float64), w, n_in)
    return y if bias is None else y + np.asarray(bias, np.float64)


@pytest.mark.parametrize("shape, lead, n_in", LAYOUTS)
@pytest.mark.parametrize("group", [None, 3])
def test_quantize_layout_and_elementwise_bound(shape, lead, n_in, group):
    if group is not None and shape[lead + n_in - 1] % group:
        group = 1
    w = RNG.normal(size=shape).astype(np.float32)
    k = quantize_kernel(w, lead, n_in, group)
    assert is_quantized(k) and not is_quantized(w)
    assert k["q"].dtype == jnp.int8 and k["q"].shape == shape and k["scale"].dtype == jnp.float32
    assert k["scale"].shape == scale_shape(shape, lead, n_in, group)
    assert k["scale"].ndim == len(shape)  # the kernel's rank: it takes the kernel's axis names
    if group is None:  # one scale per output channel (and per layer of a stack)
        assert k["scale"].shape == shape[:lead] + (1,) * n_in + shape[lead + n_in:]
    assert int(np.abs(np.asarray(k["q"])).max()) == QMAX
    deq = _np_dequantize(k)
    bound = np.asarray(k["scale"], np.float64) / 2  # half a step, repeated over each run
    for axis, (qd, sd) in enumerate(zip(shape, k["scale"].shape)):
        bound = np.repeat(bound, qd // sd, axis=axis)
    assert np.all(np.abs(deq - w) <= bound * (1 + 1e-6))
    np.testing.assert_allclose(np.asarray(dequantize(k)), deq, rtol=1e-7)


def test_zero_column_and_sign_symmetry():
    w = RNG.normal(size=(8, 5)).astype(np.float32)
    w[:, 2] = 0.0
    k = quantize_kernel(w, 0, 1)
    assert float(k["scale"][0, 2]) == 1.0 and not np.asarray(k["q"])[:, 2].any()
    np.testing.assert_array_equal(np.asarray(quantize_kernel(-w, 0, 1)["q"]), -np.asarray(k["q"]))


@pytest.mark.parametrize("kernel_set", ["reference", "auto"])
@pytest.mark.parametrize("shape, n_in", [((12, 3, 5), 1), ((3, 6, 13), 2), ((18, 7), 1)])
@pytest.mark.parametrize("group", [None, 3])
def test_product_is_the_dequantized_matmul_and_within_the_error_bound(kernel_set, shape, n_in, group):
    w = RNG.normal(size=shape).astype(np.float32)
    ins, outs = shape[:n_in], shape[n_in:]
    x = RNG.normal(size=(2, 5) + ins).astype(np.float32)
    bias = RNG.normal(size=outs).astype(np.float32)
    k = quantize_kernel(w, 0, n_in, group)
    dense = kernels.select(kernel_set).dense
    y = np.asarray(dense(x, k, bias, n_in, jnp.float32), np.float64)
    deq = _np_dequantize(k)
    exact = _np_dense(x, deq, bias, n_in)
    # float32 rounding of a sum of C products: relative to the sum of their magnitudes
    mags = _np_dense(np.abs(x), np.abs(deq), np.abs(bias), n_in)
    assert np.all(np.abs(y - exact) <= 2e-6 * mags), np.abs(y - exact).max()
    # against the float kernel: |x . (W - deq(W))| <= |x| . |W - deq(W)|, per output channel
    err_bound = np.tensordot(np.abs(x.astype(np.float64)), np.abs(w - deq), n_in)
    y_float = _np_dense(x, w.astype(np.float64), bias, n_in)
    assert np.all(np.abs(y - y_float) <= err_bound + 2e-6 * mags)
    assert np.abs(y - y_float).max() > 0  # quantization did round something


def test_bfloat16_compute_casts_q_exactly():
    w = RNG.normal(size=(16, 6)).astype(np.float32)
    x = RNG.normal(size=(3, 16)).astype(np.float32)
    k = quantize_kernel(w, 0, 1)
    y16 = kernels.select("reference").dense(x, k, None, 1, jnp.bfloat16)
    assert y16.dtype == jnp.bfloat16
    ref = np.asarray(x.astype(jnp.bfloat16).astype(np.float64)) @ _np_dequantize(k)
    np.testing.assert_allclose(np.asarray(y16, np.float64), ref, rtol=2e-2, atol=2e-2)


def test_bad_groups_raise_one_line():
    w = np.zeros((12, 5), np.float32)
    with pytest.raises(ValueError, match="group 5 does not divide the input width 12") as e:
        quantize_kernel(w, 0, 1, 5)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="group must be a positive integer, got 0"):
        quantize_kernel(w, 0, 1, 0)
