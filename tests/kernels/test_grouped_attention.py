"""grouped_cache_attention (grouped-query attention over a cache of only the key/value heads)
against an independent float64 reference: repeat each kv head for its G query heads, then plain
masked softmax attention."""

import jax
import numpy as np
import pytest

from jaxgpt.kernels import select
from jaxgpt.kernels.attention import grouped_cache_attention


def _reference(q, k, v, mask):
    """q [B, T, H, K], k and v [B, Hkv, S, K], mask [B|1, 1, T, S] -> [B, T, H, K] in float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)  # [B, H, S, K]: head h reads h // G
    scores = np.einsum("bthk,bhsk->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.asarray(mask), scores, -np.inf)
    peak = scores.max(-1, keepdims=True)
    w = np.exp(scores - np.where(np.isfinite(peak), peak, 0.0))
    total = w.sum(-1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total > 0)  # no visible key: zeros
    return np.einsum("bhts,bhsk->bthk", w, v)


def _inputs(b, t, h, hkv, s, k, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, h, k)).astype(np.float32)
    kc = rng.standard_normal((b, hkv, s, k)).astype(np.float32)
    vc = rng.standard_normal((b, hkv, s, k)).astype(np.float32)
    # Per-row causal masks at different offsets, left padding, and one query that sees nothing.
    offsets = np.arange(b) + s - t - b + 1  # [B]
    mask = np.arange(s)[None, None, :] <= (np.arange(t)[None, :, None] + offsets[:, None, None])
    mask[:, :, :1] = False  # slot 0 is padding in every row
    mask[0, 0, :] = False  # row 0's first query has no visible key
    return q, kc, vc, mask[:, None]  # mask [B, 1, T, S]


@pytest.mark.parametrize("h,hkv", [(6, 2), (6, 3), (5, 1), (3, 3)])
def test_matches_repeated_heads_reference(h, hkv):
    q, k, v, mask = _inputs(b=3, t=2, h=h, hkv=hkv, s=7, k=5)
    out = np.asarray(jax.jit(grouped_cache_attention)(q, k, v, mask))
    assert out.shape == (3, 2, h, 5)
    np.testing.assert_allclose(out, _reference(q, k, v, mask), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[0, 0], 0.0)  # a query with no visible key is inert


def test_broadcast_mask_and_one_token_decode():
    q, k, v, mask = _inputs(b=2, t=1, h=6, hkv=2, s=9, k=3, seed=1)
    shared = np.ones((1, 1, 1, 9), bool)
    shared[..., 7:] = False  # slots not yet written
    out = np.asarray(grouped_cache_attention(q, k, v, shared))
    np.testing.assert_allclose(out, _reference(q, k, v, shared), rtol=1e-5, atol=1e-6)


def test_every_kernel_set_names_it():
    for name in ("auto", "reference"):
        assert select(name).grouped_cache_attention is grouped_cache_attention
