"""Inference weights in float32, bfloat16 or int8: a transformation of the parameter tree.

`quantize(params, weights, group)`, in the spirit of jaxgpt.lora.transform (the model is unchanged):

  float32   the tree as it is (float leaves in float32)
  bfloat16  every float leaf cast to bfloat16 (embeddings, head, norms and biases too)
  int8      the projection kernels of every block -- attention query/key/value/c_proj
            (GPT-2), q/k/v/o_proj (Llama 3, Qwen3), MLP c_fc/c_proj, gate/up/down_proj, the
            `TARGETS` -- replaced by {"q": int8, "scale": float32} (jaxgpt.kernels.quantized:
            symmetric, per output channel, or per `group` rows of the kernel's last input axis);
            the token and position embeddings, the LM head (tied or lm_head), norms and biases
            stay float32: they are a small share of a large model and the logits' precision
            depends on them most.

The Dense layer reads a quantized kernel as any parameter and the kernel set dequantizes it
inside the jitted product, so only int8 is held between calls. Sharding: a quantized kernel
keeps its kernel's logical axis names for q and its scale (`quantized_axes`), so it places on the
mesh the float weights use; `quantize` of a tree already on a mesh keeps each q where its kernel
was and splits each scale the same way where its dimensions allow. `weight_bytes` reports memory.
"""

from __future__ import annotations

import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgpt.kernels.quantized import WEIGHTS, check_weights  # noqa: F401  (public here too)
from jaxgpt.kernels.quantized import is_quantized, quantize_kernel, scale_shape
from jaxgpt.lora.transform import DEFAULT_TARGETS
from jaxgpt.sharding import boxed_shardings
from jaxgpt.trees import flatten, unflatten

TARGETS = DEFAULT_TARGETS  # the projections of every block, as LoRA adapts them
# Kernels that read two input axes: the attention output [H, K, D].
TWO_INPUT_AXES = ("attn/c_proj/kernel", "self_attn/o_proj/kernel")


def layout(path: str, ndim: int) -> tuple[int, int]:
    """(lead, n_in) of a targeted kernel: a scanned stack's leading [L] axis, the input axes."""
    lead = 1 if {"h", "layers"} & set(path.split("/")[:-1]) else 0
    n_in = 2 if path.endswith(TWO_INPUT_AXES) else 1
    if ndim - lead - n_in < 1:
        raise ValueError(f"quantization target {path} has {ndim} axes, which is not a kernel")
    return lead, n_in


def targets(params) -> dict[str, tuple[int, int]]:
    """{path: (lead, n_in)} of the kernels int8 quantizes in `params` (float or abstract)."""
    out = {}
    for path, x in flatten(params).items():
        if any(re.search(p, path) for p in TARGETS):
            out[path] = layout(path, len(x.shape))
    return out


def _check_groups(params, group: int | None) -> dict[str, tuple[int, int]]:
    found = targets(params)
    if not found:
        raise ValueError("weights=int8 found no attention or MLP kernel to quantize in the params")
    flat = flatten(params)
    for path, (lead, n_in) in found.items():
        try:
            scale_shape(flat[path].shape, lead, n_in, group)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    return found


def quantize(params, weights: str = "int8", group: int | None = None):
    """The tree for inference in `weights` (see the module docstring); every shape is checked
    (a group that does not divide a kernel's input width names the kernel) before any work."""
    check_weights(weights, group)
    if any(is_quantized(x) for x in jax.tree.leaves(params, is_leaf=is_quantized)):
        raise ValueError("params are already quantized; quantize the float weights")
    if weights != "int8":
        dtype = jnp.dtype(weights)
        return jax.tree.map(lambda x: x.astype(dtype) if _floating(x) and x.dtype != dtype else x,
                            params)
    found = _check_groups(params, group)
    flat = flatten(params)
    for path, (lead, n_in) in found.items():
        flat[path] = _quantize_leaf(flat[path], lead, n_in, group)
    return unflatten(flat)


def leaf_converter(abstract, weights: str = "int8", group: int | None = None):
    """(path, leaf) -> the leaf as `quantize` makes it, for a loader that reads one leaf at a
    time (never the whole float tree); `abstract` (the model's tree of shapes) is checked first,
    so a group no kernel takes fails before anything is read."""
    check_weights(weights, group)
    found = _check_groups(abstract, group) if weights == "int8" else {}
    dtype = jnp.dtype(weights) if weights != "int8" else None

    def convert(path: str, x):
        if path in found:
            return _quantize_leaf(x, *found[path], group)
        if dtype is not None and _floating(x) and x.dtype != dtype:
            return x.astype(dtype)
        return x

    return convert


def _floating(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def _quantize_leaf(w, lead: int, n_in: int, group: int | None) -> dict:
    sharding = None if isinstance(w, jax.core.Tracer) else getattr(w, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return _quantizer(lead, n_in, group, None)(w)
    s_shape = scale_shape(w.shape, lead, n_in, group)
    out = {"q": sharding, "scale": _like(sharding, s_shape)}
    return _quantizer(lead, n_in, group, tuple(sorted(out.items())))(w)


def _like(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
    """The kernel's split on an array of its rank: each dimension keeps the kernel's mesh axes
    where they divide it (a scale's size-1 and uneven dimensions stay whole)."""
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    mesh, out = sharding.mesh, []
    for axes, dim in zip(spec, shape):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        out.append(axes if names and dim % math.prod(mesh.shape[a] for a in names) == 0 else None)
    return NamedSharding(mesh, P(*out))


@functools.lru_cache(maxsize=None)
def _quantizer(lead: int, n_in: int, group: int | None, shardings):
    fn = functools.partial(quantize_kernel, lead=lead, n_in=n_in, group=group)
    return jax.jit(fn, out_shardings=None if shardings is None else dict(shardings))


def quantized_axes(boxed_abstract, weights: str = "int8", group: int | None = None):
    """The abstract tree `quantize` makes of `boxed_abstract` (`model.abstract_params(config)`),
    each leaf boxed with its logical axis names: q and scale take their kernel's."""
    check_weights(weights, group)
    shapes = jax.eval_shape(lambda p: quantize(p, weights, group), nn.meta.unbox(boxed_abstract))
    return _rebox(boxed_abstract, shapes)


def lora_base(boxed_frozen, config):
    """A LoRA run's frozen base as it trains: in `config.base_weights` (QLoRA with int8: its
    projection kernels int8, dequantized inside each product), each leaf boxed with its logical
    axes as before (q and scale with their kernel's). float32 leaves the tree as it is. The
    adapters trained over it are the same tree as over the float base, and apply to it."""
    if config is None or config.base_weights == "float32":
        return boxed_frozen
    values = quantize(nn.meta.unbox(boxed_frozen), config.base_weights, config.base_group)
    return _rebox(boxed_frozen, values)


def _rebox(boxed, values):
    """`values` (a tree `quantize` made of `boxed`'s) with `boxed`'s logical-axis boxes."""
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    boxes = flatten(boxed, is_leaf=is_box)
    out = {}
    for path, x in flatten(values).items():
        box = boxes[path] if path in boxes else boxes[path.rsplit("/", 1)[0]]  # q, scale
        out[path] = box.replace_boxed(x) if is_box(box) else x
    return unflatten(out)


def shardings(boxed_abstract, mesh, weights: str = "int8", group: int | None = None):
    """NamedShardings of `quantize`'s tree on `mesh`, by the logical axis rules."""
    return boxed_shardings(quantized_axes(boxed_abstract, weights, group), mesh)


def weight_bytes(tree) -> int:
    """Bytes the tree's leaves hold (int8 q and float32 scales counted as they are stored)."""
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
