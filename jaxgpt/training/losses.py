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
from jaxgpt.data import IGNORE
from jaxgpt.model import GPT


def token_counts(targets: jax.Array) -> jax.Array:
    return jnp.sum(targets != IGNORE)


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, kernel_set: str = "auto") -> jax.Array:
    """Sum of next-token cross-entropy over counted targets, in float32."""
    return kernels.select(kernel_set).cross_entropy_sum(logits, targets, IGNORE)


def lm_loss_fn(config: GPTConfig):
    """The language-model loss: next-token cross-entropy of GPT(config)."""
    model = GPT(config)

    def loss_fn(params, frozen, batch, rng, deterministic):
        del frozen
        logits = model.apply(
            {"params": params}, batch["inputs"], deterministic, rngs={"dropout": rng}
        )  # [B, T, V]
        return cross_entropy_sum(logits, batch["targets"], config.kernels), None

    return loss_fn
