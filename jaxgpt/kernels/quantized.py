"""Int8 weight-only kernels: a symmetric int8 kernel and its float32 scales, dequantized inside
the product.

A quantized kernel is the leaf group {"q": int8, "scale": float32} that stands where a float
kernel W [lead..., in..., out...] stood (lead: a scanned [L] axis, if any). q has W's shape;
scale has W's rank, with the input axes reduced:

  per output channel  scale [lead..., 1..., out...]: max |W| over all input axes / 127
  per group of G      over each run of G rows of the flattened input (G must divide its width
                      C): for one input axis scale [lead..., C / G, out...]; for two, [H, K / G]
                      where G divides K, [H * K / G, 1] where K divides G (whole heads)

so W ~ q * scale broadcast over each group (|W - q * scale| <= scale / 2 elementwise), and the
scale takes W's own logical axis names: it shards with its kernel on any mesh (a size-1 or
indivisible dimension is left unsplit by the rules table). Zero columns get scale 1 (q is 0).

`dense(x, k, bias, n_in, dtype)` is dense.py's product on a quantized kernel: per channel,
(x @ q.astype(dtype)) * scale, exact in form since the scale is constant along the contraction;
per group, the contraction is split into its groups, each partial product scaled, then summed.
q is cast to the compute dtype inside the jitted product (|q| <= 127 is exact in bfloat16), so
only int8 weights are held between calls. No gradient flows to q: these are inference weights.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

QMAX = 127  # symmetric: -127..127, so that -W quantizes to -q
WEIGHTS = ("float32", "bfloat16", "int8")  # the kinds of weights a model can be held in


def check_weights(weights: str, group: int | None = None) -> None:
    """Raise a one-line ValueError for a weights kind or quantization group no model takes."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if group is not None:
        if weights != "int8":
            raise ValueError(f"a quantization group needs weights=int8, got weights={weights}")
        if not isinstance(group, int) or isinstance(group, bool) or group < 1:
            raise ValueError(f"quantization group must be a positive integer, got {group!r}")


def is_quantized(x) -> bool:
    """Whether `x` is a quantized kernel's leaf group {"q", "scale"}."""
    return isinstance(x, dict) and set(x) == {"q", "scale"}


def scale_shape(shape: tuple[int, ...], lead: int, n_in: int, group: int | None) -> tuple[int, ...]:
    """The scale's shape for a kernel of `shape` (`lead` leading axes, then `n_in` input axes)."""
    ins = shape[lead:lead + n_in]
    if group is None:
        return shape[:lead] + (1,) * n_in + shape[lead + n_in:]
    if math.prod(ins) % group:
        raise ValueError(f"quantization group {group} does not divide the input width "
                         f"{math.prod(ins)} of a kernel of shape {tuple(shape)}")
    kept, run = [], group  # a run of `group` flattened input rows, taken from the last axis back
    for dim in reversed(ins):
        if run >= dim and run % dim == 0:
            kept.append(1)
            run //= dim
        elif run < dim and dim % run == 0:
            kept.append(dim // run)
            run = 1
        else:
            raise ValueError(f"quantization group {group} does not tile the input axes {ins} "
                             f"of a kernel of shape {tuple(shape)}")
    return shape[:lead] + tuple(reversed(kept)) + shape[lead + n_in:]


def _split(q_shape, s_shape):
    """q's shape with each axis split into (scale's size, run length): the scale broadcasts."""
    q_split, s_split = [], []
    for qd, sd in zip(q_shape, s_shape):
        q_split += [sd, qd // sd]
        s_split += [sd, 1]
    return tuple(q_split), tuple(s_split)


def quantize_kernel(w, lead: int, n_in: int, group: int | None = None) -> dict:
    """{"q", "scale"} of a float kernel w [lead..., in..., out...] (see the module docstring)."""
    if group is not None and (not isinstance(group, int) or isinstance(group, bool) or group < 1):
        raise ValueError(f"quantization group must be a positive integer, got {group!r}")
    shape = tuple(w.shape)
    s_shape = scale_shape(shape, lead, n_in, group)
    q_split, _ = _split(shape, s_shape)
    w = jnp.asarray(w, jnp.float32).reshape(q_split)  # [..., groups, run, ...] per axis
    runs = tuple(range(1, len(q_split), 2))  # the run axes (length 1 where nothing is reduced)
    amax = jnp.max(jnp.abs(w), axis=runs, keepdims=True)
    scale = jnp.where(amax > 0, amax / QMAX, 1.0)
    q = jnp.clip(jnp.round(w / scale), -QMAX, QMAX).astype(jnp.int8)
    return {"q": q.reshape(shape), "scale": scale.reshape(s_shape)}


def dequantize(k: dict, dtype=jnp.float32) -> jax.Array:
    """q * scale in `dtype`, in the kernel's layout."""
    q, scale = k["q"], k["scale"]
    q_split, s_split = _split(q.shape, scale.shape)
    w = q.reshape(q_split).astype(jnp.float32) * scale.reshape(s_split)
    return w.reshape(q.shape).astype(dtype)


def dense(x, k: dict, bias, n_in: int, dtype):
    """x [..., in...] times a quantized kernel [in..., out...] (+ bias [out...]) -> [..., out...]
    in `dtype`, float32 accumulation, the scales applied to the float32 product."""
    q, scale = k["q"], k["scale"]
    x = x.astype(dtype)
    lead, ins, outs = x.shape[: x.ndim - n_in], q.shape[:n_in], q.shape[n_in:]
    C, N = math.prod(ins), math.prod(outs)
    groups = math.prod(scale.shape[:n_in])  # 1 per channel, else the number of row runs
    f32 = jnp.float32
    if groups == 1:
        x2 = x.reshape(-1, C)  # [M, C]
        y = jax.lax.dot_general(x2, q.reshape(C, N).astype(dtype), (((1,), (0,)), ((), ())),
                                preferred_element_type=f32)  # [M, N]
        y = y * scale.reshape(N)
    else:
        run = C // groups
        x3 = x.reshape(-1, groups, run)  # [M, Gn, G]: runs of the last input axis, in order
        q3 = q.reshape(groups, run, N).astype(dtype)  # [Gn, G, N]
        part = jax.lax.dot_general(x3, q3, (((2,), (1,)), ((1,), (0,))),
                                   preferred_element_type=f32)  # [Gn, M, N]
        y = jnp.einsum("gmn,gn->mn", part, scale.reshape(groups, N),
                       precision=jax.lax.Precision.HIGHEST)  # [M, N]: the scaled sum of groups
    if bias is not None:
        y = y + bias.reshape(N).astype(f32)
    return y.astype(dtype).reshape(lead + outs)
