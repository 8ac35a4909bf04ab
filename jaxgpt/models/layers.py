"""The layers every family's block is built from: initializers, Dense, norms, rotary positions.

Shape legend (as in model.py): B batch, T time, D model width, H heads, K head width.

Layers know the config's fields but never a model: the family blocks (gpt2.py, llama.py) and
the GPT skeleton (model.py) import them, never the other way round. Every parameter carries
logical axis names (`param`; jaxgpt.sharding holds the rules that map them to a mesh).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import kernels
from jaxgpt.config import GPTConfig


def kernel_init(cfg: GPTConfig, residual: bool = False):
    """GPT-2's N(0, 0.02) (residual projections scaled by 1/sqrt(2 L)), or PyTorch's default
    for nn.Linear, U(+-1/sqrt(fan_in)), which the book's GPTModel gets."""
    if cfg.init == "torch":
        # Dense hands initializers the kernel flattened to [fan_in, fan_out].
        return nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    return nn.initializers.normal(0.02 / np.sqrt(2 * cfg.n_layers) if residual else 0.02)


def bias_init(cfg: GPTConfig, fan_in: int):
    """Zeros, or PyTorch's U(+-1/sqrt(fan_in)) for cfg.init == "torch"."""
    if cfg.init == "torch":
        bound = 1.0 / np.sqrt(fan_in)
        return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
    return nn.initializers.zeros


def embed_init(cfg: GPTConfig, std: float):
    """N(0, std), or PyTorch's nn.Embedding default N(0, 1) for cfg.init == "torch"."""
    return nn.initializers.normal(1.0 if cfg.init == "torch" else std)


def param(init, names):
    """An initializer whose parameter carries the logical axis names `names`."""
    return nn.with_logical_partitioning(init, names)


def remat_policy(name: str):
    """config.remat_policy's name -> a jax.checkpoint policy (None: save nothing)."""
    return {
        "full": None,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[name]


class Dense(nn.Module):
    """x [..., in...] -> [..., out...]: the trailing `n_in` axes of x times a float32 kernel
    [in..., out...] (+ bias [out...]), computed in `dtype` by the selected kernel set. The
    kernel's logical axis names are `names`; initializers see it flattened to [fan_in, fan_out]."""

    features: tuple[int, ...]
    names: tuple[str | None, ...]
    kernel_init: Any
    bias_init: Any = None  # None: no bias
    n_in: int = 1
    dtype: Any = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x):
        ins = x.shape[x.ndim - self.n_in:]
        fan_in, fan_out = int(np.prod(ins)), int(np.prod(self.features))

        def flat(init, shape2):
            return lambda key, shape, dtype=jnp.float32: init(key, shape2, dtype).reshape(shape)

        kernel = self.param("kernel", param(flat(self.kernel_init, (fan_in, fan_out)), self.names),
                            ins + tuple(self.features), jnp.float32)
        bias = None
        if self.bias_init is not None:
            bias = self.param("bias", param(flat(self.bias_init, (fan_out,)), self.names[self.n_in:]),
                              tuple(self.features), jnp.float32)
        return kernels.select(self.kernels).dense(x, kernel, bias, self.n_in, self.dtype)


def layer_norm(cfg: GPTConfig, name: str) -> nn.LayerNorm:
    """GPT-2's LayerNorm over D (scale and bias), computed in the compute dtype."""
    return nn.LayerNorm(
        epsilon=cfg.ln_eps,
        dtype=cfg.compute_dtype,
        scale_init=param(nn.initializers.ones, ("embed",)),
        bias_init=param(nn.initializers.zeros, ("embed",)),
        name=name,
    )


class RMSNorm(nn.Module):
    """x [..., N] / sqrt(mean(x^2) + eps) * scale [N], in float32, returned in x's dtype
    (Hugging Face's LlamaRMSNorm)."""

    eps: float
    names: tuple[str, ...] = ("embed",)

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", param(nn.initializers.ones, self.names), (x.shape[-1],),
                           jnp.float32)
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return (scale * h).astype(x.dtype)


def rope_frequencies(cfg: GPTConfig) -> np.ndarray:
    """Inverse frequencies [K / 2] (float32), with Llama 3's scaling when cfg.rope_factor is set."""
    K = cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, K, 2, dtype=np.float64) / K)
    if cfg.rope_factor is not None:
        factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_context
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)  # long waves slowed down
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)  # between: interpolated
        inv = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x [B, T, H, K] rotated by angles positions [B|1, T] * inv_freq [K/2] (Llama's "rotate
    half" layout); angles come from each token's own position, so a left-padded row whose
    positions start at 0 at its first real token is exact."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B|1, T, K/2]
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]  # [B|1, T, 1, K/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # 2 x [B, T, H, K/2]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
