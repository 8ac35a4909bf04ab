"""Llama 3 and Qwen3 in Hugging Face's layout: config.json <-> GPTConfig and a rename table
between LlamaForCausalLM / Qwen3ForCausalLM tensors and jaxgpt's parameters
(jaxgpt.weights.huggingface reads and writes the files, for every family).

Layouts: HF linears are [out, in]; jaxgpt kernels are [in, out] with heads split out, so
q_proj [H K, D] -> [D, H, K], k_proj/v_proj [Hkv K, D] -> [D, Hkv, K], o_proj [D, H K] ->
[H, K, D], gate/up [F, D] -> [D, F], down [D, F] -> [F, D], lm_head [V, D] -> [D, V]; norms
and the embedding keep theirs.
"""

from __future__ import annotations

import os

import numpy as np

from jaxgpt.config import GPTConfig

MODEL_TYPES = ("llama", "qwen3")  # config.json model_type values of this family
BLOCK, HF_BLOCK = "layers", "model.layers.{}."  # block i: layers_<i> (layers, stacked, with scan_layers)
EMBEDDING, HEAD = "model.embed_tokens.weight", "lm_head.weight"
_ARCH = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Fields the tensors fix: a loader override may not change them.
_FIXED = ("family", "vocab_size", "emb_dim", "n_heads", "n_kv_heads", "head_width", "mlp_dim",
          "n_layers", "ln_eps", "rope_theta", "rope_factor", "rope_low_freq_factor",
          "rope_high_freq_factor", "rope_original_context")


def _linear_in(heads_of):  # HF [h K, D] -> jaxgpt [D, h, K]
    return lambda x, c: x.T.reshape(c.emb_dim, heads_of(c), c.head_dim)


def _linear_out(heads_of):  # jaxgpt [D, h, K] -> HF [h K, D]
    return lambda x, c: x.reshape(c.emb_dim, heads_of(c) * c.head_dim).T


def _same(x, c):
    return x


def _t(x, c):
    return x.T


# HF suffix in model.layers.<i> -> (jaxgpt path in layers_<i>, HF -> jaxgpt, jaxgpt -> HF).
_LAYER = {
    "input_layernorm.weight": (("input_layernorm", "scale"), _same, _same),
    "post_attention_layernorm.weight": (("post_attention_layernorm", "scale"), _same, _same),
    "self_attn.q_proj.weight": (("self_attn", "q_proj", "kernel"),
                                _linear_in(lambda c: c.n_heads), _linear_out(lambda c: c.n_heads)),
    "self_attn.k_proj.weight": (("self_attn", "k_proj", "kernel"),
                                _linear_in(lambda c: c.kv_heads), _linear_out(lambda c: c.kv_heads)),
    "self_attn.v_proj.weight": (("self_attn", "v_proj", "kernel"),
                                _linear_in(lambda c: c.kv_heads), _linear_out(lambda c: c.kv_heads)),
    "self_attn.o_proj.weight": (("self_attn", "o_proj", "kernel"),
                                lambda x, c: x.T.reshape(c.n_heads, c.head_dim, c.emb_dim),
                                lambda x, c: x.reshape(c.n_heads * c.head_dim, c.emb_dim).T),
    "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), _t, _t),
    "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), _t, _t),
    "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), _t, _t),
}
_QK_NORM = {  # qwen3 only
    "self_attn.q_norm.weight": (("self_attn", "q_norm", "scale"), _same, _same),
    "self_attn.k_norm.weight": (("self_attn", "k_norm", "scale"), _same, _same),
}
_TOP = {
    "model.embed_tokens.weight": (("embed_tokens", "embedding"), _same, _same),
    "model.norm.weight": (("norm", "scale"), _same, _same),
    "lm_head.weight": (("lm_head",), _t, _t),
}


def _layer_table(config: GPTConfig) -> dict:
    return {**_LAYER, **(_QK_NORM if config.family == "qwen3" else {})}


def hf_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of the HF checkpoint for `config`."""
    V, D, F, K = config.vocab_size, config.emb_dim, config.mlp_width, config.head_dim
    H, Hkv = config.n_heads, config.kv_heads
    layer = {"input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
             "self_attn.q_proj.weight": (H * K, D), "self_attn.k_proj.weight": (Hkv * K, D),
             "self_attn.v_proj.weight": (Hkv * K, D), "self_attn.o_proj.weight": (D, H * K),
             "mlp.gate_proj.weight": (F, D), "mlp.up_proj.weight": (F, D),
             "mlp.down_proj.weight": (D, F)}
    if config.family == "qwen3":
        layer.update({"self_attn.q_norm.weight": (K,), "self_attn.k_norm.weight": (K,)})
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(config.n_layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in layer.items()})
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


def _rope(hf: dict, source) -> dict:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{source} has rope_parameters={rope!r}; expected an object")
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    out = {"rope_theta": float(theta)}
    if kind == "llama3":
        out.update(rope_factor=float(rope["factor"]),
                   rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                   rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                   rope_original_context=int(rope.get("original_max_position_embeddings", 8192)))
    elif kind != "default":
        raise ValueError(f"{source} has rope_type={kind!r}; jaxgpt supports 'default' and 'llama3'")
    return out


def config_from_hf(hf: dict, source: str | os.PathLike = "config.json", **overrides) -> GPTConfig:
    """A GPTConfig from a Llama or Qwen3 config.json dict (checked for features jaxgpt lacks)."""
    family = hf.get("model_type")
    if family not in MODEL_TYPES:
        raise ValueError(f"{source} has model_type={family!r}; expected one of {MODEL_TYPES}")
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "max_position_embeddings")
    lacking = [k for k in sizes if k not in hf]
    if lacking:
        raise ValueError(f"{source} lacks {', '.join(lacking)}")
    for flag, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu"),
                     ("use_sliding_window", False), ("pretraining_tp", 1)):
        if hf.get(flag, ok) != ok:
            raise ValueError(f"{source} has {flag}={hf[flag]!r}; jaxgpt supports only {ok!r}")
    D, H = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or D // H
    base = dict(family=family, vocab_size=hf["vocab_size"], emb_dim=D, n_heads=H,
                n_kv_heads=hf.get("num_key_value_heads") or H, n_layers=hf["num_hidden_layers"],
                mlp_dim=hf["intermediate_size"], context_length=hf["max_position_embeddings"],
                head_width=head_dim, ln_eps=float(hf.get("rms_norm_eps", 1e-6)), drop_rate=0.0,
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **_rope(hf, source))
    try:
        GPTConfig.from_dict(base)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None
    for name, value in overrides.items():
        if name in _FIXED and value != base[name]:
            raise ValueError(f"cannot override {name}={value!r}: the checkpoint fixes it to {base[name]!r}")
    return GPTConfig.from_dict({**base, **overrides})


def hf_config(config: GPTConfig, **extra) -> dict:
    """The config.json dict transformers reads for `config` (extra: e.g. bos/eos_token_id)."""
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_factor is not None:
        rope.update(rope_type="llama3", factor=config.rope_factor,
                    low_freq_factor=config.rope_low_freq_factor,
                    high_freq_factor=config.rope_high_freq_factor,
                    original_max_position_embeddings=config.rope_original_context)
    out = {"model_type": config.family, "architectures": [_ARCH[config.family]],
           "vocab_size": config.vocab_size, "hidden_size": config.emb_dim,
           "intermediate_size": config.mlp_width, "num_hidden_layers": config.n_layers,
           "num_attention_heads": config.n_heads, "num_key_value_heads": config.kv_heads,
           "head_dim": config.head_dim, "max_position_embeddings": config.context_length,
           "rms_norm_eps": config.ln_eps, "tie_word_embeddings": config.tie_embeddings,
           "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
           "rope_parameters": rope, "rope_theta": config.rope_theta, "dtype": "float32",
           "use_cache": True}
    if config.family == "llama":
        out["mlp_bias"] = False
    return {**out, **extra}


def top_leaves(config: GPTConfig) -> dict[tuple, tuple[str, object]]:
    """jaxgpt leaf path outside the blocks -> (HF name, HF array -> jaxgpt array)."""
    return {path: (name, to_jx) for name, (path, to_jx, _) in _TOP.items()
            if name != HEAD or not config.tie_embeddings}


def block_leaves(config: GPTConfig) -> dict[tuple, tuple[str, object]]:
    """jaxgpt leaf path inside layer i -> (HF name suffix after `model.layers.<i>.`, HF -> jaxgpt)."""
    return {path: (suffix, to_jx) for suffix, (path, to_jx, _) in _layer_table(config).items()}


def tensors_to_hf(config: GPTConfig, flat: dict[tuple, np.ndarray]) -> dict[str, np.ndarray]:
    """jaxgpt's float32 leaves (layers unstacked, layers_<i>/...) -> the HF model's named tensors."""
    out = {name: to_hf(flat[path], config) for name, (path, _, to_hf) in _TOP.items() if path in flat}
    for suffix, (path, _, to_hf) in _layer_table(config).items():
        for i in range(config.n_layers):
            out[f"model.layers.{i}.{suffix}"] = to_hf(flat[(f"layers_{i}", *path)], config)
    return out
