"""GPT-2's block (chapter 4): pre-LayerNorm attention and a GELU MLP, each with a residual.

Shape legend (as in model.py): B batch, T time, S key slots, D model width, H heads, K head
width (D / H), F MLP width (4 D), V vocabulary.

Parameter names mirror Hugging Face's GPT-2 (wte, wpe, h_<i>, ln_1, attn, c_proj, ln_2, mlp,
c_fc, ln_f) so weight import/export is a rename table; the fused `c_attn` of GPT-2 is kept as
separate `query`, `key`, `value` kernels of shape [D, H, K], which tensor parallelism can split by
head. `embed` and `final_norm` are this family's ends of the GPT skeleton (model.py).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from jaxgpt import kernels
from jaxgpt.config import GPTConfig
from jaxgpt.kernels.dropout import Dropout
from jaxgpt.models.cache import Cache, write_layer
from jaxgpt.models.layers import Dense, bias_init, embed_init, kernel_init, layer_norm, param
from jaxgpt.sharding import constrain


def embed(cfg: GPTConfig, ids: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Token plus learned position embeddings [B, T, D], and the token table [V, D] (a tied
    head's weight). Called inside the GPT module's scope: the tables are its wte and wpe."""
    wte = nn.Embed(
        cfg.padded_vocab_size, cfg.emb_dim,  # V rows, padded to vocab_multiple
        embedding_init=param(embed_init(cfg, 0.02), ("vocab", "embed")), name="wte",
    )
    wpe = nn.Embed(
        cfg.context_length, cfg.emb_dim,
        embedding_init=param(embed_init(cfg, 0.01), (None, "embed")), name="wpe",
    )
    return wte(ids) + wpe(positions), wte.embedding  # [B, T, D], [V, D]


def final_norm(cfg: GPTConfig) -> nn.Module:
    return layer_norm(cfg, "ln_f")


class MLP(nn.Module):
    config: GPTConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = lambda feats, names, fan_in, residual, name: Dense(  # noqa: E731
            (feats,), names, kernel_init(cfg, residual=residual), bias_init(cfg, fan_in),
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
            y = Dense((H, K), ("embed", "heads", "kv"), kernel_init(cfg),
                      bias_init(cfg, cfg.emb_dim) if cfg.qkv_bias else None,
                      dtype=cfg.compute_dtype, kernels=cfg.kernels, name=name)(x)  # [B, T, H, K]
            return constrain(y, ("batch", "length", "heads", "kv"))

        q, k, v = proj("query"), proj("key"), proj("value")
        new_cache = None
        if layer_cache is not None:
            # Write this call's keys/values at slot cache_index; attend over the whole cache.
            new_cache, k, v = write_layer(layer_cache, self.layer, k, v, cache_index, q.dtype)

        rate = cfg.attention_drop_rate
        use_dropout = not self.deterministic and rate > 0.0
        rng = self.make_rng("dropout") if use_dropout else None
        ops = kernels.select(cfg.kernels)
        attend = ops.attention if layer_cache is None else ops.cache_attention
        out = attend(q, k, v, mask, dropout_rate=rate, dropout_rng=rng,
                     deterministic=not use_dropout)  # [B, T, H, K]
        y = Dense((cfg.emb_dim,), ("heads", "kv", "embed"), kernel_init(cfg, residual=True),
                  bias_init(cfg, cfg.emb_dim), n_in=2, dtype=cfg.compute_dtype,
                  kernels=cfg.kernels, name="c_proj")(out)  # [B, T, D]
        return y, new_cache


class Block(nn.Module):
    """Pre-LayerNorm transformer block. Its call is the skeleton's scan-friendly (carry, xs)
    signature, shared by every family; GPT-2 adds positions at the embedding, not here."""

    config: GPTConfig
    deterministic: bool = True
    layer: int | None = None  # index into a stacked cache (see CausalSelfAttention)

    @nn.compact
    def __call__(self, x, layer_cache, mask, cache_index, positions):
        del positions
        cfg = self.config
        drop = Dropout(cfg.drop_rate, deterministic=self.deterministic)
        a, new_cache = CausalSelfAttention(cfg, self.deterministic, self.layer, name="attn")(
            layer_norm(cfg, "ln_1")(x), mask, layer_cache, cache_index
        )
        x = x + drop(a)  # residual around attention, dropout on the shortcut as in the book
        x = x + drop(MLP(cfg, self.deterministic, name="mlp")(layer_norm(cfg, "ln_2")(x)))
        x = constrain(x, ("batch", "length", "embed"))
        return x, new_cache
