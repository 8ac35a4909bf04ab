"""The Llama 3 / Qwen3 block: the pieces the GPT-2 block does not have, chosen by config.family.

Shape legend (as in model.py): B batch, T time, S key slots, L layers, D model width, H query
heads, Hkv key/value heads, G query heads per key/value head (H / Hkv), K head width, F MLP
width, V vocabulary.

  RMSNorm           x / rms(x) * scale, computed in float32 (layers.RMSNorm)
  rotary positions  Llama's "rotate half" layout (layers.apply_rope), Llama 3's frequency
                    scaling when config.rope_factor is set
  SwiGLU MLP        down(silu(gate(x)) * up(x)), no biases
  grouped queries   Hkv key/value heads, each read by G query heads; the KV cache holds only the
                    Hkv heads ([L, B, Hkv, S, K]) and decoding contracts it group-wise
                    (kernels.attention.grouped_cache_attention)
  qk norm (qwen3)   RMSNorm over K on every query and key head, before the rotation

Parameter names mirror Hugging Face's LlamaForCausalLM / Qwen3ForCausalLM (embed_tokens,
layers_<i>/{input_layernorm, self_attn/{q,k,v,o}_proj, q_norm, k_norm, post_attention_layernorm,
mlp/{gate,up,down}_proj}, norm, lm_head), so jaxgpt.weights.llama maps the weights by a rename
table. `embed` and `final_norm` are these families' ends of the GPT skeleton (model.py). A
further family (e.g. Gemma 3) is a new value of config.family, its block in a module like this
one (a norm with 1 + scale, GeGLU, sliding-window masks), its entry in model.FAMILIES and a
rename table in jaxgpt.weights.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt import kernels
from jaxgpt.config import GPTConfig
from jaxgpt.kernels.dropout import Dropout
from jaxgpt.models.cache import write_layer
from jaxgpt.models.layers import Dense, RMSNorm, apply_rope, kernel_init, param, rope_frequencies
from jaxgpt.sharding import constrain


def embed(cfg: GPTConfig, ids: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Token embeddings [B, T, D] (positions enter as rotations, in the attention), and the
    table [V, D] (a tied head's weight). Called inside the GPT module's scope."""
    del positions
    table = nn.Embed(cfg.vocab_size, cfg.emb_dim,
                     embedding_init=param(nn.initializers.normal(0.02), ("vocab", "embed")),
                     name="embed_tokens")
    return table(ids), table.embedding  # [B, T, D], [V, D]


def final_norm(cfg: GPTConfig) -> nn.Module:
    return RMSNorm(cfg.ln_eps, name="norm")


class GroupedAttention(nn.Module):
    """Causal self-attention with rotary positions and Hkv <= H key/value heads."""

    config: GPTConfig
    deterministic: bool = True
    layer: int | None = None  # index into a stacked [L, B, Hkv, S, K] cache (see cache.py)

    @nn.compact
    def __call__(self, x, mask, layer_cache, cache_index, positions):
        cfg = self.config
        H, Hkv, K = cfg.n_heads, cfg.kv_heads, cfg.head_dim

        def proj(name, heads, axis):
            y = Dense((heads, K), ("embed", axis, "kv"), kernel_init(cfg), None,
                      dtype=cfg.compute_dtype, kernels=cfg.kernels, name=name)(x)  # [B, T, h, K]
            return constrain(y, ("batch", "length", axis, "kv"))

        q, k, v = proj("q_proj", H, "heads"), proj("k_proj", Hkv, "kv_heads"), proj("v_proj", Hkv, "kv_heads")
        if cfg.family == "qwen3":
            q = RMSNorm(cfg.ln_eps, ("kv",), name="q_norm")(q)
            k = RMSNorm(cfg.ln_eps, ("kv",), name="k_norm")(k)
        inv_freq = rope_frequencies(cfg)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)

        rate = cfg.attention_drop_rate
        use_dropout = not self.deterministic and rate > 0.0
        rng = self.make_rng("dropout") if use_dropout else None
        ops = kernels.select(cfg.kernels)
        new_cache = None
        if layer_cache is None:
            G = H // Hkv
            k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)  # [B, T, H, K]
            out = ops.attention(q, k, v, mask, dropout_rate=rate, dropout_rng=rng,
                                deterministic=not use_dropout)  # [B, T, H, K]
        else:
            new_cache, ck, cv = write_layer(layer_cache, self.layer, k, v, cache_index, q.dtype)
            out = ops.grouped_cache_attention(q, ck, cv, mask)  # ck, cv [B, Hkv, S, K] -> [B, T, H, K]
        y = Dense((cfg.emb_dim,), ("heads", "kv", "embed"), kernel_init(cfg, residual=True), None,
                  n_in=2, dtype=cfg.compute_dtype, kernels=cfg.kernels, name="o_proj")(out)
        return y, new_cache  # [B, T, D]


class SwiGLU(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = lambda feats, names, residual, name: Dense(  # noqa: E731
            (feats,), names, kernel_init(cfg, residual=residual), None,
            dtype=cfg.compute_dtype, kernels=cfg.kernels, name=name)
        gate = dense(cfg.mlp_width, ("embed", "mlp"), False, "gate_proj")(x)  # [B, T, F]
        up = dense(cfg.mlp_width, ("embed", "mlp"), False, "up_proj")(x)  # [B, T, F]
        h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return dense(cfg.emb_dim, ("mlp", "embed"), True, "down_proj")(h)  # [B, T, D]


class Block(nn.Module):
    """Pre-RMSNorm block, with the skeleton's scan-friendly (carry, xs) signature (gpt2.Block's)."""

    config: GPTConfig
    deterministic: bool = True
    layer: int | None = None

    @nn.compact
    def __call__(self, x, layer_cache, mask, cache_index, positions):
        cfg = self.config
        drop = Dropout(cfg.drop_rate, deterministic=self.deterministic)
        a, new_cache = GroupedAttention(cfg, self.deterministic, self.layer, name="self_attn")(
            RMSNorm(cfg.ln_eps, name="input_layernorm")(x), mask, layer_cache, cache_index, positions)
        x = x + drop(a)
        x = x + drop(SwiGLU(cfg, name="mlp")(RMSNorm(cfg.ln_eps, name="post_attention_layernorm")(x)))
        return constrain(x, ("batch", "length", "embed")), new_cache
