"""Chapter 3's attention for training on XLA:CPU: the reference computation with a hand-written
gradient whose products all take the layouts XLA:CPU runs fast (see matmul.py).

Shape legend: B batch, T query time, S key time, H heads, K head width.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxgpt.kernels.attention import causal_mask, mask_shape, masked_softmax
from jaxgpt.kernels.dropout import keep_mask


def heads_major_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    deterministic: bool = True,
) -> jax.Array:
    """`reference_attention`'s result (same masks, same dropout draws) for training on CPU.

    Autodiff of the reference contracts [B, T, H, K] operands over (B, H) in the middle and
    multiplies a float32 score gradient with bfloat16 keys; XLA:CPU runs those products as
    generic loops at under 100 GFLOP/s. Here q, k, v are moved once to [B, H, T, K], every
    product is a (B, H)-batched [M, C] x [C, N] or [M, C] x [N, C] product of operands in the
    compute dtype with a float32 result, and the two products that contract over T read a
    transposed copy of a [T, K] operand rather than of a [T, S] one.
    """
    if mask is None:
        mask = causal_mask(q.shape[1], k.shape[1])
    shape = mask_shape(q, k)  # [B, H, T, S]
    keep, p = None, 1.0
    if not deterministic and dropout_rate > 0.0:
        keep, p = keep_mask(dropout_rng, dropout_rate, shape)
    out = _heads_major(_swap_12(q), _swap_12(k), _swap_12(v), jnp.broadcast_to(mask, shape), keep, p)
    return _swap_12(out)


_BATCHED_ROWS = (((3,), (2,)), ((0, 1), (0, 1)))  # [.., M, C] x [.., C, N]
_BATCHED_ROWS_T = (((3,), (3,)), ((0, 1), (0, 1)))  # [.., M, C] x [.., N, C]


def _bdot(a, b, dims):
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _swap_last(x):
    """[..., R, C] -> [..., C, R] as a copy, through a unit axis (see matmul.transposed)."""
    n = x.ndim
    return jnp.transpose(x[..., None], (*range(n - 2), n - 1, n - 2, n))[..., 0]


def _swap_12(x):
    """[B, T, H, K] <-> [B, H, T, K], through a unit axis: XLA:CPU turns a plain bfloat16
    transpose into a float32 one, and the products that read it into float32 products."""
    return jnp.transpose(x[..., None], (0, 2, 1, 3, 4))[..., 0]


def _dropped(w, keep, p):
    return w if keep is None else jnp.where(keep, w / p, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _heads_major(q, k, v, mask, keep, p):
    """q [B, H, T, K], k and v [B, H, S, K], mask and keep [B, H, T, S] -> [B, H, T, K]."""
    return _heads_major_fwd(q, k, v, mask, keep, p)[0]


def _heads_major_fwd(q, k, v, mask, keep, p):
    scores = _bdot(q, k, _BATCHED_ROWS_T) * (1.0 / math.sqrt(q.shape[-1]))  # [B, H, T, S]
    w = masked_softmax(scores, mask)
    out = _bdot(_dropped(w, keep, p).astype(v.dtype), v, _BATCHED_ROWS).astype(v.dtype)
    return out, (q, k, v, w, keep)


def _heads_major_bwd(p, res, g):
    q, k, v, w, keep = res
    dtype = v.dtype
    g = g.astype(dtype)  # [B, H, T, K]
    wd = _dropped(w, keep, p).astype(dtype)
    dv = _swap_last(_bdot(_swap_last(g), wd, _BATCHED_ROWS))  # [B, H, K, S] -> [B, H, S, K]
    dw = _dropped(_bdot(g, v, _BATCHED_ROWS_T), keep, p)  # [B, H, T, S], float32
    ds = (w * (dw - jnp.sum(dw * w, axis=-1, keepdims=True))).astype(dtype)  # d scores
    # The 1/sqrt(K) of the scores is applied to the [.., K]-wide products, not to ds: XLA:CPU
    # would materialize a [B, H, T, S] tensor of that constant for the fused ds computation.
    scale = 1.0 / math.sqrt(q.shape[-1])
    dq = _bdot(ds, k, _BATCHED_ROWS) * scale  # [B, H, T, K]
    dk = _swap_last(_bdot(_swap_last(q), ds, _BATCHED_ROWS) * scale)  # [B, H, K, S] -> [B, H, S, K]
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None)


_heads_major.defvjp(_heads_major_fwd, _heads_major_bwd)
