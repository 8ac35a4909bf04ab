import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.kernels import attention as A
from jaxgpt.kernels.cpu_attention import heads_major_attention


def _qkv(key, b=2, t=7, s=7, h=3, k=5):
    kq, kk, kv = jax.random.split(key, 3)
    return (
        jax.random.normal(kq, (b, t, h, k)),
        jax.random.normal(kk, (b, s, h, k)),
        jax.random.normal(kv, (b, s, h, k)),
    )


def _naive(q, k, v, mask):
    """Loop-free numpy attention written independently of the module."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scores = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask, scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    return np.einsum("bhts,bshk->bthk", w, v)


def test_split_merge_round_trip():
    x = jnp.arange(2 * 5 * 12.0).reshape(2, 5, 12)
    s = A.split_heads(x, 3)
    assert s.shape == (2, 5, 3, 4)
    np.testing.assert_array_equal(A.merge_heads(s), x)
    # Head h holds columns h*K .. (h+1)*K - 1, as the book's view/transpose does.
    np.testing.assert_array_equal(s[:, :, 1], x[:, :, 4:8])


def test_causal_mask_with_offset():
    m = np.asarray(A.causal_mask(2, 5, offset=2))
    np.testing.assert_array_equal(m, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])


@pytest.mark.parametrize("fn", ["reference", "fused"])
def test_causal_attention_matches_naive(fn):
    q, k, v = _qkv(jax.random.key(0))
    mask = np.tril(np.ones((7, 7), bool))[None, None]
    out = A.reference_attention(q, k, v) if fn == "reference" else A.fused_attention(q, k, v)
    np.testing.assert_allclose(out, _naive(q, k, v, mask), atol=1e-5)


def test_fused_equals_reference_with_padding_mask():
    q, k, v = _qkv(jax.random.key(1))
    pad = np.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], bool)
    mask = A.causal_mask(7)[None, None] & pad[:, None, None, :]
    ref = A.reference_attention(q, k, v, mask)
    fast = A.fused_attention(q, k, v, mask)
    np.testing.assert_allclose(fast, ref, atol=1e-5)
    # Fully masked query rows (the left padding of row 0) are zero, not NaN.
    assert np.all(np.asarray(ref)[0, :2] == 0.0)


def test_dropout_only_when_not_deterministic():
    w = jnp.full((2, 3, 4, 4), 0.25)
    np.testing.assert_array_equal(A.attention_dropout(w, 0.5, None, True), w)
    out = np.asarray(A.attention_dropout(w, 0.5, jax.random.key(0), False))
    assert set(np.unique(out)) <= {0.0, 0.5}  # inverted dropout keeps the expectation
    assert 0 < (out == 0).mean() < 1


@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_heads_major_equals_reference_values_and_gradients(drop):
    """Its hand-written gradient against autodiff of the reference, with left padding (fully
    masked rows) and with dropout (the same key draws the same masks in both)."""
    q, k, v = _qkv(jax.random.key(2))
    pad = np.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], bool)
    mask = A.causal_mask(7)[None, None] & pad[:, None, None, :]
    r = jax.random.normal(jax.random.key(3), q.shape)
    kw = dict(dropout_rate=drop, dropout_rng=jax.random.key(4), deterministic=drop == 0.0)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, mask, **kw) * r)

    np.testing.assert_allclose(heads_major_attention(q, k, v, mask, **kw),
                               A.reference_attention(q, k, v, mask, **kw), atol=1e-6)
    got = jax.grad(loss(heads_major_attention), (0, 1, 2))(q, k, v)
    want = jax.grad(loss(A.reference_attention), (0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)
    assert np.all(np.asarray(got[0])[0, :2] == 0.0)  # padded queries get no gradient


def test_heads_major_in_bfloat16_tracks_float32():
    q, k, v = _qkv(jax.random.key(5), t=16, s=16, h=2, k=8)
    r = jax.random.normal(jax.random.key(6), q.shape)

    def grads(dtype):
        f = lambda q, k, v: jnp.sum(heads_major_attention(q, k, v).astype(jnp.float32) * r)  # noqa: E731
        return jax.grad(f, (0, 1, 2))(*(x.astype(dtype) for x in (q, k, v)))

    lo, hi = grads(jnp.bfloat16), grads(jnp.float32)
    for a, b in zip(lo, hi):
        assert a.dtype == jnp.bfloat16
        # bfloat16 keeps 8 bits of mantissa: errors of a few parts in a hundred of the scale.
        assert float(jnp.abs(a.astype(jnp.float32) - b).max()) < 0.05 * float(jnp.abs(b).max())
