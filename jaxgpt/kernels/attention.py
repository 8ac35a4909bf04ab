"""Causal multi-head attention (chapter 3) as small pure functions, plus a fused fast path.

Shape legend: B batch, T query time, S key time, H heads, K head width, D model width; with
grouped queries Hkv key/value heads, each read by G = H / Hkv query heads.

`reference_attention` composes the chapter's steps one by one (scores, mask, softmax, dropout,
weighted sum) so each can be read and tested: it is the definition every other attention kernel
is tested against, which is why chapter 3 lives here, in the lowest layer. `fused_attention`
hands the same computation to `jax.nn.dot_product_attention` (its XLA composition, or cuDNN's
flash kernel when asked: backend_attention.py chooses); `cpu_attention.heads_major_attention` is the reference with a
hand-written gradient in XLA:CPU's fast layouts; `cache_attention` reads a heads-major KV cache,
`grouped_cache_attention` one that holds only the Hkv key/value heads (grouped-query attention).
All take masks with True meaning "may attend".
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxgpt.kernels.dropout import dropout


def split_heads(x: jax.Array, n_heads: int) -> jax.Array:
    """[B, T, D] -> [B, T, H, K]."""
    b, t, d = x.shape
    return x.reshape(b, t, n_heads, d // n_heads)


def merge_heads(x: jax.Array) -> jax.Array:
    """[B, T, H, K] -> [B, T, D]."""
    b, t, h, k = x.shape
    return x.reshape(b, t, h * k)


def attention_scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """Scaled dot products q.k / sqrt(K), in float32: [B, T, H, K] x [B, S, H, K] -> [B, H, T, S]."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    return jnp.einsum("bthk,bshk->bhts", q, k, preferred_element_type=jnp.float32) * scale


def causal_mask(t: int, s: int | None = None, offset: int | jax.Array = 0) -> jax.Array:
    """[T, S] booleans: query i (at absolute slot offset + i) may see keys 0..offset + i."""
    s = t if s is None else s
    q_pos = jnp.arange(t)[:, None] + offset
    k_pos = jnp.arange(s)[None, :]
    return k_pos <= q_pos


def masked_softmax(scores: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax over keys after setting disallowed scores to -inf (fully masked rows give 0)."""
    if mask is not None:
        scores = jnp.where(mask, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    # A row with no visible key (a padding query) would be NaN; make it zero instead.
    return jnp.where(jnp.isnan(weights), 0.0, weights)


def attention_dropout(
    weights: jax.Array, rate: float, rng: jax.Array | None, deterministic: bool
) -> jax.Array:
    """Inverted dropout on the attention weights (the book drops weights, not outputs)."""
    if deterministic or rate == 0.0:
        return weights
    return dropout(weights, rate, rng)


def weighted_values(weights: jax.Array, v: jax.Array) -> jax.Array:
    """[B, H, T, S] x [B, S, H, K] -> [B, T, H, K]."""
    return jnp.einsum("bhts,bshk->bthk", weights.astype(v.dtype), v)


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    deterministic: bool = True,
) -> jax.Array:
    """Chapter 3's attention composed step by step; mask broadcasts to [B, H, T, S]."""
    if mask is None:
        mask = causal_mask(q.shape[1], k.shape[1])
    scores = attention_scores(q, k)  # [B, H, T, S]
    weights = masked_softmax(scores, mask)
    weights = attention_dropout(weights, dropout_rate, dropout_rng, deterministic)
    return weighted_values(weights, v)  # [B, T, H, K]


def cache_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    deterministic: bool = True,
) -> jax.Array:
    """The reference steps over a heads-major KV cache: q [B, T, H, K], k and v [B, H, S, K].

    With heads before slots both products are batched matmuls over (B, H) that read the cache
    where it lies; a [B, S, H, K] cache would be copied transposed for every layer and token.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bthk,bhsk->bhts", q, k, preferred_element_type=jnp.float32) * scale
    weights = masked_softmax(scores, mask)  # [B, H, T, S]
    weights = attention_dropout(weights, dropout_rate, dropout_rng, deterministic)
    return jnp.einsum("bhts,bhsk->bthk", weights.astype(v.dtype), v)  # [B, T, H, K]


def grouped_cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B, T, H, K] over a heads-major cache k, v [B, Hkv, S, K] holding only the key/value
    heads; mask [B|1, 1, T, S]. Query head h reads kv head h // G (Hugging Face's repeat_kv
    order). No dropout: a cache is read when decoding."""
    B, T, H, K = q.shape
    hkv, G = k.shape[1], H // k.shape[1]
    # The G query heads of a kv head and the T queries form one row axis, so both products are
    # plain (B, Hkv)-batched matmuls that read the cache where it lies.
    qg = jnp.swapaxes(q.reshape(B, T, hkv, G, K), 1, 2).reshape(B, hkv, T * G, K)  # [B, Hkv, T G, K]
    scores = jnp.einsum("bhqk,bhsk->bhqs", qg, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(B, hkv, T, G, -1)  # [B, Hkv, T, G, S]
    weights = masked_softmax(scores / math.sqrt(K), mask[:, :, :, None])  # mask [B|1, 1, T, 1, S]
    out = jnp.einsum("bhqs,bhsk->bhqk", weights.reshape(B, hkv, T * G, -1).astype(v.dtype), v)
    return jnp.swapaxes(out.reshape(B, hkv, T, G, K), 1, 2).reshape(B, T, H, K)  # [B, T, H, K]


def fused_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """jax.nn.dot_product_attention ("xla" or "cudnn"; None is "xla" in this JAX); without a
    mask it is causal, with one the mask alone decides."""
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                            implementation=implementation)  # [B, T, H, K]
    out = jax.nn.dot_product_attention(q, k, v, mask=jnp.broadcast_to(mask, mask_shape(q, k)),
                                       implementation=implementation)
    # Fully masked query rows (left padding) come out as a mean of values; zero them to match
    # the reference, so padded rows are inert either way.
    any_visible = jnp.any(jnp.broadcast_to(mask, mask_shape(q, k)), axis=-1)  # [B, H, T]
    return jnp.where(jnp.moveaxis(any_visible, 1, 2)[..., None], out, 0.0)


def mask_shape(q: jax.Array, k: jax.Array) -> tuple[int, int, int, int]:
    """The full mask shape [B, H, T, S] of q [B, T, H, K] against keys k [B, S, H, K]."""
    return (q.shape[0], q.shape[2], q.shape[1], k.shape[1])  # [B, H, T, S]
