"""GPT-2 in Hugging Face's layout: config.json <-> GPTConfig and the name table between
GPT2LMHeadModel's tensors and jaxgpt's parameters (jaxgpt.weights.huggingface reads and writes
the files, for every family).

The mapping is a rename table plus three layout changes: GPT-2's fused `c_attn` ([D, 3D] in
its Conv1D [in, out] layout, and a [3D] bias) splits into `query`/`key`/`value` kernels [D, H, K]
and biases [H, K]; the attention output `c_proj` [D, D] becomes [H, K, D]; an untied head
`lm_head.weight` [V, D] becomes `lm_head` [D, V]. Everything else keeps its layout.

Choices: the imported config has `qkv_bias=True` (GPT-2 has biases), `drop_rate=0.0` (the book's
setting for pretrained weights; override it to fine-tune with dropout) and ties the head to the
token embedding unless config.json says `tie_word_embeddings: false` or the file carries an
`lm_head.weight` that differs from `wte.weight`. Export writes zero q/k/v biases for a model with
`qkv_bias=False`, since GPT-2 always has them, which leaves its outputs unchanged.
"""

from __future__ import annotations

import os

import numpy as np

from jaxgpt.config import GPTConfig

MODEL_TYPES = ("gpt2",)  # config.json model_type values of this family
BLOCK, HF_BLOCK = "h", "h.{}."  # block i: h_<i> in jaxgpt (h, stacked, with scan_layers); h.<i>. in HF
EMBEDDING, HEAD = "wte.weight", "lm_head.weight"  # HF names (without `transformer.`)


def _same(x, c):
    return x


def _t(x, c):
    return x.T


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


def _qkv_kernel(j: int):  # HF c_attn [D, 3D], heads contiguous in the output axis -> [D, H, K]
    return lambda x, c: x[:, j * c.emb_dim:(j + 1) * c.emb_dim].reshape(c.emb_dim, c.n_heads, c.head_dim)


def _qkv_bias(j: int):  # HF c_attn bias [3D] -> [H, K]
    return lambda x, c: x[j * c.emb_dim:(j + 1) * c.emb_dim].reshape(c.n_heads, c.head_dim)


def top_leaves(config: GPTConfig) -> dict[tuple, tuple[str, object]]:
    """jaxgpt leaf path outside the blocks -> (HF name, HF array -> jaxgpt array)."""
    out = {path: (name, _same) for name, path in _TOP.items()}
    # a shorter context keeps the first positions
    out[("wpe", "embedding")] = ("wpe.weight", lambda x, c: x[:c.context_length])
    if not config.tie_embeddings:
        out[("lm_head",)] = (HEAD, _t)  # [V, D] -> [D, V]
    return out


def block_leaves(config: GPTConfig) -> dict[tuple, tuple[str, object]]:
    """jaxgpt leaf path inside block i -> (HF name suffix after `h.<i>.`, HF -> jaxgpt)."""
    out = {path: (suffix, _same) for suffix, path in _SAME_LAYOUT.items()}
    for j, n in enumerate("qkv"):
        out[("attn", _QKV[n], "kernel")] = ("attn.c_attn.weight", _qkv_kernel(j))
        if config.qkv_bias:
            out[("attn", _QKV[n], "bias")] = ("attn.c_attn.bias", _qkv_bias(j))
    out[("attn", "c_proj", "kernel")] = (  # [D, D] -> [H, K, D]
        "attn.c_proj.weight", lambda x, c: x.reshape(c.n_heads, c.head_dim, c.emb_dim))
    return out


_SIZES = ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer")


def config_from_hf(hf: dict, source: str | os.PathLike = "config.json", **overrides) -> GPTConfig:
    """A GPTConfig from a GPT-2 config.json dict (checked for features jaxgpt lacks).

    Errors in the dict name `source`, the file it was read from."""
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


def tensors_to_hf(config: GPTConfig, flat: dict[tuple, np.ndarray]) -> dict[str, np.ndarray]:
    """jaxgpt's float32 leaves (blocks unstacked, h_<i>/...) -> GPT2LMHeadModel's named tensors."""
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
    return out


def hf_config(config: GPTConfig, **extra) -> dict:
    """The GPT-2 config.json dict for `config`."""
    eot = 50256 if config.vocab_size == 50257 else None  # GPT-2's <|endoftext|>, if its vocab
    out = {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size, "n_positions": config.context_length,
        "n_ctx": config.context_length, "n_embd": config.emb_dim, "n_layer": config.n_layers,
        "n_head": config.n_heads, "n_inner": None, "activation_function": "gelu_new",
        "layer_norm_epsilon": config.ln_eps, "tie_word_embeddings": config.tie_embeddings,
        "resid_pdrop": config.drop_rate, "embd_pdrop": config.drop_rate,
        "attn_pdrop": config.attention_drop_rate, "bos_token_id": eot, "eos_token_id": eot,
        "scale_attn_weights": True, "use_cache": True, "dtype": "float32",
    }
    return {**out, **extra}
