"""The Llama 3 / Qwen3 decoder: the pieces the GPT-2 block does not have, chosen by config.family.

Shape legend (as in model.py): B batch, T time, S key slots, L layers, D model width, H query
heads, G query heads per key/value head (H / Hkv), K head width, F MLP width, V vocabulary;
Hkv is the number of key/value heads.

  RMSNorm           x / rms(x) * scale, computed in float32 (HF's LlamaRMSNorm)
  rotary positions  Llama's "rotate half" layout, angles from each token's own position, so a
                    left-padded row whose positions start at 0 at its first real token is exact;
                    Llama 3's frequency scaling when config.rope_factor is set
  SwiGLU MLP        down(silu(gate(x)) * up(x)), no biases
  grouped queries   Hkv key/value heads, each read by G query heads; the KV cache holds only the
                    Hkv heads ([L, B, Hkv, S, K]) and decoding contracts it group-wise
  qk norm (qwen3)   RMSNorm over K on every query and key head, before the rotation

Parameter names mirror Hugging Face's LlamaForCausalLM / Qwen3ForCausalLM (embed_tokens,
layers_<i>/{input_layernorm, self_attn/{q,k,v,o}_proj, q_norm, k_norm, post_attention_layernorm,
mlp/{gate,up,down}_proj}, norm, lm_head), so jaxgpt.weights.llama maps the weights by a rename table.
`family_forward` is GPT.__call__ for these families: the same arguments, the same results.
A further family (e.g. Gemma 3) is a new value of config.family, its pieces here (a norm with
1 + scale, GeGLU, sliding-window masks) and a rename table in families.py.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import kernels
from jaxgpt.models.cache import build_mask, write_cache
from jaxgpt.config import GPTConfig
from jaxgpt.kernels.attention import masked_softmax
from jaxgpt.kernels.dropout import Dropout
from jaxgpt.models.model import (
    Dense,
    _kernel_init,
    _param,
    _remat_policy,
)
from jaxgpt.sharding import constrain


class RMSNorm(nn.Module):
    """x [..., N] / sqrt(mean(x^2) + eps) * scale [N], in float32, returned in x's dtype."""

    eps: float
    names: tuple[str, ...] = ("embed",)

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", _param(nn.initializers.ones, self.names), (x.shape[-1],),
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
    """x [B, T, H, K] rotated by angles positions [B|1, T] * inv_freq [K/2] ("rotate half")."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B|1, T, K/2]
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]  # [B|1, T, 1, K/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # 2 x [B, T, H, K/2]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def grouped_cache_attention(q, k, v, mask):
    """q [B, T, H, K] over a cache k, v [B, Hkv, S, K] holding only the kv heads; mask
    [B|1, 1, T, S]. Query head h reads kv head h // G (HF's repeat_kv order)."""
    B, T, H, K = q.shape
    hkv, G = k.shape[1], H // k.shape[1]
    # The G query heads of a kv head and the T queries form one row axis, so both products are
    # plain (B, Hkv)-batched matmuls that read the cache where it lies.
    qg = jnp.swapaxes(q.reshape(B, T, hkv, G, K), 1, 2).reshape(B, hkv, T * G, K)  # [B, Hkv, T G, K]
    scores = jnp.einsum("bhqk,bhsk->bhqs", qg, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(B, hkv, T, G, -1)  # [B, Hkv, T, G, S]
    weights = masked_softmax(scores / math.sqrt(K), mask[:, :, :, None])  # mask [B|1, 1, T, 1, S]
    out = jnp.einsum("bhqs,bhsk->bhqk", weights.reshape(B, hkv, T * G, -1).astype(v.dtype), v)
    return jnp.swapaxes(out.reshape(B, hkv, T, G, K), 1, 2).reshape(B, T, H, K)  # [B, T, H, K]


class GroupedAttention(nn.Module):
    """Causal self-attention with rotary positions and Hkv <= H key/value heads."""

    config: GPTConfig
    deterministic: bool = True
    layer: int | None = None  # index into a stacked [L, B, Hkv, S, K] cache (see model.py)

    @nn.compact
    def __call__(self, x, mask, layer_cache, cache_index, positions):
        cfg = self.config
        H, Hkv, K = cfg.n_heads, cfg.kv_heads, cfg.head_dim

        def proj(name, heads, axis):
            y = Dense((heads, K), ("embed", axis, "kv"), _kernel_init(cfg), None,
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
        new_cache = None
        if layer_cache is None:
            G = H // Hkv
            k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)  # [B, T, H, K]
            out = kernels.select(cfg.kernels).attention(
                q, k, v, mask, dropout_rate=rate, dropout_rng=rng,
                deterministic=not use_dropout)  # [B, T, H, K]
        else:
            lead = () if self.layer is None else (self.layer,)
            new_cache = {n: write_cache(layer_cache[n], t, lead, cache_index)
                         for n, t in (("k", k), ("v", v))}  # [L, B, Hkv, S, K] or [B, Hkv, S, K]
            ck, cv = (new_cache[n][lead].astype(q.dtype) for n in ("k", "v"))  # [B, Hkv, S, K]
            out = grouped_cache_attention(q, ck, cv, mask)  # [B, T, H, K]
        y = Dense((cfg.emb_dim,), ("heads", "kv", "embed"), _kernel_init(cfg, residual=True), None,
                  n_in=2, dtype=cfg.compute_dtype, kernels=cfg.kernels, name="o_proj")(out)
        return y, new_cache  # [B, T, D]


class SwiGLU(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = lambda feats, names, residual, name: Dense(  # noqa: E731
            (feats,), names, _kernel_init(cfg, residual=residual), None,
            dtype=cfg.compute_dtype, kernels=cfg.kernels, name=name)
        gate = dense(cfg.mlp_width, ("embed", "mlp"), False, "gate_proj")(x)  # [B, T, F]
        up = dense(cfg.mlp_width, ("embed", "mlp"), False, "up_proj")(x)  # [B, T, F]
        h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return dense(cfg.emb_dim, ("mlp", "embed"), True, "down_proj")(h)  # [B, T, D]


class FamilyBlock(nn.Module):
    """Pre-RMSNorm block; scan-friendly (carry, xs) signature like model.Block."""

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


def family_forward(module: nn.Module, ids, deterministic, positions, attention_mask, cache,
                   cache_index, return_hidden):
    """GPT.__call__'s body for the llama/qwen3 families (called inside its compact scope)."""
    cfg = module.config
    T = ids.shape[1]
    embed = nn.Embed(cfg.vocab_size, cfg.emb_dim,
                     embedding_init=_param(nn.initializers.normal(0.02), ("vocab", "embed")),
                     name="embed_tokens")
    x = Dropout(cfg.drop_rate, deterministic=deterministic)(embed(ids))  # [B, T, D]
    x = constrain(x.astype(cfg.compute_dtype), ("batch", "length", "embed"))
    mask = build_mask(T, cache, cache_index, attention_mask)  # None or [B|1, 1, T, S]
    block = FamilyBlock
    if cfg.remat_policy != "none":
        block = nn.remat(block, policy=_remat_policy(cfg.remat_policy), prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
        stack = nn.scan(block, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.n_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})(cfg, deterministic, name="layers")
        x, new_cache = stack(x, cache, mask, cache_index, positions)  # caches [L, B, Hkv, S, K]
    else:
        new_cache = cache
        for i in range(cfg.n_layers):
            x, new_cache = block(cfg, deterministic, i, name=f"layers_{i}")(
                x, new_cache, mask, cache_index, positions)
    x = RMSNorm(cfg.ln_eps, name="norm")(x)  # [B, T, D]
    project = kernels.select(cfg.kernels).project
    if return_hidden:
        out = x.astype(jnp.float32)
    elif cfg.tie_embeddings:
        out = project(x, embed.embedding, True, jnp.float32)  # [B, T, V]
    else:
        kernel = module.param("lm_head", _param(_kernel_init(cfg), ("embed", "vocab")),
                              (cfg.emb_dim, cfg.vocab_size), jnp.float32)
        out = project(x, kernel, False, jnp.float32)  # [B, T, V]
    return out if cache is None else (out, new_cache)
