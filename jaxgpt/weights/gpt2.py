"""Import and export of GPT-2 weights in Hugging Face's safetensors layout.

The mapping is a rename table plus three layout changes: GPT-2's fused `c_attn` ([D, 3D] in
its Conv1D [in, out] layout, and a [3D] bias) splits into `query`/`key`/`value` kernels [D, H, K]
and biases [H, K]; the attention output `c_proj` [D, D] becomes [H, K, D]; an untied head
`lm_head.weight` [V, D] becomes `lm_head` [D, V]. Everything else keeps its layout.

Loading checks the whole key set and every shape from the file headers before reading a
tensor, then reads tensor by tensor (shard by shard), converting each to float32 in jaxgpt's
layout and dropping the source, so the process never holds two full copies of the weights.
Pickle checkpoints (`.bin`, `.pt`, `.pth`, `.ckpt`) are refused: unpickling can run code.

Choices: the imported config has `qkv_bias=True` (GPT-2 has biases), `drop_rate=0.0` (the book's
setting for pretrained weights; override it to fine-tune with dropout) and ties the head to the
token embedding unless config.json says `tie_word_embeddings: false` or the file carries an
`lm_head.weight` that differs from `wte.weight`. Export writes zero q/k/v biases for a model with
`qkv_bias=False`, since GPT-2 always has them, which leaves its outputs unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from jaxgpt.config import GPTConfig
from jaxgpt.weights.llama import FAMILY_TYPES, load_family, save_family
from jaxgpt.weights.hf_files import (
    WEIGHTS,
    open_file,
    read_entry,
    read_json,
    read_tensor,
    replace_atomically,
    resolve,
    tensor_index,
    weight_files,
)
from jaxgpt.models.model import abstract_params
from jaxgpt.trees import check_like, flatten, unflatten

# Causal-mask buffers that old GPT-2 checkpoints store beside the weights.
# Block tensors whose layout jaxgpt shares with GPT-2: HF suffix -> jaxgpt path inside h_<i>.
_SAME_LAYOUT = {
    "ln_1.weight": ("ln_1", "scale"), "ln_1.bias": ("ln_1", "bias"),
    "ln_2.weight": ("ln_2", "scale"), "ln_2.bias": ("ln_2", "bias"),
    "attn.c_proj.bias": ("attn", "c_proj", "bias"),
    "mlp.c_fc.weight": ("mlp", "c_fc", "kernel"), "mlp.c_fc.bias": ("mlp", "c_fc", "bias"),
    "mlp.c_proj.weight": ("mlp", "c_proj", "kernel"), "mlp.c_proj.bias": ("mlp", "c_proj", "bias"),
}
_QKV = {"q": "query", "k": "key", "v": "value"}
_TOP = {"wte.weight": ("wte", "embedding"), "wpe.weight": ("wpe", "embedding"),
        "ln_f.weight": ("ln_f", "scale"), "ln_f.bias": ("ln_f", "bias")}
# Fields fixed by the tensors; overriding them could only make the load fail or lie.
_FIXED = ("vocab_size", "emb_dim", "n_heads", "n_layers", "qkv_bias", "ln_eps")


def hf_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name (without `transformer.`) and shape of the GPT-2 checkpoint for `config`."""
    V, C, D = config.vocab_size, config.context_length, config.emb_dim
    shapes = {"wte.weight": (V, D), "wpe.weight": (C, D), "ln_f.weight": (D,), "ln_f.bias": (D,)}
    for i in range(config.n_layers):
        block = {"ln_1.weight": (D,), "ln_1.bias": (D,), "ln_2.weight": (D,), "ln_2.bias": (D,),
                 "attn.c_attn.weight": (D, 3 * D), "attn.c_attn.bias": (3 * D,),
                 "attn.c_proj.weight": (D, D), "attn.c_proj.bias": (D,),
                 "mlp.c_fc.weight": (D, 4 * D), "mlp.c_fc.bias": (4 * D,),
                 "mlp.c_proj.weight": (4 * D, D), "mlp.c_proj.bias": (D,)}
        shapes.update({f"h.{i}.{k}": s for k, s in block.items()})
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


def _to_jaxgpt(name: str, x: np.ndarray, config: GPTConfig) -> dict[tuple, np.ndarray]:
    """One HF tensor -> {jaxgpt path: array} (a fused c_attn gives three)."""
    H, K, D = config.n_heads, config.head_dim, config.emb_dim
    if name in _TOP:
        return {_TOP[name]: x}
    if name == "lm_head.weight":
        return {("lm_head",): x.T}  # [D, V]
    _, i, suffix = name.split(".", 2)
    block = f"h_{i}"
    if suffix == "attn.c_attn.weight":
        parts = np.split(x, 3, axis=1)  # 3 x [D, D], heads contiguous in the output axis
        return {(block, "attn", _QKV[n], "kernel"): p.reshape(D, H, K) for n, p in zip("qkv", parts)}
    if suffix == "attn.c_attn.bias":
        parts = np.split(x, 3)
        return {(block, "attn", _QKV[n], "bias"): p.reshape(H, K) for n, p in zip("qkv", parts)}
    if suffix == "attn.c_proj.weight":
        return {(block, "attn", "c_proj", "kernel"): x.reshape(H, K, D)}
    return {(block, *_SAME_LAYOUT[suffix]): x}


_SIZES = ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer")


def config_from_hf(hf: dict, source: str | os.PathLike = "config.json", **overrides) -> GPTConfig:
    """A GPTConfig from a GPT-2 config.json dict (checked for features jaxgpt lacks).

    Errors in the dict name `source`, the file it was read from."""
    if not isinstance(hf, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
        kind = kind.get(type(hf), "a number")
        raise ValueError(f"{source} holds {kind}, not a JSON object of settings")
    lacking = [k for k in _SIZES if k not in hf]
    if lacking:
        raise ValueError(f"{source} lacks {', '.join(lacking)}")
    for key in _SIZES:
        if not isinstance(hf[key], int) or isinstance(hf[key], bool) or hf[key] <= 0:
            raise ValueError(f"{source} has {key}={hf[key]!r}; expected a positive integer")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"{source} has layer_norm_epsilon={eps!r}; expected a small positive number")
    if not isinstance(hf.get("tie_word_embeddings", True), bool):
        raise ValueError(f"{source} has tie_word_embeddings={hf['tie_word_embeddings']!r}; "
                         "expected true or false")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{source} has model_type={hf['model_type']!r}; only 'gpt2' is supported")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{source} activation_function={act!r}; jaxgpt uses the tanh GELU (gelu_new)")
    n_embd = hf["n_embd"]
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise ValueError(f"{source} n_inner={hf['n_inner']!r}; jaxgpt's MLP width is 4 * n_embd")
    for flag, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                     ("add_cross_attention", False)):
        if hf.get(flag, ok) != ok:
            raise ValueError(f"{source} {flag}={hf[flag]!r} is not supported")
    base = dict(vocab_size=hf["vocab_size"], context_length=hf["n_positions"], emb_dim=n_embd,
                n_heads=hf["n_head"], n_layers=hf["n_layer"], qkv_bias=True, drop_rate=0.0,
                ln_eps=eps, tie_embeddings=hf.get("tie_word_embeddings", True))
    try:  # what the file alone describes must be a valid model (e.g. n_embd divisible by n_head)
        GPTConfig.from_dict(base)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    for name, value in overrides.items():
        if name in _FIXED and value != base[name]:
            raise ValueError(f"cannot override {name}={value!r}: the checkpoint fixes it to {base[name]!r}")
    if overrides.get("context_length", base["context_length"]) > base["context_length"]:
        raise ValueError(f"context_length={overrides['context_length']} exceeds the checkpoint's "
                         f"{base['context_length']} positions")
    return GPTConfig.from_dict({**base, **overrides})


def load_pretrained(name_or_path: str | os.PathLike, **config_overrides) -> tuple[GPTConfig, dict]:
    """(config, float32 params) from a GPT-2 name (gpt2, gpt2-medium/-large/-xl) or a local dir
    (GPT-2, or Llama 3 / Qwen3 by its config.json's model_type)."""
    directory = resolve(name_or_path)
    source = directory / "config.json"
    if not source.is_file():
        raise FileNotFoundError(f"{directory} has no config.json")
    hf = read_json(source)
    if isinstance(hf, dict) and hf.get("model_type") in FAMILY_TYPES:  # Llama 3 / Qwen3
        return load_family(directory, **config_overrides)
    config_from_hf(hf, source)  # the file's own problems first, named as the file's
    headers = tensor_index(weight_files(directory))
    if (hf.get("tie_word_embeddings", True) and {"lm_head.weight", "wte.weight"} <= set(headers)
            and not np.array_equal(read_entry(headers["lm_head.weight"]), read_entry(headers["wte.weight"]))):
        hf = {**hf, "tie_word_embeddings": False}  # a head that differs was trained untied: keep it
    file_config = config_from_hf(hf, source)  # what the tensors hold; `config` is what the caller asked
    config = config_from_hf(hf, source, **config_overrides)
    if not file_config.tie_embeddings and config.tie_embeddings:
        raise ValueError("cannot override tie_embeddings=True: the checkpoint has its own lm_head.weight")

    expected = hf_shapes(file_config)
    extra = sorted(set(headers) - set(expected) - {"lm_head.weight"})
    missing = sorted(set(expected) - set(headers))
    if missing or extra:
        raise ValueError(f"checkpoint does not match GPT-2 with {config.n_layers} layers: "
                         f"missing {missing or 'none'}; unexpected {extra or 'none'}")
    for name, shape in expected.items():
        if headers[name][2] != shape:
            raise ValueError(f"tensor {name} has shape {headers[name][2]}, expected {shape}")
    if "lm_head.weight" in headers and headers["lm_head.weight"][2] != (config.vocab_size, config.emb_dim):
        raise ValueError(f"tensor lm_head.weight has shape {headers['lm_head.weight'][2]}, "
                         f"expected {(config.vocab_size, config.emb_dim)}")

    flat: dict[tuple, np.ndarray] = {}
    for file in dict.fromkeys(entry[0] for entry in headers.values()):
        with open_file(file) as f:  # one shard open at a time
            for name, (_, key, _) in headers.items():
                if headers[name][0] != file or name not in expected:
                    continue
                x = read_tensor(f, file, key)
                if not np.isfinite(x).all():
                    raise ValueError(f"{file}: tensor {name} holds NaN or infinite values")
                if name == "wpe.weight":
                    x = x[: config.context_length]  # a shorter context keeps the first positions
                for path, y in _to_jaxgpt(name, x.astype(np.float32, copy=False), config).items():
                    flat[path] = y
                del x
    if not config.tie_embeddings and file_config.tie_embeddings:
        flat[("lm_head",)] = flat[("wte", "embedding")].T.copy()  # untie by copying, as the book does
    _pad_vocab(flat, config)
    if config.scan_layers:
        flat = _stack_blocks(flat, config.n_layers)
    return config, unflatten(flat, leaf=jnp.asarray, consume=True)  # leaf by leaf


def _pad_vocab(flat: dict, config: GPTConfig) -> None:
    """Zero rows of wte [V, D] and columns of lm_head [D, V] up to config.padded_vocab_size."""
    extra = config.padded_vocab_size - config.vocab_size
    if extra:
        flat[("wte", "embedding")] = np.pad(flat[("wte", "embedding")], ((0, extra), (0, 0)))
        if ("lm_head",) in flat:
            flat[("lm_head",)] = np.pad(flat[("lm_head",)], ((0, 0), (0, extra)))


def _stack_blocks(flat: dict, n_layers: int) -> dict:
    """h_<i>/... leaves -> h/... leaves with a leading [L] axis, one leaf at a time."""
    out = {p: x for p, x in flat.items() if not p[0].startswith("h_")}
    for path in [p for p in flat if p[0] == "h_0"]:
        rest = path[1:]
        out[("h", *rest)] = np.stack([flat.pop((f"h_{i}", *rest)) for i in range(n_layers)])
    return out




def to_hf_tensors(config: GPTConfig, params) -> dict[str, np.ndarray]:
    """jaxgpt params (plain or scanned) -> GPT2LMHeadModel's named float32 tensors, shapes checked."""
    expected = flatten(abstract_params(config, boxed=False), sep=None)
    flat = {p: np.asarray(x, np.float32) for p, x in flatten(params, sep=None).items()}
    check_like(flat, expected)
    if config.scan_layers:  # unstack h/... [L, ...] into h_<i>/...
        for path in [p for p in flat if p[0] == "h"]:
            stacked = flat.pop(path)
            flat.update({(f"h_{i}", *path[1:]): stacked[i] for i in range(config.n_layers)})
    H, K, D = config.n_heads, config.head_dim, config.emb_dim
    out = {hf: flat[jx] for hf, jx in _TOP.items()}
    for i in range(config.n_layers):
        b = f"h_{i}"
        out.update({f"h.{i}.{hf}": flat[(b, *jx)] for hf, jx in _SAME_LAYOUT.items()})
        out[f"h.{i}.attn.c_attn.weight"] = np.concatenate(
            [flat[(b, "attn", _QKV[n], "kernel")].reshape(D, D) for n in "qkv"], axis=1)  # [D, 3D]
        zeros = np.zeros((H, K), np.float32)  # GPT-2 always has q/k/v biases
        out[f"h.{i}.attn.c_attn.bias"] = np.concatenate(
            [flat.get((b, "attn", _QKV[n], "bias"), zeros).reshape(D) for n in "qkv"])  # [3D]
        out[f"h.{i}.attn.c_proj.weight"] = flat[(b, "attn", "c_proj", "kernel")].reshape(D, D)
    V = config.vocab_size  # a padded vocabulary's extra rows are not exported
    out["wte.weight"] = out["wte.weight"][:V]
    out = {f"transformer.{k}": v for k, v in out.items()}
    if not config.tie_embeddings:
        out["lm_head.weight"] = flat[("lm_head",)][:, :V].T  # [V, D]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def hf_config(config: GPTConfig) -> dict:
    """The GPT-2 config.json dict for `config`."""
    eot = 50256 if config.vocab_size == 50257 else None  # GPT-2's <|endoftext|>, if its vocab
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size, "n_positions": config.context_length,
        "n_ctx": config.context_length, "n_embd": config.emb_dim, "n_layer": config.n_layers,
        "n_head": config.n_heads, "n_inner": None, "activation_function": "gelu_new",
        "layer_norm_epsilon": config.ln_eps, "tie_word_embeddings": config.tie_embeddings,
        "resid_pdrop": config.drop_rate, "embd_pdrop": config.drop_rate,
        "attn_pdrop": config.attention_drop_rate, "bos_token_id": eot, "eos_token_id": eot,
        "scale_attn_weights": True, "use_cache": True, "dtype": "float32",
    }


def save_pretrained(config: GPTConfig, params, directory: str | os.PathLike) -> Path:
    """Write config.json and model.safetensors that transformers' GPT2LMHeadModel loads (for
    the llama/qwen3 families: jaxgpt.weights.llama.save_family's sharded files)."""
    if config.family != "gpt2":
        return save_family(config, params, directory)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_tensors(config, params)
    replace_atomically(directory / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(hf_config(config), indent=2) + "\n"
    replace_atomically(directory / "config.json", lambda tmp: Path(tmp).write_text(text))
    return directory
