"""Kernels: how the model's operations run, chosen by backend here and nowhere else.

The model names what it computes (a dense projection, the LM head's product, attention, GELU,
the loss) and calls `select(config.kernels)`'s functions; this module decides how, from the
kernel set's name and the platform of the mesh the step is traced for (`backend()`: the devices
of `sharding.activation_sharding`'s mesh, else the host's default backend), so a step compiled
on a CPU host for a TPU or GPU mesh gets the kernels of that mesh:

  reference  the plain definitions (what flax and jax.nn compute), which every other kernel is
             tested against
  auto       what was measured fastest on the backend:
               cpu      every Dense through the layout matmul (matmul.py), attention with a
                        hand-written gradient in (B, H)-batched layouts (cpu_attention.py)
               gpu/tpu  plain dots (XLA's own choices); attention by cuDNN's flash kernel on
                        GPU, Pallas' flash kernel on TPU, with fallbacks for what they do not
                        take (backend_attention.py: a pure choice, tested for every backend)
             and everywhere GELU and the cross-entropy with one-pass float32 gradients (gelu.py,
             cross_entropy.py).

Dropout (dropout.py) is not a choice: its masks are a pure function of the key, the same under
every kernel set, backend and sharding. Importing kernels changes nothing in the process.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Callable

import jax
import jax.numpy as jnp

from jaxgpt.kernels import attention as _attention
from jaxgpt.kernels import backend_attention as _backend_attention
from jaxgpt.kernels import cross_entropy as _ce
from jaxgpt.kernels import dense as _dense
from jaxgpt.kernels.cpu_attention import heads_major_attention
from jaxgpt.kernels.gelu import gelu, reference_gelu
from jaxgpt.sharding import active_mesh

KERNEL_SETS = ("auto", "reference")


@dataclasses.dataclass(frozen=True)
class KernelSet:
    """The functions one kernel set runs; signatures in the module each comes from."""

    name: str
    dense: Callable  # (x [..., in...], kernel [in..., out...], bias | None, n_in, dtype) -> [..., out...]
    project: Callable  # (x [..., C], w, rhs_t, out_dtype) -> [..., N]: the LM head
    attention: Callable  # (q, k, v, mask, *, dropout_rate, dropout_rng, deterministic) -> [B, T, H, K]
    cache_attention: Callable  # the same over a heads-major [B, H, S, K] cache
    grouped_cache_attention: Callable  # (q, k, v, mask) over a [B, Hkv, S, K] cache, no dropout
    gelu: Callable
    cross_entropy_sum: Callable  # (logits, targets, ignore) -> float32 scalar


GPU_PLATFORMS = frozenset({"gpu", "cuda", "rocm"})


def platform_of(devices) -> str:
    """"cpu", "gpu" or "tpu" for a sequence of devices (CUDA and ROCm devices are GPUs)."""
    platform = next(iter(devices)).platform
    return "gpu" if platform in GPU_PLATFORMS else platform


def backend() -> str:
    """The platform the kernels are chosen for: "cpu", "gpu" or "tpu", from the devices of the
    mesh the step is traced for (`sharding.activation_sharding`), else the host's default, so a
    step compiled on a CPU host for a TPU or GPU mesh gets that mesh's kernels."""
    mesh = active_mesh()
    if mesh is not None:
        return platform_of(mesh.devices.flat)
    default = jax.default_backend()
    return "gpu" if default in GPU_PLATFORMS else default


def auto_compute_dtype() -> jnp.dtype:
    """dtype="auto": bfloat16 on GPU/TPU, float32 on CPU (the platform `backend()` names)."""
    return jnp.dtype(jnp.float32 if backend() == "cpu" else jnp.bfloat16)


# CPU features (Linux /proc/cpuinfo "flags", or "Features" on Arm) that do bfloat16 arithmetic
# natively; without them XLA:CPU emulates it, many times slower than float32.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
_bf16_warned = False


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve_compute_dtype(name: str) -> jnp.dtype:
    """A config's dtype name as a dtype ("auto" by backend); an explicit bfloat16 on a CPU
    without native bfloat16 warns once, naming the reason."""
    global _bf16_warned
    if name == "auto":
        return auto_compute_dtype()
    dtype = jnp.dtype(name)
    if (dtype == jnp.bfloat16 and not _bf16_warned and backend() == "cpu"
            and not NATIVE_BF16_FLAGS & cpu_flags()):
        _bf16_warned = True
        warnings.warn("model.dtype=bfloat16 on a CPU without native bfloat16 (no avx512_bf16 or "
                      "amx_bf16 in /proc/cpuinfo): XLA emulates it, many times slower than "
                      "float32; use dtype=auto or float32", stacklevel=3)
    return dtype


def select(name: str = "auto") -> KernelSet:
    """The kernel set `name` for the platform the step is traced for (`backend()`)."""
    if name not in KERNEL_SETS:
        raise ValueError(f"kernels must be one of {KERNEL_SETS}, got {name!r}")
    return kernel_set(name, backend())


@functools.lru_cache(maxsize=None)
def kernel_set(name: str, platform: str) -> KernelSet:
    """The kernel set `name` on `platform` ("cpu", "gpu" or "tpu"), built once per pair."""
    reference = KernelSet("reference", _dense.reference_dense, _dense.reference_project,
                          _attention.reference_attention, _attention.cache_attention,
                          _attention.grouped_cache_attention, reference_gelu,
                          _ce.reference_cross_entropy_sum)
    if name == "reference":
        return reference
    if platform == "cpu":
        return dataclasses.replace(reference, name="auto", dense=_dense.layout_dense,
                                   project=_dense.layout_project, attention=heads_major_attention,
                                   gelu=gelu, cross_entropy_sum=_ce.cross_entropy_sum)
    return dataclasses.replace(reference, name="auto", gelu=gelu,
                               attention=_backend_attention.backend_attention(platform),
                               cross_entropy_sum=_ce.cross_entropy_sum)
