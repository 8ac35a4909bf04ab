"""Summed next-token cross-entropy with a one-pass hand-written gradient (float32 inside).

Autodiff of the log-softmax writes a float32 product first and rounds it in a second pass over
the [B, T, V] logits, the largest tensor of a training step. Here the gradient is
softmax * g - onehot * g in one pass over the saved exponentials, which the logits' consumer
(the head's matmul) rounds to its dtype in the same pass. `reference_cross_entropy_sum` is
optax's loss, the definition this must equal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def reference_cross_entropy_sum(logits: jax.Array, targets: jax.Array, ignore: int) -> jax.Array:
    """Sum of optax's per-token cross-entropy over the targets that are not `ignore`."""
    counted = targets != ignore
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), jnp.where(counted, targets, 0))
    return jnp.sum(jnp.where(counted, losses, 0.0))


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, ignore: int) -> jax.Array:
    """Sum of next-token cross-entropy over the targets that are not `ignore`, in float32."""
    return _cross_entropy_sum(logits.astype(jnp.float32), targets != ignore, targets)


@jax.custom_vjp
def _cross_entropy_sum(logits, counted, targets):
    return _cross_entropy_fwd(logits, counted, targets)[0]


def _cross_entropy_fwd(logits, counted, targets):
    safe = jnp.where(counted, targets, 0)
    top = jnp.max(logits, axis=-1, keepdims=True)
    exps = jnp.exp(logits - top)
    total = jnp.sum(exps, axis=-1, keepdims=True)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)
    losses = (top + jnp.log(total) - picked)[..., 0]  # logsumexp - logit of the target
    return jnp.sum(jnp.where(counted, losses, 0.0)), (exps, total, safe, counted)


def _cross_entropy_bwd(res, g):
    exps, total, safe, counted = res
    w = jnp.where(counted, g, 0.0)[..., None]
    target = jax.lax.broadcasted_iota(safe.dtype, exps.shape, exps.ndim - 1) == safe[..., None]
    return exps * (w / total) - jnp.where(target, w, 0.0), None, None


_cross_entropy_sum.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)
