"""The one sampler: how every caller (`generate`, the engine, the book's simple loop) turns a
step's logits into next tokens.

`Sampling` holds the options: greedy (the argmax) where the temperature is 0; otherwise top-k
keeps the logits >= the k-th largest (the book's rule: ties stay), the temperature divides, and
top-p keeps the smallest set of most likely tokens whose mass reaches p; then one categorical
draw. `sample` draws with one key for the whole batch, or one key per row with the options per
row too (the engine's slots, each its own request).

A `Sampling` is a pytree, so jitted code takes it as one argument. What changes the compiled
program stays static: greedy or not, a top_k given as one number (its k), top_p given or not;
the temperature and the top-p value are traced, so one compilation serves every value. Options
given as per-row arrays are all traced.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_NUMBER = (int, float, np.integer, np.floating)


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True)
class Sampling:
    """Sampling options: numbers (one set for the batch) or arrays [B] (one set per row). A row
    without top-k has top_k None or >= the vocabulary; without top-p, top_p None or 1."""

    temperature: Any = 0.0
    top_k: Any = None
    top_p: Any = None

    @property
    def greedy(self) -> bool:
        """Greedy for every row, known without tracing: the temperature is the number 0."""
        return isinstance(self.temperature, _NUMBER) and self.temperature == 0

    def tree_flatten(self):
        if self.greedy:  # all static: the argmax needs none of them
            return (), (True, self.temperature, self.top_k, self.top_p)
        k_static = self.top_k is None or isinstance(self.top_k, _NUMBER)
        children = (self.temperature, None if k_static else self.top_k, self.top_p)
        return children, (False, k_static, self.top_k if k_static else None)

    @classmethod
    def tree_unflatten(cls, aux, children):
        if aux[0]:
            return cls(*aux[1:])
        temperature, top_k, top_p = children
        return cls(temperature, aux[2] if aux[1] else top_k, top_p)


GREEDY = Sampling()


def filter_logits(logits, temperature, top_k=None, top_p=None):
    """Logits [B, V] after top-k, the temperature (> 0) and top-p; dropped logits become -inf.
    Each option is None (off), one number, or one per row [B] (top_k as an int array)."""
    t = _column(temperature)
    desc = None
    if top_k is not None:
        if isinstance(top_k, _NUMBER):  # one k for every row: no full sort needed
            kth = lax.top_k(logits, int(top_k))[0][:, -1:]  # [B, 1]
        else:
            desc = -jnp.sort(-logits, axis=-1)  # [B, V] largest first
            kth = jnp.take_along_axis(desc, (top_k - 1)[:, None], axis=-1)  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    logits = logits / t
    if top_p is not None:
        # Sorted filtered logits: from the sort above (dividing keeps the order), else a sort.
        desc = -jnp.sort(-logits, axis=-1) if desc is None else \
            jnp.where(desc < kth, -jnp.inf, desc) / t  # [B, V]
        probs = jax.nn.softmax(desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # The smallest kept logit: the first token always stays, so no row is left empty.
        cutoff = jnp.min(jnp.where(mass_before < _column(top_p), desc, jnp.inf), axis=-1,
                         keepdims=True)  # [B, 1]
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample(logits, key, sampling: Sampling) -> jax.Array:
    """Next tokens [B] int32 from logits [B, V]: the argmax where the temperature is 0, else a
    draw over the filtered, scaled logits with `key`, one for the batch or one per row [B]."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if sampling.greedy:
        return greedy
    if jnp.ndim(sampling.temperature) == 0:
        return _draw(logits, key, sampling)
    # Options per row: greedy rows keep their argmax; the draw runs only if some row samples.
    hot = sampling.temperature > 0  # [B]
    warm = replace(sampling, temperature=jnp.where(hot, sampling.temperature, 1.0))
    drawn = lax.cond(jnp.any(hot), lambda lg: _draw(lg, key, warm), lambda lg: greedy, logits)
    return jnp.where(hot, drawn, greedy)


def row_keys(seeds, counts) -> jax.Array:
    """One key per row [B]: row b's draw number counts[b] of seed seeds[b]."""
    return jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seeds, counts)


def _draw(logits, key, s: Sampling) -> jax.Array:
    if jnp.ndim(s.temperature) == 0:
        logits = filter_logits(logits, s.temperature, s.top_k, s.top_p)
    else:  # per row: the sort only when some row filters
        V = logits.shape[-1]
        k = jnp.full(logits.shape[:1], V, jnp.int32) if s.top_k is None else s.top_k
        p = jnp.ones(logits.shape[:1], jnp.float32) if s.top_p is None else s.top_p
        logits = lax.cond(jnp.any((k < V) | (p < 1.0)),
                          lambda lg: filter_logits(lg, s.temperature, k, p),
                          lambda lg: lg / _column(s.temperature), logits)
    if jnp.ndim(key) == 0:  # one key for the batch
        return jax.random.categorical(key, logits).astype(jnp.int32)
    return jax.vmap(jax.random.categorical)(key, logits).astype(jnp.int32)  # [B]


def _column(x):
    """A per-row option [B] as a column [B, 1]; a number as is."""
    return x[:, None] if jnp.ndim(x) == 1 else x
