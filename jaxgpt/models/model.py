"""GPT (chapter 4) in flax.linen: one forward skeleton for every family.

Shape legend (used in every shape comment and einsum of models/):
  B batch, T time (queries), S key slots (cache length), L layers, D model width (emb_dim),
  H heads, Hkv key/value heads (H but for grouped-query attention), G query heads per key/value
  head (H / Hkv), K head width (D / H unless config.head_width), F MLP width, V vocabulary.

The skeleton: the family's embedding, dropout, the blocks (under remat and/or scan), the final
norm, the LM head (tied to the token embedding or a separate lm_head [D, V]). A family brings
its embedding, block and final norm (`FAMILIES`): GPT-2's in gpt2.py; Llama 3's and Qwen3's in
llama.py (RMSNorm, rotary positions, SwiGLU, grouped-query attention); both are built from
layers.py. Parameter names follow Hugging Face's for each family (see gpt2.py and llama.py), so
weight import/export is a rename table. Every parameter carries logical axis names (see
`jaxgpt.sharding` for the rules table), and the activations between layers are pinned by the
same names with `constrain`.

With `scan_layers` the blocks live under one entry (`h` for GPT-2, `layers` for Llama/Qwen3)
whose leaves have a leading L axis; without it under `h_<i>` / `layers_<i>`. A KV cache, when
given, is a dict {"k", "v"} of [L, B, Hkv, S, K] arrays (jaxgpt/models/cache.py: its layout, the
write at `cache_index`, the mask over it); the call returns the updated cache beside the logits.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import kernels
from jaxgpt.config import GPTConfig
from jaxgpt.kernels.dropout import Dropout
from jaxgpt.models import gpt2, llama
from jaxgpt.models.cache import Cache, build_mask
from jaxgpt.models.layers import kernel_init, param, remat_policy
from jaxgpt.sharding import constrain


@dataclasses.dataclass(frozen=True)
class Family:
    """What a family brings to the skeleton; the rest is shared."""

    # (config, deterministic, layer) -> (x, layer_cache, mask, cache_index, positions) -> (x, cache)
    block: type[nn.Module]
    stack: str  # the blocks' parameter name: <stack> when scanned, <stack>_<i> unrolled
    embed: Callable  # (config, ids, positions) -> (x [B, T, D], token table [V, D])
    final_norm: Callable  # config -> the norm after the last block


FAMILIES = {
    "gpt2": Family(gpt2.Block, "h", gpt2.embed, gpt2.final_norm),
    "llama": Family(llama.Block, "layers", llama.embed, llama.final_norm),
    "qwen3": Family(llama.Block, "layers", llama.embed, llama.final_norm),  # q/k norm: by family
}


class GPT(nn.Module):
    """A decoder of config.family: `apply({"params": p}, ids) -> logits [B, T, V]` in float32."""

    config: GPTConfig

    @nn.compact
    def __call__(
        self,
        ids: jax.Array,
        deterministic: bool = True,
        *,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: Cache | None = None,
        cache_index: Any = 0,
        return_hidden: bool = False,
    ):
        """ids [B, T]; positions [B, T] (default cache_index + arange(T)); attention_mask
        [B, S] marks real key slots (S = T without a cache, the cache length with one).
        Returns logits [B, T, V] (padded columns masked; with return_hidden the final hidden
        states [B, T, D] instead), in float32; with a cache, (that, the updated cache)."""
        cfg = self.config
        validate_ids(ids, cfg)
        T = ids.shape[1]
        if positions is None:
            positions = jnp.reshape(cache_index, (-1, 1)) + jnp.arange(T)[None, :]  # [1|B, T]
        family = FAMILIES[cfg.family]
        x, table = family.embed(cfg, ids, positions)  # [B, T, D], [V, D]
        x = Dropout(cfg.drop_rate, deterministic=deterministic)(x)
        x = constrain(x.astype(cfg.compute_dtype), ("batch", "length", "embed"))

        mask = build_mask(T, cache, cache_index, attention_mask)  # None or [B|1, 1, T, S]
        x, new_cache = run_blocks(cfg, family, deterministic, x, cache, mask, cache_index, positions)
        x = family.final_norm(cfg)(x)  # [B, T, D]
        if return_hidden:
            out = x.astype(jnp.float32)
        else:
            out = mask_padded_logits(self._head(x, table), cfg)  # [B, T, V]
        return out if cache is None else (out, new_cache)

    def _head(self, x: jax.Array, table: jax.Array) -> jax.Array:
        """x [B, T, D] -> float32 logits [B, T, V padded] by the tied token table [V, D] or
        lm_head [D, V]; float32 whatever the compute dtype."""
        cfg = self.config
        project = kernels.select(cfg.kernels).project
        if cfg.tie_embeddings:
            return project(x, table, True, jnp.float32)
        kernel = self.param("lm_head", param(kernel_init(cfg), ("embed", "vocab")),
                            (cfg.emb_dim, cfg.padded_vocab_size), jnp.float32)
        return project(x, kernel, False, jnp.float32)


def run_blocks(cfg: GPTConfig, family: Family, deterministic: bool, x, cache, mask, cache_index,
               positions):
    """The family's blocks on x [B, T, D], under remat and/or scan (inside GPT's scope, whose
    parameters they are). Returns x [B, T, D] and the updated cache [L, B, Hkv, S, K] (or None)."""
    block = family.block
    if cfg.remat_policy != "none":
        block = nn.remat(block, policy=remat_policy(cfg.remat_policy),
                         prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
        stack = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),  # cache scanned over L
            length=cfg.n_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, deterministic, name=family.stack)
        return stack(x, cache, mask, cache_index, positions)
    new_cache = cache  # [L, B, Hkv, S, K], each layer updates its own slice in place
    for i in range(cfg.n_layers):
        x, new_cache = block(cfg, deterministic, i, name=f"{family.stack}_{i}")(
            x, new_cache, mask, cache_index, positions)
    return x, new_cache


def output_head(params, config: GPTConfig) -> tuple[jax.Array, bool]:
    """The LM head's weight and whether it is transposed: the tied token embedding [V, D]
    (True) or lm_head [D, V] (False)."""
    if config.tie_embeddings:
        return params["wte" if config.family == "gpt2" else "embed_tokens"]["embedding"], True
    return params["lm_head"], False


def head_logits(params, config: GPTConfig, h: jax.Array) -> jax.Array:
    """Output head on final hidden states [B, D] -> float32 logits [B, V], as the model does."""
    dt, project = config.compute_dtype, kernels.select(config.kernels).project
    weight, transposed = output_head(params, config)
    logits = project(h.astype(dt), weight.astype(dt), transposed, jnp.float32)  # [B, V padded]
    return logits[:, :config.vocab_size]  # a padded vocabulary's extra columns: never drawn


# What padded vocabulary columns' logits become: finite, so that 0 * logit stays 0, and low
# enough that softmax gives them exactly 0 and neither argmax nor sampling can pick them.
PADDED_LOGIT = -1e30


def mask_padded_logits(logits: jax.Array, config: GPTConfig) -> jax.Array:
    """Logits [..., V padded] with the columns past config.vocab_size set to PADDED_LOGIT."""
    if config.padded_vocab_size == config.vocab_size:
        return logits
    real = jnp.arange(logits.shape[-1]) < config.vocab_size  # [V]
    return jnp.where(real, logits, jnp.asarray(PADDED_LOGIT, logits.dtype))


def validate_ids(ids, config: GPTConfig) -> None:
    """Raise a one-line ValueError for ids a GPT cannot take (checked on the host)."""
    if ids.ndim != 2:
        raise ValueError(f"token ids must have shape [batch, time], got shape {tuple(ids.shape)}")
    if ids.shape[1] > config.context_length:
        raise ValueError(
            f"sequence length {ids.shape[1]} exceeds context_length={config.context_length}"
        )
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
    if isinstance(ids, jax.core.Tracer):
        return  # values are unknown inside jit; callers validate on the host first
    host = np.asarray(ids)
    if host.size and (host.min() < 0 or host.max() >= config.vocab_size):
        bad = host[(host < 0) | (host >= config.vocab_size)][0]
        raise ValueError(f"token id {int(bad)} is outside the vocabulary [0, {config.vocab_size})")


def _init(config: GPTConfig, key: jax.Array):
    ids = jnp.zeros((1, 1), jnp.int32)
    return GPT(config).init({"params": key}, ids)["params"]


def init_params(config: GPTConfig, key: jax.Array, *, boxed: bool = False):
    """Fresh float32 parameters: a plain dict tree, or with `boxed` each leaf in an
    nn.LogicallyPartitioned box that carries its logical axis names (what a Trainer shards by)."""
    params = jax.jit(_init, static_argnums=0)(config, key)
    return params if boxed else nn.meta.unbox(params)


def abstract_params(config: GPTConfig, *, boxed: bool = True):
    """`init_params`'s tree as shapes and dtypes only (nothing allocated), boxed by default."""
    shapes = jax.eval_shape(functools.partial(_init, config), jax.random.key(0))
    return shapes if boxed else nn.meta.unbox(shapes)


def logical_axes(config: GPTConfig):
    """The tree of PartitionSpecs of logical axis names, matching `init_params`'s tree."""
    return nn.get_partition_spec(abstract_params(config))


def count_params(params) -> int:
    """Total number of scalars in a parameter tree."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
