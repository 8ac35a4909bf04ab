"""Llama 3 and Qwen3 weights in Hugging Face's safetensors layout: config.json <-> GPTConfig and
a rename table between LlamaForCausalLM / Qwen3ForCausalLM tensors and jaxgpt's parameters.

Layouts: HF linears are [out, in]; jaxgpt kernels are [in, out] with heads split out, so
q_proj [H K, D] -> [D, H, K], k_proj/v_proj [Hkv K, D] -> [D, Hkv, K], o_proj [D, H K] ->
[H, K, D], gate/up [F, D] -> [D, F], down [D, F] -> [F, D], lm_head [V, D] -> [D, V]; norms
and the embedding keep theirs.

Loading streams: the key set and every shape are checked from the file headers first; then each
jaxgpt leaf is read from disk (a plain read, not a memory map, so the page cache does not count
as the process's memory), converted, and put at once in its final place (its shard of the mesh,
when one is given) before the next is read, so the host holds the model once plus one tensor.
A float32 or bfloat16 checkpoint loads as float32, or as `param_dtype` (e.g. "bfloat16").
Saving writes float32 tensors, split into model-0000i-of-0000n.safetensors shards with an index
when they pass `max_shard_size` bytes.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from jaxgpt.config import GPTConfig
from jaxgpt.weights.hf_files import (
    INDEX,
    WEIGHTS,
    read_json,
    replace_atomically,
    tensor_index,
    weight_files,
)
from jaxgpt.models.model import abstract_params
from jaxgpt.trees import check_like, flatten, unflatten

FAMILY_TYPES = ("llama", "qwen3")  # config.json model_type values loaded here
_ARCH = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Fields the tensors fix: a loader override may not change them.
_FIXED = ("family", "vocab_size", "emb_dim", "n_heads", "n_kv_heads", "head_width", "mlp_dim",
          "n_layers", "ln_eps", "rope_theta", "rope_factor", "rope_low_freq_factor",
          "rope_high_freq_factor", "rope_original_context")
_FILE_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}


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
    if family not in FAMILY_TYPES:
        raise ValueError(f"{source} has model_type={family!r}; expected one of {FAMILY_TYPES}")
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


def _sources(config: GPTConfig) -> dict[tuple, tuple[list[str], object]]:
    """jaxgpt leaf path -> (the HF tensors it is made of, in layer order; HF -> jaxgpt)."""
    out = {path: ([name], to_jx) for name, (path, to_jx, _) in _TOP.items()
           if name != "lm_head.weight" or not config.tie_embeddings}
    L = config.n_layers
    for suffix, (path, to_jx, _) in _layer_table(config).items():
        names = [f"model.layers.{i}.{suffix}" for i in range(L)]
        if config.scan_layers:
            out[("layers", *path)] = (names, to_jx)
        else:
            out.update({(f"layers_{i}", *path): ([n], to_jx) for i, n in enumerate(names)})
    return out


def _read(entry) -> np.ndarray:
    """One tensor read from its file into fresh memory (no memory map)."""
    file, key, _ = entry
    with open(file, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        meta = json.loads(f.read(n))[key]
        if meta["dtype"] not in _FILE_DTYPES:
            raise ValueError(f"{file}: tensor {key} has dtype {meta['dtype']}; expected a float type")
        start, end = meta["data_offsets"]
        f.seek(8 + n + start)
        x = np.fromfile(f, _FILE_DTYPES[meta["dtype"]], (end - start) // np.dtype(_FILE_DTYPES[meta["dtype"]]).itemsize)
    return x.reshape(meta["shape"])


def load_family(directory: str | os.PathLike, *, mesh=None, param_dtype=None,
                **overrides) -> tuple[GPTConfig, dict]:
    """(config, params) of a Llama/Qwen3 HF directory; each leaf goes straight to its shards of
    `mesh` (or the default device) as it is read. params are float32 unless `param_dtype`."""
    directory = Path(directory)
    source = directory / "config.json"
    hf = read_json(source)
    file_config = config_from_hf(hf, source)
    config = config_from_hf(hf, source, **overrides)
    headers = tensor_index(weight_files(directory))
    if file_config.tie_embeddings:
        headers.pop("lm_head.weight", None)  # a tied model's head is its embedding
    elif config.tie_embeddings:
        raise ValueError("cannot override tie_embeddings=True: the checkpoint has its own lm_head.weight")
    expected = hf_shapes(file_config)
    missing, extra = sorted(set(expected) - set(headers)), sorted(set(headers) - set(expected))
    if missing or extra:
        raise ValueError(f"{directory} does not hold a {config.family} model with {config.n_layers} "
                         f"layers: missing {missing or 'none'}; unexpected {extra or 'none'}")
    for name, shape in expected.items():
        if headers[name][2] != shape:
            raise ValueError(f"tensor {name} has shape {headers[name][2]}, expected {shape}")
    dtype = jnp.dtype(param_dtype or jnp.float32)
    shardings = None
    if mesh is not None:
        from jaxgpt.sharding import boxed_shardings

        shardings = flatten(boxed_shardings(abstract_params(config), mesh), sep=None)
    sources = _sources(config)
    if not config.tie_embeddings and file_config.tie_embeddings:  # untie: the head starts as the embedding
        sources[("lm_head",)] = (["model.embed_tokens.weight"], _t)
    flat = {}
    for path, (names, to_jx) in sources.items():
        parts = [to_jx(_read(headers[n]), config) for n in names]
        x = parts[0] if len(parts) == 1 else np.stack(parts)
        del parts
        x = np.asarray(x, dtype)  # one converted copy of this leaf
        if not np.isfinite(x).all():
            raise ValueError(f"{directory}: tensor {names[0]} holds NaN or infinite values")
        flat[path] = jax.device_put(x, shardings[path]) if shardings else jnp.asarray(x)
        del x
    return config, unflatten(flat)


def to_hf_tensors(config: GPTConfig, params) -> dict[str, np.ndarray]:
    """jaxgpt params (plain or scanned) -> the HF model's named float32 tensors, shapes checked."""
    expected = flatten(abstract_params(config, boxed=False), sep=None)
    flat = flatten(params, sep=None)
    check_like(flat, expected)
    get = lambda path: np.asarray(flat[path], np.float32)  # noqa: E731
    out = {}
    for name, (path, _, to_hf) in _TOP.items():
        if path in flat:
            out[name] = to_hf(get(path), config)
    for suffix, (path, _, to_hf) in _layer_table(config).items():
        stacked = get(("layers", *path)) if config.scan_layers else None
        for i in range(config.n_layers):
            x = stacked[i] if stacked is not None else get((f"layers_{i}", *path))
            out[f"model.layers.{i}.{suffix}"] = to_hf(x, config)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_family(config: GPTConfig, params, directory: str | os.PathLike, *,
                max_shard_size: int = 5 << 30, **config_extra) -> Path:
    """Write config.json and safetensors (sharded with an index past max_shard_size bytes)
    that LlamaForCausalLM / Qwen3ForCausalLM.from_pretrained load."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_tensors(config, params)
    shards, size = [{}], 0
    for name, x in tensors.items():
        if shards[-1] and size + x.nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    for stale in [*directory.glob("model-*-of-*.safetensors"), directory / INDEX, directory / WEIGHTS]:
        stale.unlink(missing_ok=True)
    meta = {"format": "pt"}
    if len(shards) == 1:
        replace_atomically(directory / WEIGHTS, lambda tmp: save_file(shards[0], tmp, metadata=meta))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            replace_atomically(directory / fname, lambda tmp, s=shard: save_file(s, tmp, metadata=meta))
            weight_map.update(dict.fromkeys(shard, fname))
        index = {"metadata": {"total_size": sum(x.nbytes for x in tensors.values())},
                 "weight_map": weight_map}
        replace_atomically(directory / INDEX,
                           lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2) + "\n"))
    text = json.dumps(hf_config(config, **config_extra), indent=2) + "\n"
    replace_atomically(directory / "config.json", lambda tmp: Path(tmp).write_text(text))
    return directory
