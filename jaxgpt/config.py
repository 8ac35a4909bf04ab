"""Model configuration: a frozen dataclass with the book's fields and GPT-2 presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from jaxgpt.checks import (
    FRACTION,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    PROBABILITY,
    check_fields,
    one_of,
    optional,
)
from jaxgpt.kernels import KERNEL_SETS, resolve_compute_dtype

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
FAMILIES = ("gpt2", "llama", "qwen3")

# The released GPT-2 shapes (124M, 355M, 774M, 1558M parameters with the tied head).
PRESETS: dict[str, dict] = {
    "gpt2-small": dict(emb_dim=768, n_layers=12, n_heads=12),
    "gpt2-medium": dict(emb_dim=1024, n_layers=24, n_heads=16),
    "gpt2-large": dict(emb_dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl": dict(emb_dim=1600, n_layers=48, n_heads=25),
}
# Hugging Face hub names of the same models.
PRESET_ALIASES = {"gpt2": "gpt2-small"}
# Fields that change how a model runs, not its weights: a finetuning run or a loader may set
# them whatever the weights were trained with.
RUNTIME_FIELDS = ("drop_rate", "attn_drop_rate", "dtype", "kernels", "remat_policy", "loss_chunk")


@dataclass(frozen=True)
class GPTConfig:
    """Shape and behaviour of a GPT model (the book's GPT_CONFIG_124M, plus a few switches)."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    # Dropout on the attention weights; None: drop_rate (the book's single rate). Fused
    # attention kernels have none: a rate > 0 in training takes the reference attention.
    attn_drop_rate: float | None = None
    qkv_bias: bool = False
    # GPT-2's released weights share the token embedding with the output head; the book's
    # GPTModel trains a separate head.
    tie_embeddings: bool = False
    # Compute dtype of matmuls; parameters stay float32 and softmax/logits/loss stay float32.
    # "auto" is bfloat16 on GPU/TPU and float32 on CPU, resolved when the model is traced.
    dtype: str = "auto"
    # Which implementations run the model's operations (jaxgpt/kernels/__init__.py): "auto", the
    # measured fast path for the backend, or "reference", the plain definitions.
    kernels: str = "auto"
    # Rematerialise each block's activations in the backward pass ("none" keeps them all).
    remat_policy: str = "none"
    # Scan over one compiled block instead of unrolling n_layers copies (faster compile).
    scan_layers: bool = False
    ln_eps: float = 1e-5
    # Initial weights: "gpt2" (N(0, 0.02), scaled residual projections) or "torch" (PyTorch's
    # defaults, which the book's GPTModel has: N(0, 1) embeddings, U(+-1/sqrt(fan_in)) linears).
    init: str = "gpt2"
    # Pad the vocabulary (wte rows, lm_head columns) to a multiple of this (128: 50257 -> 50304,
    # nanoGPT's matmul-friendly size); padded logits are masked (model.PADDED_LOGIT), so loss and
    # argmax are unchanged; generation draws from the real columns; import pads, export strips.
    vocab_multiple: int = 1
    # Training loss from the hidden states in chunks of this many tokens (the LM head and the
    # cross-entropy fused; no [B, T, V] float32 logits held); 0: the head, then the loss.
    loss_chunk: int = 0
    # Architecture family (the pieces are in jaxgpt/models/llama.py, the weight names in
    # jaxgpt/weights/llama.py): "gpt2" (LayerNorm, learned positions, GELU MLP, biases), "llama"
    # (RMSNorm, rotary positions, SwiGLU MLP, no biases), "qwen3" (llama plus RMSNorm on each
    # query and key head). The fields below are the llama/qwen3 shapes; GPT-2 leaves them unset.
    family: str = "gpt2"
    n_kv_heads: int | None = None  # grouped-query attention: key/value heads (None: n_heads)
    head_width: int | None = None  # K when it is not emb_dim / n_heads (Qwen3 sets it)
    mlp_dim: int | None = None  # F (None: 4 * emb_dim)
    rope_theta: float = 10000.0
    # Llama 3's rotary frequency scaling (None: plain rotary); the others only apply with it.
    rope_factor: float | None = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192

    def __post_init__(self):
        check_fields(self, _RULES)
        if self.family == "gpt2":
            set_ = [f for f in _FAMILY_ONLY if getattr(self, f) is not None]
            if set_:
                raise ValueError(f"GPTConfig.{set_[0]} is for the llama/qwen3 families; "
                                 "family='gpt2' derives it from emb_dim and n_heads")
        if self.family != "gpt2" and self.vocab_multiple != 1:
            raise ValueError(f"GPTConfig.vocab_multiple={self.vocab_multiple} is for GPT-2 (50257 -> "
                             f"50304); {self.family}'s released vocabularies are multiples of 128 already")
        if self.head_width is None and self.emb_dim % self.n_heads:
            raise ValueError(
                f"GPTConfig.emb_dim={self.emb_dim} is not divisible by n_heads={self.n_heads}"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(f"GPTConfig.n_heads={self.n_heads} is not divisible by "
                             f"n_kv_heads={self.kv_heads}")
        if self.family != "gpt2" and self.head_dim % 2:
            raise ValueError(f"GPTConfig head width {self.head_dim} is odd; rotary positions "
                             "rotate pairs of features, so it must be even")
        if self.rope_factor is not None and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ValueError("GPTConfig.rope_high_freq_factor must exceed rope_low_freq_factor, got "
                             f"{self.rope_high_freq_factor} <= {self.rope_low_freq_factor}")

    @property
    def head_dim(self) -> int:
        return self.head_width if self.head_width is not None else self.emb_dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Heads of keys and values (the KV cache's H axis)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def mlp_width(self) -> int:
        return 4 * self.emb_dim if self.mlp_dim is None else self.mlp_dim

    @property
    def compute_dtype(self):
        return resolve_compute_dtype(self.dtype)

    @property
    def attention_drop_rate(self) -> float:
        return self.drop_rate if self.attn_drop_rate is None else self.attn_drop_rate

    @property
    def padded_vocab_size(self) -> int:
        """vocab_size rounded up to a multiple of vocab_multiple: the rows wte and lm_head hold."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def runtime(self) -> dict:
        """The RUNTIME_FIELDS of this config, to lay over a loaded model's config."""
        return {k: getattr(self, k) for k in RUNTIME_FIELDS}

    @classmethod
    def from_dict(cls, values: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        """A GPT-2 shape by name (gpt2-small/-medium/-large/-xl), with field overrides."""
        key = PRESET_ALIASES.get(name, name)
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[key], **overrides})


_RULES = {
    **dict.fromkeys(("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"), POSITIVE_INT),
    "drop_rate": PROBABILITY,
    "attn_drop_rate": optional(PROBABILITY),
    "vocab_multiple": POSITIVE_INT,
    "loss_chunk": NON_NEGATIVE_INT,
    "ln_eps": FRACTION,  # added to a variance: 0 divides by zero, 1 or more flattens every norm
    "dtype": one_of(*_DTYPES),
    "kernels": one_of(*KERNEL_SETS),
    "remat_policy": one_of(*_REMAT_POLICIES),
    "init": one_of("gpt2", "torch"),
    "family": one_of(*FAMILIES),
    **dict.fromkeys(("n_kv_heads", "head_width", "mlp_dim"), optional(POSITIVE_INT)),
    "rope_theta": POSITIVE,
    "rope_factor": optional(POSITIVE),
    "rope_low_freq_factor": POSITIVE,
    "rope_high_freq_factor": POSITIVE,
    "rope_original_context": POSITIVE_INT,
}
_FAMILY_ONLY = ("n_kv_heads", "head_width", "mlp_dim", "rope_factor")
