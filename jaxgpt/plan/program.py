"""What a compiled program says about itself: memory per device, FLOPs, kernels, collectives.

Read from `Compiled.memory_analysis()`, `Compiled.cost_analysis()` (None for a CUDA
compile-only program) and the optimized HLO text (`Compiled.as_text()`): custom calls by target
name (cuDNN's fused attention `__cudnn$fmha...`, Mosaic's `tpu_custom_call`) and collectives by
kind with the bytes of their results.
"""

from __future__ import annotations

import collections
import dataclasses
import re

import numpy as np

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# `%name = (f32[2,3]{1,0}, bf16[4]) all-reduce-start(...)` or `... = f32[8]{0} all-gather(...)`
_OP = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(_COLLECTIVES) + r")(-start)?\(")
_ARRAY = re.compile(r"\b(pred|[a-z]+\d+(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_CUSTOM = re.compile(r'custom_call_target="([^"]+)"')
# Custom calls that are plumbing, not kernels: sharding markers and host transfers.
_PLUMBING = ("Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape", "AllocateBuffer",
             "MoveToHost", "MoveToDevice")
ATTENTION_KERNELS = {"cudnn": "__cudnn$fmha", "pallas": "tpu_custom_call"}


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per device XLA reserves for the program."""

    arguments: int
    outputs: int
    aliased: int  # outputs written into donated arguments
    temporaries: int

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries


def memory(compiled) -> Memory | None:
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return Memory(mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                  mem.temp_size_in_bytes)


def xla_cost(compiled) -> dict:
    """XLA's FLOPs and bytes accessed per device ({} where the backend has no count)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001  (some compile-only backends raise instead of None)
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return {}
    return {k: float(cost[k]) for k in ("flops", "bytes accessed") if k in cost}


def _dtype_bytes(name: str) -> float:
    if name == "pred":
        return 1
    try:
        return np.dtype(name).itemsize
    except TypeError:
        import ml_dtypes  # bf16, f8 types

        return np.dtype(getattr(ml_dtypes, {"bf16": "bfloat16"}.get(name, name))).itemsize


_SHORT = {"f32": "float32", "f16": "float16", "f64": "float64", "bf16": "bf16", "s32": "int32",
          "s8": "int8", "u8": "uint8", "u32": "uint32", "s64": "int64", "u16": "uint16",
          "s16": "int16", "pred": "pred"}


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(text):
        n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        total += n * _dtype_bytes(_SHORT.get(dtype, "float32"))
    return int(total)


def collectives(hlo_text: str) -> dict[str, dict]:
    """{kind: {"count", "bytes"}} over the program's collectives (bytes: their results, per
    device; an async start counts once, its done not at all)."""
    out: dict[str, dict] = {}
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if m is None:
            continue
        shape = m.group(1)
        if m.group(3):  # an async start's result is (operands, results[, context]): the results
            parts = re.findall(r"[a-z]+\d*\[[\d,]*\]", shape)
            shape = " ".join(parts[len(parts) // 2:]) if len(parts) > 1 else shape
        entry = out.setdefault(m.group(2), {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += _shape_bytes(shape)
    return out


def custom_calls(hlo_text: str) -> dict[str, int]:
    """Kernel custom calls by target name, with their counts (sharding markers left out)."""
    counts = collections.Counter(t for t in _CUSTOM.findall(hlo_text) if t not in _PLUMBING)
    return dict(sorted(counts.items()))


def attention_evidence(calls: dict[str, int], kernel: str) -> dict[str, int]:
    """The custom calls in `calls` that are `kernel`'s ("cudnn" or "pallas"), by name."""
    prefix = ATTENTION_KERNELS.get(kernel)
    return {k: v for k, v in calls.items() if prefix and k.startswith(prefix)}
