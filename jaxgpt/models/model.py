"""The GPT architecture (chapter 4) in flax.linen.

Shape legend (used in every shape comment and einsum):
  B batch, T time (queries), S key slots (cache length), L layers, D model width (emb_dim),
  H heads, K head width (D / H), F MLP width (4 D), V vocabulary.

Parameter names mirror Hugging Face's GPT-2 (wte, wpe, h_<i>, ln_1, attn, c_proj, ln_2, mlp,
c_fc, ln_f) so weight import/export is a rename table; the fused `c_attn` of GPT-2 is kept as
separate `query`, `key`, `value` kernels of shape [D, H, K], which tensor parallelism can split by
head. Every parameter carries logical axis names (see `jaxgpt.sharding` for the rules table),
and the activations between layers are pinned by the same names with `constrain`.

With `scan_layers` the blocks live under one `h` entry whose leaves have a leading L axis.
A KV cache, when given, is a dict {"k", "v"} of [L, B, H, S, K] arrays (jaxgpt/models/cache.py: its
layout, the write at `cache_index`, the mask over it); the call returns the updated cache beside
the logits.

Llama 3 and Qwen3 (config.family) run through the same `GPT` call, built from the pieces in
`jaxgpt.models.llama` (RMSNorm, rotary positions, SwiGLU, grouped-query attention) under Hugging
Face's names for those families; their cache is [L, B, Hkv, S, K], only the key/value heads.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import kernels
from jaxgpt.models.cache import Cache, build_mask, write_cache
from jaxgpt.config import GPTConfig
from jaxgpt.kernels.dropout import Dropout
from jaxgpt.sharding import constrain


def _kernel_init(cfg: GPTConfig, residual: bool = False):
    """GPT-2's N(0, 0.02) (residual projections scaled by 1/sqrt(2 L)), or PyTorch's default
    for nn.Linear, U(+-1/sqrt(fan_in)), which the book's GPTModel gets."""
    if cfg.init == "torch":
        # Dense hands initializers the kernel flattened to [fan_in, fan_out].
        return nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    return nn.initializers.normal(0.02 / np.sqrt(2 * cfg.n_layers) if residual else 0.02)


def _bias_init(cfg: GPTConfig, fan_in: int):
    if cfg.init == "torch":
        bound = 1.0 / np.sqrt(fan_in)
        return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
    return nn.initializers.zeros


def _embed_init(cfg: GPTConfig, std: float):
    return nn.initializers.normal(1.0 if cfg.init == "torch" else std)  # torch: N(0, 1)


def _param(init, names):
    return nn.with_logical_partitioning(init, names)


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

        kernel = self.param("kernel", _param(flat(self.kernel_init, (fan_in, fan_out)), self.names),
                            ins + tuple(self.features), jnp.float32)
        bias = None
        if self.bias_init is not None:
            bias = self.param("bias", _param(flat(self.bias_init, (fan_out,)), self.names[self.n_in:]),
                              tuple(self.features), jnp.float32)
        return kernels.select(self.kernels).dense(x, kernel, bias, self.n_in, self.dtype)


def _remat_policy(name: str):
    return {
        "full": None,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[name]


class MLP(nn.Module):
    config: GPTConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = lambda feats, names, fan_in, residual, name: Dense(  # noqa: E731
            (feats,), names, _kernel_init(cfg, residual=residual), _bias_init(cfg, fan_in),
            dtype=cfg.compute_dtype, kernels=cfg.kernels, name=name,
        )
        h = dense(4 * cfg.emb_dim, ("embed", "mlp"), cfg.emb_dim, False, "c_fc")(x)  # [B, T, F]
        h = constrain(h, ("batch", "length", "mlp"))
        h = kernels.select(cfg.kernels).gelu(h)  # GPT-2's tanh approximation
        return dense(cfg.emb_dim, ("mlp", "embed"), 4 * cfg.emb_dim, True, "c_proj")(h)  # [B, T, D]


class CausalSelfAttention(nn.Module):
    config: GPTConfig
    deterministic: bool = True
    # With a stacked [L, B, H, S, K] cache: this layer's index into it (None: a [B, H, S, K] cache).
    layer: int | None = None

    @nn.compact
    def __call__(self, x, mask, layer_cache: Cache | None, cache_index):
        cfg = self.config
        H, K = cfg.n_heads, cfg.head_dim

        def proj(name):
            y = Dense((H, K), ("embed", "heads", "kv"), _kernel_init(cfg),
                      _bias_init(cfg, cfg.emb_dim) if cfg.qkv_bias else None,
                      dtype=cfg.compute_dtype, kernels=cfg.kernels, name=name)(x)  # [B, T, H, K]
            return constrain(y, ("batch", "length", "heads", "kv"))

        q, k, v = proj("query"), proj("key"), proj("value")
        new_cache = None
        if layer_cache is not None:
            # Write this call's keys/values at slot cache_index; attend over the whole cache.
            # A stacked cache is updated where it lies: slicing a layer out and stacking the
            # layers back would copy the whole cache on every decoding step.
            lead = () if self.layer is None else (self.layer,)
            new_cache = {n: write_cache(layer_cache[n], t, lead, cache_index)
                         for n, t in (("k", k), ("v", v))}  # [L, B, H, S, K] or [B, H, S, K]
            k, v = (new_cache[n][lead].astype(q.dtype) for n in ("k", "v"))  # [B, H, S, K]

        rate = cfg.attention_drop_rate
        use_dropout = not self.deterministic and rate > 0.0
        rng = self.make_rng("dropout") if use_dropout else None
        ops = kernels.select(cfg.kernels)
        attend = ops.attention if layer_cache is None else ops.cache_attention
        out = attend(q, k, v, mask, dropout_rate=rate, dropout_rng=rng,
                     deterministic=not use_dropout)  # [B, T, H, K]
        y = Dense((cfg.emb_dim,), ("heads", "kv", "embed"), _kernel_init(cfg, residual=True),
                  _bias_init(cfg, cfg.emb_dim), n_in=2, dtype=cfg.compute_dtype,
                  kernels=cfg.kernels, name="c_proj")(out)  # [B, T, D]
        return y, new_cache


class Block(nn.Module):
    """Pre-LayerNorm transformer block; its call signature is scan-friendly (carry, xs)."""

    config: GPTConfig
    deterministic: bool = True
    layer: int | None = None  # index into a stacked cache (see CausalSelfAttention)

    @nn.compact
    def __call__(self, x, layer_cache, mask, cache_index):
        cfg = self.config
        ln = lambda name: nn.LayerNorm(  # noqa: E731
            epsilon=cfg.ln_eps,
            dtype=cfg.compute_dtype,
            scale_init=_param(nn.initializers.ones, ("embed",)),
            bias_init=_param(nn.initializers.zeros, ("embed",)),
            name=name,
        )
        drop = Dropout(cfg.drop_rate, deterministic=self.deterministic)
        a, new_cache = CausalSelfAttention(cfg, self.deterministic, self.layer, name="attn")(
            ln("ln_1")(x), mask, layer_cache, cache_index
        )
        x = x + drop(a)  # residual around attention, dropout on the shortcut as in the book
        x = x + drop(MLP(cfg, self.deterministic, name="mlp")(ln("ln_2")(x)))
        x = constrain(x, ("batch", "length", "embed"))
        return x, new_cache


class GPT(nn.Module):
    """GPT-2 style decoder: `apply({"params": p}, ids) -> logits [B, T, V]` in float32."""

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
        [B, S] marks real key slots (S = T without a cache, the cache length with one)."""
        cfg = self.config
        validate_ids(ids, cfg)
        B, T = ids.shape
        if positions is None:
            positions = jnp.reshape(cache_index, (-1, 1)) + jnp.arange(T)[None, :]  # [1|B, T]
        if cfg.family != "gpt2":  # llama/qwen3: their pieces live in layers.py
            from jaxgpt.models.llama import (
                family_forward,  # layers builds on this module's Dense
            )

            return family_forward(self, ids, deterministic, positions, attention_mask, cache,
                                  cache_index, return_hidden)

        wte = nn.Embed(
            cfg.padded_vocab_size, cfg.emb_dim,  # V rows, padded to vocab_multiple
            embedding_init=_param(_embed_init(cfg, 0.02), ("vocab", "embed")), name="wte",
        )
        wpe = nn.Embed(
            cfg.context_length, cfg.emb_dim,
            embedding_init=_param(_embed_init(cfg, 0.01), (None, "embed")), name="wpe",
        )
        x = wte(ids) + wpe(positions)  # [B, T, D]
        x = Dropout(cfg.drop_rate, deterministic=deterministic)(x)
        x = constrain(x.astype(cfg.compute_dtype), ("batch", "length", "embed"))

        mask = build_mask(T, cache, cache_index, attention_mask)  # None or [B|1, 1, T, S]
        block = Block
        if cfg.remat_policy != "none":
            block = nn.remat(block, policy=_remat_policy(cfg.remat_policy),
                             prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, deterministic, name="h")
            x, new_cache = stack(x, cache, mask, cache_index)  # caches [L, B, H, S, K]
        else:
            new_cache = cache  # [L, B, H, S, K], each layer updates its own slice in place
            for i in range(cfg.n_layers):
                x, new_cache = block(cfg, deterministic, i, name=f"h_{i}")(
                    x, new_cache, mask, cache_index
                )

        x = nn.LayerNorm(
            epsilon=cfg.ln_eps, dtype=cfg.compute_dtype,
            scale_init=_param(nn.initializers.ones, ("embed",)),
            bias_init=_param(nn.initializers.zeros, ("embed",)), name="ln_f",
        )(x)  # [B, T, D]
        if return_hidden:
            out = x.astype(jnp.float32)
        elif cfg.tie_embeddings:
            # Logits in float32 whatever the compute dtype.
            out = kernels.select(cfg.kernels).project(x, wte.embedding, True, jnp.float32)  # [B, T, V]
        else:
            kernel = self.param("lm_head", _param(_kernel_init(cfg), ("embed", "vocab")),
                                (cfg.emb_dim, cfg.padded_vocab_size), jnp.float32)
            out = kernels.select(cfg.kernels).project(x, kernel, False, jnp.float32)  # [B, T, V]
        if not return_hidden:
            out = mask_padded_logits(out, cfg)
        return out if cache is None else (out, new_cache)


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
