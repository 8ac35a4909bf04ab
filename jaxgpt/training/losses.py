"""Losses: the next-token language-model loss and the pieces a task's loss is made of.

A loss function has the signature `loss_fn(params, frozen, batch, rng, deterministic) ->
(sum_of_losses, aux)` where `batch` holds one micro-batch; `frozen` is an optional tree that is
used but never trained (LoRA's base weights), passed separately so it is sharded, not donated and
receives no optimizer state. Targets equal to IGNORE (-100) do not count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgpt import kernels
from jaxgpt.config import GPTConfig
from jaxgpt.data.windows import IGNORE
from jaxgpt.kernels.chunked_loss import chunked_head_cross_entropy_sum
from jaxgpt.models.model import GPT, output_head


def token_counts(targets: jax.Array) -> jax.Array:
    return jnp.sum(targets != IGNORE)


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, kernel_set: str = "auto") -> jax.Array:
    """Sum of next-token cross-entropy over counted targets, in float32."""
    return kernels.select(kernel_set).cross_entropy_sum(logits, targets, IGNORE)


def head_cross_entropy_sum(params, hidden: jax.Array, targets: jax.Array, config: GPTConfig):
    """The LM head and the summed cross-entropy in chunks of config.loss_chunk tokens, from the
    final hidden states [B, T, D]: the same loss, without [B, T, V] logits held at once."""
    head, tied = output_head(params, config)  # [V, D] tied, or [D, V]
    return chunked_head_cross_entropy_sum(
        hidden, head, tied, targets, IGNORE, chunk=config.loss_chunk,
        vocab_size=config.vocab_size, dtype=config.compute_dtype)


def lm_loss_fn(config: GPTConfig):
    """The language-model loss: next-token cross-entropy of GPT(config); with
    config.loss_chunk > 0 the head and the loss run fused, in chunks of tokens."""
    model = GPT(config)

    def loss_fn(params, frozen, batch, rng, deterministic):
        del frozen
        chunked = config.loss_chunk > 0
        out = model.apply(
            {"params": params}, batch["inputs"], deterministic, rngs={"dropout": rng},
            return_hidden=chunked,
        )  # [B, T, D] hidden states or [B, T, V] logits
        if chunked:
            return head_cross_entropy_sum(params, out, batch["targets"], config), None
        return cross_entropy_sum(out, batch["targets"], config.kernels), None

    return loss_fn
