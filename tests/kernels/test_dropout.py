"""Dropout from 16-bit draws (jaxgpt/dropout.py): the hash, rate, scaling, determinism,
independence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry_2x32

from jaxgpt.kernels.dropout import Dropout, dropout, keep_mask, threefry2x32


def test_hash_is_jax_threefry():
    """The unrolled hash equals JAX's threefry_2x32, which hashes the two halves of a flat
    counter array as pairs and returns both outputs concatenated."""
    key = jax.random.key_data(jax.random.key(11))
    counts = jax.random.bits(jax.random.key(12), (2, 5000), jnp.uint32)
    h1, h2 = threefry2x32(key[0], key[1], counts[0], counts[1])
    expected = threefry_2x32(key, counts.ravel())
    np.testing.assert_array_equal(np.concatenate([h1, h2]), expected)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.03])
def test_rate_is_realised_and_kept_values_are_scaled_to_keep_the_mean(rate):
    x = jax.random.uniform(jax.random.key(0), (64, 97, 33)) + 0.5  # odd last axis
    out = np.asarray(dropout(x, rate, jax.random.key(1)))
    keep = 1.0 - round(rate * 65536) / 65536
    kept = out != 0
    n = kept.size
    # Binomial: the dropped fraction lies within 5 standard deviations of the rate.
    assert abs((1 - kept.mean()) - rate) < 5 * np.sqrt(rate * (1 - rate) / n)
    np.testing.assert_allclose(out[kept], np.asarray(x)[kept] / keep, rtol=1e-6)
    # E[out] = x: the mean of out / x is 1 within sampling error.
    assert abs((out / np.asarray(x)).mean() - 1.0) < 5 * np.sqrt((1 - keep) / keep / n)


def test_masks_are_fixed_by_the_key_and_differ_between_keys():
    m1, _ = keep_mask(jax.random.key(3), 0.5, (8, 1001))
    m2, _ = keep_mask(jax.random.key(3), 0.5, (8, 1001))
    m3, _ = keep_mask(jax.random.key(4), 0.5, (8, 1001))
    assert m1.shape == (8, 1001)
    np.testing.assert_array_equal(m1, m2)
    assert 0.4 < np.mean(np.asarray(m1) != np.asarray(m3)) < 0.6


def test_the_four_pieces_of_a_hash_are_independent_draws():
    """Elements j, j + m, j + 2m, j + 3m of the last axis (m = ceil(n/4)) share one hash's
    64 bits; no pair of them may be correlated."""
    m, _ = keep_mask(jax.random.key(5), 0.5, (4000, 64))
    m = np.asarray(m, np.float64)
    pieces = [m[:, 16 * i:16 * (i + 1)].ravel() for i in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert abs(np.corrcoef(pieces[i], pieces[j])[0, 1]) < 5 / np.sqrt(pieces[i].size)


def test_module_is_identity_when_deterministic_and_keeps_dtype():
    x = jnp.ones((4, 6), jnp.bfloat16)
    layer = Dropout(0.3)
    assert layer.apply({}, x) is x
    out = Dropout(0.3, deterministic=False).apply({}, x, rngs={"dropout": jax.random.key(0)})
    assert out.dtype == jnp.bfloat16 and 0 < int((out == 0).sum()) < x.size


def test_bad_rate_is_refused():
    with pytest.raises(ValueError, match="dropout rate"):
        keep_mask(jax.random.key(0), 1.0, (3,))
