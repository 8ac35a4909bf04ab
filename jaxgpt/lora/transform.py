"""LoRA (the book's appendix E) as a transformation of the parameter tree; the model is unchanged.

A targeted matrix W, laid out [lead..., in..., out...] (lead is the scanned [L] axis, if any),
gets adapters A [lead..., in..., r] (uniform in +-1/sqrt(fan_in), as PEFT's kaiming_uniform on
its [r, in] layout) and B [lead..., r, out...] (zeros), so training starts from the base model.
The effective weight is W + scale * A @ B with scale = alpha / r (alpha / sqrt(r) when
`rank_stabilized`). Attention kernels have two layouts: query/key/value [D, H, K] read one input
axis, the attention `c_proj` [H, K, D] reads two.

Training keeps two trees: the trainable one, {"lora": adapters, "full": leaves trained in full},
which is the train state's params (so the optimizer only ever sees it), and the frozen base,
which `train_step` takes as `frozen` (sharded, never donated, no optimizer state). Adapters carry
the logical axes of the weight they adapt, so they shard with it.

Why the loss does not simply merge: with W_eff = W + s A @ B inside the loss, autodiff must form
dL/dW_eff = x^T dy, a full [in, out] matmul per projection, before projecting it onto A and B;
that is the same weight-gradient work as full finetuning. `lora_loss_fn` therefore runs the base
loss with a flax method interceptor that adds s * (drop(x) @ A) @ B to the output of every
adapted `nn.Dense`/`nn.DenseGeneral`, so only rank-r matmuls touch the adapters and the frozen
kernels get no weight gradient at all. The adapters ride in the parameter tree beside the kernel
they adapt (keys `lora_a`/`lora_b`, which flax ignores), so `nn.scan` slices them per layer with
it. Leaves not used through a Dense (the untied `lm_head`, embeddings, a hand-written head's
kernel, found on a first trace) are merged instead. A loss that reads an adapted kernel directly
*and* through a Dense sees the base weight in the direct read: give it factored=False.
Adapter input dropout exists only in this factored form: a merged weight never sees the inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt.kernels.dropout import dropout
from jaxgpt.models.layers import Dense
from jaxgpt.sharding import is_boxed, with_axes
from jaxgpt.trees import flatten as _flat
from jaxgpt.trees import unflatten as _nest

# The projections of every block: attention query/key/value/c_proj and MLP c_fc/c_proj
# (GPT-2); self_attn q/k/v/o_proj and MLP gate/up/down_proj (Llama 3, Qwen3).
DEFAULT_TARGETS = (r"attn/(query|key|value|c_proj|q_proj|k_proj|v_proj|o_proj)/kernel$",
                   r"mlp/(c_fc|c_proj|gate_proj|up_proj|down_proj)/kernel$")
# A top-level head: the untied `lm_head`, or a task head such as `out_head/kernel`.
HEAD_PATTERN = r"^[^/]*head(/kernel)?$"
# Leaves LoRA may adapt: matrices used in a matmul or a lookup (biases and norms are vectors).
_MATRICES = ("kernel", "embedding", "lm_head")


def _patterns(field: str, value) -> tuple[str, ...]:
    patterns = (value,) if isinstance(value, str) else tuple(value)
    for p in patterns:
        if not isinstance(p, str):
            raise ValueError(f"LoRAConfig.{field} must hold regular expressions, got {p!r}")
        try:
            re.compile(p)
        except re.error as err:
            raise ValueError(f"LoRAConfig.{field} pattern {p!r} is not a valid regex: {err}") from None
    return patterns


@dataclass(frozen=True)
class LoRAConfig:
    """Which leaves get rank-`rank` adapters (regexes over '/'-joined paths) and how they scale."""

    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    include_head: bool = False  # also adapt the head (HEAD_PATTERN)
    trainable: tuple[str, ...] = ()  # leaves trained in full, e.g. a new classification head
    dropout: float = 0.0  # on the adapter input; needs lora_loss_fn(..., factored=True)
    rank_stabilized: bool = False  # rsLoRA: scale alpha / sqrt(rank) instead of alpha / rank

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"LoRAConfig.rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRAConfig.alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "targets", _patterns("targets", self.targets))
        object.__setattr__(self, "trainable", _patterns("trainable", self.trainable))
        if not self.targets and not self.include_head:
            raise ValueError("LoRAConfig.targets is empty; name at least one leaf to adapt")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rank_stabilized else self.rank)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "targets": list(self.targets),
                "trainable": list(self.trainable)}

    @classmethod
    def from_dict(cls, values: dict) -> "LoRAConfig":
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown LoRAConfig field(s): {', '.join(unknown)}")
        return cls(**values)


def adapter_pairs(adapters) -> dict[str, tuple[Any, Any]]:
    """{adapted leaf path: (A, B)} from an adapters tree."""
    flat = _flat(adapters)
    return {p[:-2]: (flat[p], flat[p[:-2] + "/b"]) for p in flat if p.endswith("/a")}


def _layout(path: str, shape: tuple[int, ...]) -> tuple[tuple, tuple, tuple]:
    """(lead, in, out) dims of a targeted matrix."""
    # Scanned blocks (`h`, or `layers` in the llama/qwen3 families) carry a leading [L] axis.
    lead = 1 if {"h", "layers"} & set(path.split("/")[:-1]) else 0
    # The attention output [H, K, D] reads two input axes.
    n_in = 2 if path.endswith(("attn/c_proj/kernel", "self_attn/o_proj/kernel")) else 1
    if len(shape) - lead - n_in < 1:
        raise ValueError(f"LoRA target {path} has shape {tuple(shape)}, which is not a matrix")
    return shape[:lead], shape[lead:lead + n_in], shape[lead + n_in:]


def roles(params, config: LoRAConfig) -> dict[str, str]:
    """{path: "lora" | "full"} for the leaves LoRA adapts or trains in full; the rest are frozen."""
    paths = list(_flat(params))
    targets = config.targets + ((HEAD_PATTERN,) if config.include_head else ())
    out: dict[str, str] = {}
    for pattern in targets:
        hits = [p for p in paths if re.search(pattern, p) and p.split("/")[-1] in _MATRICES]
        if not hits:
            hint = " (a tied model's head is wte/embedding)" if pattern == HEAD_PATTERN else ""
            raise ValueError(f"LoRA target {pattern!r} matches no kernel, embedding or head{hint}")
        out.update(dict.fromkeys(hits, "lora"))
    for pattern in config.trainable:
        hits = [p for p in paths if re.search(pattern, p)]
        if not hits:
            raise ValueError(f"LoRA trainable pattern {pattern!r} matches no parameter")
        both = [p for p in hits if out.get(p) == "lora"]
        if both:
            raise ValueError(f"parameter {both[0]} is both a LoRA target and trained in full")
        out.update(dict.fromkeys(hits, "full"))
    return out


def trainable_mask(params, config: LoRAConfig):
    """A tree like `params`: True where a leaf is adapted or trained in full, False if frozen."""
    r = roles(params, config)
    return _nest({p: p in r for p in _flat(params)})


# ---- init, merge, partition -------------------------------------------------------------------


def init(params, config: LoRAConfig, key: jax.Array) -> dict:
    """Adapters for every targeted leaf: {path...: {"a": A, "b": B}} (shapes only are read)."""
    flat, out = _flat(params), {}
    for path, role in roles(params, config).items():
        if role != "lora":
            continue
        lead, ins, outs = _layout(path, flat[path].shape)
        bound = 1.0 / math.sqrt(math.prod(ins))
        k = jax.random.fold_in(key, zlib.crc32(path.encode()))  # per path: stable under edits
        out[f"{path}/a"] = jax.random.uniform(k, lead + ins + (config.rank,), jnp.float32, -bound, bound)
        out[f"{path}/b"] = jnp.zeros(lead + (config.rank,) + outs, jnp.float32)
    return _nest(out)


def delta(w, a, b, scale: float) -> jax.Array:
    """scale * A @ B in W's layout (batched over a leading [L] axis)."""
    lead = a.ndim + b.ndim - w.ndim - 2
    ins, r = a.shape[lead:-1], a.shape[-1]
    a2 = a.reshape(a.shape[:lead] + (math.prod(ins), r))  # [lead, In, r]
    b2 = b.reshape(b.shape[:lead] + (r, -1))  # [lead, r, Out]
    d = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)  # [lead, In, Out]
    return (scale * d).reshape(w.shape).astype(w.dtype)


def _apply_delta(params, adapters, config: LoRAConfig, sign: float):
    flat = _flat(params)
    for path, (a, b) in adapter_pairs(adapters).items():
        if path not in flat:
            raise ValueError(f"LoRA adapter {path} has no parameter to adapt")
        flat[path] = flat[path] + delta(flat[path], a, b, sign * config.scale)
    return _nest(flat)


def merge(params, adapters, config: LoRAConfig):
    """Effective parameters: W + scale * A @ B for adapted leaves, the others untouched."""
    return _apply_delta(params, adapters, config, 1.0)


def unmerge(merged, adapters, config: LoRAConfig):
    """The base parameters back from merged ones (equal up to float rounding)."""
    return _apply_delta(merged, adapters, config, -1.0)


def partition(params, config: LoRAConfig, key: jax.Array) -> tuple[dict, dict]:
    """(trainable, frozen): {"lora": fresh adapters, "full": leaves trained in full}, the rest.

    Boxed params (leaves with logical axes) give boxed trees; adapters take their weight's axes."""
    if any(is_boxed(x) for x in jax.tree.leaves(params, is_leaf=is_boxed)):
        trainable, frozen = partition(nn.meta.unbox(params), config, key)
        trainable_axes, frozen_axes = boxed_trees(params, config)
        return with_axes(trainable, trainable_axes), with_axes(frozen, frozen_axes)
    r = roles(params, config)
    flat = _flat(params)
    full = {p: x for p, x in flat.items() if r.get(p) == "full"}
    frozen = {p: x for p, x in flat.items() if r.get(p) != "full"}
    return {"lora": init(params, config, key), "full": _nest(full)}, _nest(frozen)


def combine(trainable, frozen, config: LoRAConfig):
    """The effective model parameters of a (trainable, frozen) pair, adapters merged."""
    params = _nest({**_flat(frozen), **_flat(trainable["full"])})
    return merge(params, trainable["lora"], config)


def count_trainable(params, config: LoRAConfig) -> int:
    """Scalars trained: rank * (in + out) per adapted matrix (per layer), plus full leaves."""
    shapes = jax.eval_shape(lambda p: partition(p, config, jax.random.key(0))[0], params)
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)))


def boxed_trees(boxed_params, config: LoRAConfig) -> tuple[dict, dict]:
    """(trainable, frozen) abstract trees with logical axis boxes, from the model's boxed params.

    A takes the kernel's lead and input axis names and None for the rank; B takes None for the
    rank and the output names, so adapters shard along the axes of the weight they adapt.
    """
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    flat = _flat(boxed_params, is_leaf=is_box)
    r = roles(_nest({p: nn.meta.unbox(x) for p, x in flat.items()}), config)
    lora = {}
    for path in (p for p, role in r.items() if role == "lora"):
        w = nn.meta.unbox(flat[path])
        names = tuple(flat[path].names) if is_box(flat[path]) else (None,) * len(w.shape)
        lead, ins, outs = _layout(path, w.shape)
        n, m = len(lead), len(lead) + len(ins)
        box = lambda shape, names: nn.LogicallyPartitioned(  # noqa: E731
            jax.ShapeDtypeStruct(shape, jnp.float32), names)
        lora[f"{path}/a"] = box(lead + ins + (config.rank,), names[:m] + (None,))
        lora[f"{path}/b"] = box(lead + (config.rank,) + outs, names[:n] + (None,) + names[m:])
    full = {p: x for p, x in flat.items() if r.get(p) == "full"}
    frozen = {p: x for p, x in flat.items() if r.get(p) != "full"}
    return {"lora": _nest(lora), "full": _nest(full)}, _nest(frozen)


# ---- the loss ---------------------------------------------------------------------------------


def _adapter_out(module, x, a, b, config: LoRAConfig, deterministic: bool):
    """scale * (drop(x) @ A) @ B for one Dense call, contracting x's trailing input axes."""
    n_in = a.ndim - 1
    if isinstance(module, Dense):
        axis = tuple(range(x.ndim - module.n_in, x.ndim))
    else:  # flax's Dense / DenseGeneral, in a model of the user's
        axis = getattr(module, "axis", -1)
        axis = tuple(ax % x.ndim for ax in (axis if isinstance(axis, tuple) else (axis,)))
    if axis != tuple(range(x.ndim - n_in, x.ndim)) or getattr(module, "batch_dims", ()):
        raise ValueError(f"LoRA adapter of {'/'.join(module.path)} expects {n_in} trailing input "
                         f"axes, but the layer contracts axes {axis}")
    dtype = module.dtype or x.dtype
    x = x.astype(dtype)
    if config.dropout > 0 and not deterministic:
        x = dropout(x, config.dropout, module.make_rng("dropout"))
    precision = getattr(module, "precision", None)
    h = jnp.tensordot(x, a.astype(dtype), n_in, precision=precision)  # [..., r]
    return config.scale * jnp.tensordot(h, b.astype(dtype), 1, precision=precision)


def _factored_params(trainable, frozen, config: LoRAConfig, merged=()) -> tuple[dict, list[str]]:
    """Base + full leaves, kernel adapters beside their kernels, the rest (and `merged`) merged."""
    flat = {**_flat(frozen), **_flat(trainable["full"])}
    beside = []
    for path, (a, b) in adapter_pairs(trainable["lora"]).items():
        if path not in flat:
            raise ValueError(f"LoRA adapter {path} has no parameter to adapt")
        if path.endswith("/kernel") and path not in merged:
            parent = path[: -len("/kernel")]
            flat[f"{parent}/lora_a"], flat[f"{parent}/lora_b"] = a, b
            beside.append(parent)
        else:
            flat[path] = flat[path] + delta(flat[path], a, b, config.scale)
    return _nest(flat), beside


def _intercept(config: LoRAConfig, deterministic: bool, applied: set, next_fun, args, kwargs, context):
    """Add the low-rank path to a Dense/DenseGeneral call whose params hold an adapter."""
    y = next_fun(*args, **kwargs)
    m = context.module
    if (context.method_name != "__call__" or not isinstance(m, (Dense, nn.Dense, nn.DenseGeneral))
            or not m.has_variable("params", "lora_a")):
        return y
    applied.add("/".join(m.path))
    x = args[0] if args else kwargs["inputs"]
    a, b = m.get_variable("params", "lora_a"), m.get_variable("params", "lora_b")
    return y + _adapter_out(m, x, a, b, config, deterministic).astype(y.dtype)


def lora_loss_fn(base_loss_fn: Callable, config: LoRAConfig, *, factored: bool = True) -> Callable:
    """Wrap `base_loss_fn(params, frozen, batch, rng, det)` to train (trainable, frozen=base).

    factored=True adds the adapters' low-rank path to each adapted Dense (no frozen weight
    gradients; supports dropout); factored=False merges W + scale A @ B and calls the base loss.
    The base loss receives the effective parameters and frozen=None.
    """
    if config.dropout > 0 and not factored:
        raise ValueError("LoRAConfig.dropout needs factored=True: a merged weight never sees the "
                         "adapter inputs it would drop")

    def merged_loss(trainable, frozen, batch, rng, deterministic):
        return base_loss_fn(combine(trainable, frozen, config), None, batch, rng, deterministic)

    def factored_loss(trainable, frozen, batch, rng, deterministic):
        merged: tuple[str, ...] = ()
        for _ in range(2):
            params, beside = _factored_params(trainable, frozen, config, merged)
            applied: set[str] = set()
            with nn.intercept_methods(functools.partial(_intercept, config, deterministic, applied)):
                out = base_loss_fn(params, None, batch, rng, deterministic)
            # A module applied under a parent (e.g. a backbone) sees a suffix of the tree path.
            missing = sorted(p for p in beside if not any(p == q or p.endswith("/" + q) for q in applied))
            if not missing:
                return out
            if config.dropout > 0:
                raise ValueError(f"LoRA dropout needs every adapted kernel used through nn.Dense or "
                                 f"DenseGeneral, and {missing[0]}/kernel is not; set dropout=0")
            # Kernels the loss reads without a Dense (a hand-written head) are merged instead; the
            # first trace is discarded (nothing of it reaches the output, so XLA drops it).
            merged = tuple(f"{p}/kernel" for p in missing)
        raise ValueError(f"LoRA adapter of {missing[0]}/kernel was applied in one trace but not another")

    return factored_loss if factored else merged_loss
