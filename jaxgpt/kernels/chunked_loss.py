"""The LM head and the summed cross-entropy fused, in chunks of tokens: no [B, T, V] logits.

Shape legend: N tokens (B * T flattened), C tokens per chunk, D model width, V vocabulary.

The plain path writes float32 logits [B, T, V] and, in the backward pass, their gradient of the
same size: at GPT-2's vocabulary and 16 x 1024 tokens, 3.3 GB each. Here the forward pass maps
over chunks of C tokens, keeping only each token's logsumexp [N]; the backward pass recomputes
each chunk's logits [C, V] and turns them at once into the hidden states' gradient [C, D] and a
running sum of the head's gradient (the head's size, float32). Arithmetic as the plain path:
the product in the compute dtype with float32 results, softmax and loss in float32. Columns past
`vocab_size` (a padded vocabulary) are masked out. Equal to `dense.reference_project` followed
by `cross_entropy.reference_cross_entropy_sum` (tested, values and gradients).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxgpt.kernels.matmul import ROWS, ROWS_T, transposed

_MASKED = -1e30  # a padded column's logit: softmax gives it exactly 0


def chunked_head_cross_entropy_sum(hidden: jax.Array, head: jax.Array, head_t: bool,
                                   targets: jax.Array, ignore: int, *, chunk: int,
                                   vocab_size: int, dtype) -> jax.Array:
    """Sum over counted targets of cross-entropy(hidden @ head), float32; hidden [..., D],
    head [D, V] (or [V, D] with head_t, a tied embedding), targets [...] (`ignore`: not counted)."""
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d).astype(dtype)  # [N, D]
    t = targets.reshape(-1)  # [N]
    chunk = min(chunk, t.shape[0])
    pad = -t.shape[0] % chunk
    if pad:  # a last partial chunk: padded tokens are ignored
        h = jnp.pad(h, ((0, pad), (0, 0)))
        t = jnp.pad(t, (0, pad), constant_values=ignore)
    return _loss(h, head, t, head_t, chunk, vocab_size, ignore)


def _logits(hc, head, head_t, vocab_size):
    dims = (((1,), (1 if head_t else 0,)), ((), ()))
    z = lax.dot_general(hc, head.astype(hc.dtype), dims, preferred_element_type=jnp.float32)  # [C, V]
    if z.shape[-1] != vocab_size:
        z = jnp.where(jnp.arange(z.shape[-1]) < vocab_size, z, _MASKED)
    return z


def _chunks(x, chunk):
    return x.reshape(-1, chunk, *x.shape[1:])  # [N / C, C, ...]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _loss(h, head, t, head_t, chunk, vocab_size, ignore):
    return _loss_fwd(h, head, t, head_t, chunk, vocab_size, ignore)[0]


def _loss_fwd(h, head, t, head_t, chunk, vocab_size, ignore):
    def one(args):
        hc, tc = args
        z = _logits(hc, head, head_t, vocab_size)  # [C, V]
        lse = jax.nn.logsumexp(z, axis=-1)  # [C]
        counted = tc != ignore
        picked = jnp.take_along_axis(z, jnp.where(counted, tc, 0)[:, None], axis=-1)[:, 0]
        return jnp.sum(jnp.where(counted, lse - picked, 0.0)), lse

    sums, lse = lax.map(one, (_chunks(h, chunk), _chunks(t, chunk)))
    return jnp.sum(sums), (h, head, t, lse.reshape(-1))


def _loss_bwd(head_t, chunk, vocab_size, ignore, res, g):
    h, head, t, lse = res

    def one(dhead, args):
        hc, tc, lc = args
        z = _logits(hc, head, head_t, vocab_size)  # [C, V]
        counted = tc != ignore
        onehot = lax.broadcasted_iota(tc.dtype, z.shape, 1) == tc[:, None]
        w = jnp.where(counted, g, 0.0)[:, None]  # [C, 1]
        dz = jnp.exp(z - lc[:, None]) * w - jnp.where(onehot, w, 0.0)  # [C, V] float32
        dz_c, w_c = dz.astype(hc.dtype), head.astype(hc.dtype)
        # Row-major [M, C] x [C, N] or [M, C] x [N, C] products, transposing explicitly where
        # needed: the layouts XLA:CPU runs fast (matmul.py); other compilers choose their own.
        if head_t:  # head [V, D]
            dh = lax.dot_general(dz_c, w_c, ROWS, preferred_element_type=jnp.float32)  # [C, D]
            dw = lax.dot_general(transposed(dz_c), hc, ROWS, preferred_element_type=jnp.float32)
        else:  # head [D, V]
            dh = lax.dot_general(dz_c, w_c, ROWS_T, preferred_element_type=jnp.float32)  # [C, D]
            dw = lax.dot_general(transposed(hc), dz_c, ROWS, preferred_element_type=jnp.float32)
        return dhead + dw, dh.astype(hc.dtype)

    dhead, dh = lax.scan(one, jnp.zeros(head.shape, jnp.float32),
                         (_chunks(h, chunk), _chunks(t, chunk), _chunks(lse, chunk)))
    return dh.reshape(h.shape), dhead.astype(head.dtype), None


_loss.defvjp(_loss_fwd, _loss_bwd)
