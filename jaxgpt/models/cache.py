"""The KV cache: its layout, the write of new keys and values, and the attention mask over it.

A cache is a dict {"k", "v"} of [L, B, Hkv, S, K] arrays (heads before slots, so attention reads
it without a transposed copy; Hkv = H but for grouped-query attention). A model call writes its
keys and values at `cache_index`: one slot for every row (a scalar), or one per row (an int
array [B]: continuous batching, jaxgpt.inference.engine).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgpt import kernels
from jaxgpt.config import GPTConfig
from jaxgpt.kernels.attention import causal_mask

Cache = dict[str, jax.Array]


def init_cache(config: GPTConfig, batch: int, length: int, dtype=None) -> Cache:
    """An empty KV cache of `length` slots: {"k", "v"} each [L, B, Hkv, S, K] (Hkv = H but for
    grouped-query attention)."""
    shape = (config.n_layers, batch, config.kv_heads, length, config.head_dim)
    dtype = config.compute_dtype if dtype is None else dtype
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def write_cache(buf: jax.Array, new: jax.Array, lead: tuple, cache_index) -> jax.Array:
    """`buf` [*lead, B, H, S, K] with new [B, T, H, K] written at slots cache_index.. +T: one
    index for every row (a scalar), or one per row (an int array [B], continuous batching)."""
    new = new.astype(buf.dtype)
    if jnp.ndim(cache_index) == 0:
        start = (*lead, 0, 0, cache_index, 0)
        return jax.lax.dynamic_update_slice(buf, jnp.swapaxes(new, 1, 2)[(None,) * len(lead)], start)
    B, T = new.shape[:2]
    rows = jnp.arange(B)[:, None]  # [B, 1]
    slots = jnp.asarray(cache_index)[:, None] + jnp.arange(T)[None, :]  # [B, T]
    platform = kernels.backend()
    if platform == "tpu" and T == 1:
        return _select_write(buf, new, lead, jnp.asarray(cache_index))
    # Two index arrays split by a slice: numpy puts their broadcast [B, T] first, then [H, K].
    if buf.dtype.itemsize != 2 or platform != "cpu":
        return buf.at[(*lead, rows, slice(None), slots)].set(new, mode="drop")
    # 16-bit floats are scattered as their bits on CPU: XLA:CPU's bfloat16 scatter made a 32-row
    # GPT-2 decode step ~5x slower (2.6 s, against 0.4-0.7 s this way). Only there: the platform
    # is the traced mesh's (kernels.backend), and a TPU takes the select above.
    bits = jax.lax.bitcast_convert_type
    out = bits(buf, jnp.uint16).at[(*lead, rows, slice(None), slots)].set(
        bits(new, jnp.uint16), mode="drop")
    return bits(out, buf.dtype)


def _select_write(buf, new, lead: tuple, index) -> jax.Array:
    """One token per row [B, 1, H, K] written at slot index [B] as an elementwise select over
    the layer's [B, H, S, K]: on TPU a scatter takes another tiled layout than the one attention
    reads, and XLA copied the whole stacked cache at every layer to convert (GPT-2, 32 rows,
    S=1024: 7.7 GB of temporaries on a v5e); a select keeps the cache's layout, in place."""
    layer = buf[lead] if lead else buf  # [B, H, S, K]
    hit = (jnp.arange(layer.shape[2])[None, :] == index[:, None])[:, None, :, None]  # [B, 1, S, 1]
    layer = jnp.where(hit, jnp.swapaxes(new, 1, 2), layer)  # new [B, H, 1, K] broadcast over S
    if not lead:
        return layer
    return jax.lax.dynamic_update_slice(buf, layer[None], (*lead, 0, 0, 0, 0))


def write_layer(cache: Cache, layer: int | None, k: jax.Array, v: jax.Array, cache_index,
                dtype) -> tuple[Cache, jax.Array, jax.Array]:
    """One attention layer's new keys and values k, v [B, T, Hkv, K] written into `cache` at
    cache_index: a stacked cache [L, B, Hkv, S, K] at index `layer`, or (layer None) one layer's
    [B, Hkv, S, K]. Returns the updated cache and the layer's keys and values over every slot,
    [B, Hkv, S, K] each in `dtype`. A stacked cache is updated where it lies: slicing a layer out
    and stacking the layers back would copy the whole cache on every decoding step."""
    lead = () if layer is None else (layer,)
    new = {n: write_cache(cache[n], t, lead, cache_index) for n, t in (("k", k), ("v", v))}
    return new, new["k"][lead].astype(dtype), new["v"][lead].astype(dtype)


def build_mask(t, cache, cache_index, attention_mask):
    """Boolean mask [B|1, 1, T, S], or None for the plain causal case (fused kernels)."""
    if cache is None:
        if attention_mask is None:
            return None
        mask = causal_mask(t)[None, None]  # [1, 1, T, T]
    else:
        s = cache["k"].shape[3]
        if jnp.ndim(cache_index) == 0:
            mask = causal_mask(t, s, cache_index)[None, None]  # [1, 1, T, S]
        else:  # one offset per row
            mask = causal_mask(t, s, jnp.asarray(cache_index)[:, None, None])[:, None]  # [B, 1, T, S]
    if attention_mask is not None:
        mask = mask & attention_mask.astype(bool)[:, None, None, :]  # [B, 1, T, S]
    return mask
