"""Optimizer and learning-rate schedule (chapter 5 and appendix D) with optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxgpt.training.runconfig import OptimConfig

# Leaves that are matrices used in a matmul or a lookup; biases and LayerNorm parameters
# (and anything else) are not decayed. Named by path so scanned [L, ...] leaves and the
# 2-D [H, K] query/key/value biases are classified by role, not by rank.
_DECAYED = ("kernel", "embedding", "lm_head")


def schedule(cfg: OptimConfig, total_steps: int):
    """Learning rate at each step: linear warmup init_lr -> peak, then constant or cosine."""
    if cfg.decay not in ("constant", "cosine"):
        raise ValueError(f"optim.decay must be 'constant' or 'cosine', got {cfg.decay!r}")
    warmup = max(cfg.warmup_steps, 0)
    decay_steps = max(total_steps - warmup, 1)

    def lr(step):
        step = jnp.asarray(step, jnp.float32)
        warm = cfg.init_lr + (cfg.learning_rate - cfg.init_lr) * step / max(warmup, 1)
        if cfg.decay == "constant":
            after = jnp.asarray(cfg.learning_rate, jnp.float32)
        else:
            progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
            cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
            after = cfg.min_lr + (cfg.learning_rate - cfg.min_lr) * cosine
        return jnp.where(step < warmup, warm, after)

    return lr


def decay_mask(params):
    """True for the leaves that get weight decay."""

    def is_decayed(path, _):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        return any(n in _DECAYED for n in names)

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW (decay on matrices only), preceded by global-norm clipping when configured."""
    parts = []
    if cfg.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(
        optax.adamw(
            schedule(cfg, total_steps),
            b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
            weight_decay=cfg.weight_decay, mask=decay_mask,
        )
    )
    return optax.chain(*parts)
