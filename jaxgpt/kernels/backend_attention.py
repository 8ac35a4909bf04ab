"""Attention on accelerators: which fused kernel runs, decided by a pure function, and the kernels.

Shape legend: B batch, T query time, S key time, H heads, K head width.

`choose_attention(backend, dtype, q_shape, k_shape, has_mask, dropout)` names the
implementation and, when it is not the backend's fused kernel, why:

  cpu   "cpu"        cpu_attention.heads_major_attention (it does dropout itself)
  gpu   "cudnn"      jax.nn.dot_product_attention(implementation="cudnn"): cuDNN's flash
                     attention, for bfloat16/float16, head width a multiple of 8 up to 128, a mask
                     only with even T and S (cuDNN adds a mask as a bias, and its backward pass
                     with a bias takes even lengths)
  tpu   "pallas"     Pallas' TPU flash attention, causal without a mask, T and S multiples of its
                     128-wide blocks
  any   "xla"        jax.nn.dot_product_attention's XLA composition (the fallback for shapes,
                     dtypes and masks the fused kernel does not take)
        "reference"  attention.reference_attention, for attention dropout (neither fused kernel
                     drops attention weights)

A fallback warns once per reason, naming it; so does a cuDNN call that cuDNN's own checks refuse
when traced (no cuDNN, an older GPU or cuDNN), which then runs the XLA composition. `attention.reference_attention` stays the
definition: each kernel here is tested against it (the Pallas kernel in interpret mode on CPU).
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxgpt.kernels import attention as _attention
from jaxgpt.sharding import active_mesh, mesh_spec

_FUSED = {"gpu": "cudnn", "tpu": "pallas"}
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
ACTIVATION_AXES = ("batch", "length", "heads", "kv")  # q, k, v [B, T, H, K] (H: repeated for GQA)
PALLAS_BLOCK = 128  # the TPU flash kernel's default block along T and S
_warned: set[str] = set()


class Choice(NamedTuple):
    name: str  # "cpu", "cudnn", "pallas", "xla" or "reference"
    reason: str | None  # why the backend's fused kernel is not used (None: it is, or none exists)


def choose_attention(backend: str, dtype, q_shape: tuple, k_shape: tuple, has_mask: bool,
                     dropout: bool) -> Choice:
    """The attention implementation for one call; q_shape [B, T, H, K], k_shape [B, S, H, K]."""
    if backend == "cpu":
        return Choice("cpu", None)
    fused = _FUSED.get(backend)
    if fused is None:
        return Choice("xla", f"no fused attention kernel for backend {backend!r}")
    if dropout:
        return Choice("reference", f"attention dropout is on and {fused} attention has none; "
                                   "set model.attn_drop_rate=0 to use it")
    t, kw, s = q_shape[1], q_shape[3], k_shape[1]
    if fused == "cudnn":
        if jnp.dtype(dtype) not in _HALF:
            return Choice("xla", f"cuDNN flash attention takes bfloat16/float16, got {jnp.dtype(dtype)}")
        if kw % 8 or kw > 128:
            return Choice("xla", f"cuDNN flash attention takes head widths that are multiples "
                                 f"of 8 up to 128, got {kw}")
        if has_mask and (t % 2 or s % 2):
            return Choice("xla", f"cuDNN flash attention with a mask takes even lengths, got "
                                 f"T={t}, S={s}")
        return Choice("cudnn", None)
    if has_mask:
        return Choice("xla", "the Pallas TPU flash kernel is used causal-only, without a mask")
    if t % PALLAS_BLOCK or s % PALLAS_BLOCK or t != s:
        return Choice("xla", f"the Pallas TPU flash kernel takes T = S, a multiple of "
                             f"{PALLAS_BLOCK}, got T={t}, S={s}")
    return Choice("pallas", None)


def warn_once(choice: Choice) -> None:
    """Warn, once per process and reason, that attention falls back from the fused kernel."""
    if choice.reason is not None and choice.reason not in _warned:
        _warned.add(choice.reason)
        warnings.warn(f"attention runs the {choice.name} path: {choice.reason}", stacklevel=3)


def cudnn_attention(q, k, v, mask=None):
    """cuDNN's flash attention (GPU only); mask semantics as attention.fused_attention."""
    return _attention.fused_attention(q, k, v, mask, implementation="cudnn")


def pallas_tpu_attention(q, k, v, mask=None, *, interpret: bool = False):
    """Causal attention by Pallas' TPU flash kernel; `interpret` runs it on any backend.

    Mosaic kernels cannot be partitioned by XLA, so inside a traced step on a mesh of more than
    one device (`sharding.activation_sharding`) the kernel runs per shard under `shard_map`:
    q, k and v split as the rules table splits [B, T, H, K] activations (batch over data and
    fsdp, heads over tensor; attention is independent per row and per head).
    """
    if mask is not None:
        raise ValueError("pallas_tpu_attention takes no mask (causal only)")
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    def run(q, k, v):
        t = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, T, H, K] <-> [B, H, T, K]
        out = fa.flash_attention(t(q), t(k), t(v), causal=True, sm_scale=1.0 / math.sqrt(q.shape[-1]))
        return t(out)  # [B, T, H, K]

    mesh = active_mesh()
    if mesh is not None and mesh.size > 1:
        spec = mesh_spec(P(*ACTIVATION_AXES), q.shape, mesh)
        run = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                            check_vma=False)
    if interpret:
        with pltpu.force_tpu_interpret_mode():
            return run(q, k, v)
    return run(q, k, v)


def backend_attention(backend: str):
    """The `attention` kernel for `backend`: each call chooses (at trace time, from static shapes)
    and runs its implementation, warning once where it falls back."""
    from jaxgpt.kernels.cpu_attention import heads_major_attention

    def attention(q, k, v, mask=None, *, dropout_rate=0.0, dropout_rng=None, deterministic=True):
        dropout = not deterministic and dropout_rate > 0.0
        choice = choose_attention(backend, q.dtype, q.shape, k.shape, mask is not None, dropout)
        warn_once(choice)
        if choice.name in ("cpu", "reference"):
            fn = heads_major_attention if choice.name == "cpu" else _attention.reference_attention
            return fn(q, k, v, mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                      deterministic=deterministic)
        if choice.name == "cudnn":
            try:  # cuDNN's own checks (its version, the GPU's generation) run here, at trace time
                return cudnn_attention(q, k, v, mask)
            except (NotImplementedError, RuntimeError, ValueError) as err:
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                warn_once(Choice("xla", f"cuDNN refused the call ({first})"))
        if choice.name == "pallas":
            return pallas_tpu_attention(q, k, v)
        return _attention.fused_attention(q, k, v, mask, implementation="xla")

    return attention
