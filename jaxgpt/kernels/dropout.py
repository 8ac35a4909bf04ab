"""Inverted dropout from 16 random bits per element.

flax's nn.Dropout and jax.random.bernoulli spend a 32-bit threefry word per element, and on
a CPU JAX runs threefry as a loop of five passes over memory. Threefry was the costly part of
dropout on a CPU (about 85 ms of a 1.08 s bfloat16 GPT-2 small step). A mask needs far fewer
bits: here one threefry-2x32 hash (both of its 32-bit outputs) gives four 16-bit draws, each
compared with a threshold t = round(rate * 65536). The realised rate is t / 65536 (0.1 becomes
0.100006) and kept values are scaled by 1 / (1 - t / 65536), so the expected output equals the
input exactly. The hash is spelled out below, unrolled, so it compiles to straight-line code
(no loop of passes over memory); it is Random123's Threefry-2x32 with 20 rounds, the same
function as JAX's own (a test checks them equal). Counters are element indices, so masks are a
pure function of the key on every backend and under any sharding, and a resumed run draws the
same masks as an uninterrupted one.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

_LEVELS = 1 << 16
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array):
    """Threefry-2x32 (20 rounds) of the counter pairs (x1, x2) under the key (k1, k2); uint32."""
    u32 = jnp.uint32
    ks = (k1, k2, k1 ^ k2 ^ u32(0x1BD11BDA))
    a, b = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            a = a + b
            b = a ^ ((b << u32(r)) | (b >> u32(32 - r)))
        a, b = a + ks[(i + 1) % 3], b + ks[(i + 2) % 3] + u32(i + 1)
    return a, b


def keep_mask(key: jax.Array, rate: float, shape: tuple[int, ...]) -> tuple[jax.Array, float]:
    """A boolean mask of `shape` (True = keep) and the realised keep probability."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    threshold = round(rate * _LEVELS)
    shape = tuple(shape) or (1,)
    last = shape[-1]
    blocks = shape[:-1] + (-(-last // 4),)  # one hash per four elements of the last axis
    n = math.prod(blocks)
    if 2 * n >= 1 << 32:
        raise ValueError(f"dropout mask of shape {shape} is too large (over 2**34 elements)")
    k1, k2 = jax.random.bits(key, (2,), jnp.uint32)  # any key type; the hash's own key
    counter = jax.lax.iota(jnp.uint32, n).reshape(blocks)
    # XLA:CPU fuses the hash into the computation of each 16-bit piece, so it runs four times
    # per hash; keeping h1 and h2 in memory instead (through a cond) measured no faster in a
    # GPT-2 train step, where these loops overlap with matmuls.
    h1, h2 = threefry2x32(k1, k2, counter, counter + jnp.uint32(n))
    draws = jnp.concatenate([h1 & 0xFFFF, h1 >> 16, h2 & 0xFFFF, h2 >> 16], axis=-1)
    return draws[..., :last] >= threshold, 1.0 - threshold / _LEVELS


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Zero each element with probability `rate`; scale the rest to keep the expectation."""
    if rate == 0.0:
        return x
    keep, p = keep_mask(key, rate, x.shape)
    return jnp.where(keep.reshape(x.shape), x / jnp.asarray(p, x.dtype), jnp.zeros((), x.dtype))


class Dropout(nn.Module):
    """`dropout` as a flax module drawing its key from the "dropout" RNG stream."""

    rate: float
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deterministic or self.rate == 0.0:
            return x
        return dropout(x, self.rate, self.make_rng("dropout"))
