"""A sharding report: where every parameter lives on the mesh and what a train step needs.

One row per parameter (logical axes -> partition spec -> bytes on each device), totals for
parameters and optimizer state, and the per-device memory XLA reserves for the compiled train
step (`Compiled.memory_analysis()`): arguments, outputs, temporaries and the resulting peak.
Everything is derived from shapes, so the report for a model far larger than the host's memory
costs one compile and no allocation.
"""

from __future__ import annotations

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgpt.config import GPTConfig
from jaxgpt.models.model import abstract_params
from jaxgpt.sharding import RULES, batch_sharding, boxed_shardings, mesh_spec
from jaxgpt.training.checkpoint import abstract_with_shardings
from jaxgpt.training.losses import lm_loss_fn
from jaxgpt.training.optim import make_optimizer
from jaxgpt.training.runconfig import OptimConfig
from jaxgpt.training.state import abstract_state
from jaxgpt.training.step import compile_steps


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys)


def _natural(row) -> list:
    """Sort key that puts h_2 before h_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", row[0])]


def _spec_text(spec: P, ndim: int) -> str:
    parts = tuple(spec) + (None,) * (ndim - len(spec))
    return "(" + ", ".join("+".join(p) if isinstance(p, tuple) else str(p) for p in parts) + ")"


def _device_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` (the largest share, for uneven layouts)."""
    total = 0
    for x, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        total += math.prod(sh.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    return total


def _abstract_step(config: GPTConfig, mesh: Mesh, tx, boxed, batch_size: int, accum_steps: int):
    """Compile the language-model train step on shapes alone (nothing is allocated)."""
    abstract = abstract_state(boxed, tx)
    state_sh = boxed_shardings(abstract, mesh)
    state = abstract_with_shardings(nn.meta.unbox(abstract), state_sh)
    train, _ = compile_steps(lm_loss_fn(config), tx, lambda step: jnp.zeros(()), state_sh, mesh)
    shape = (accum_steps, batch_size // accum_steps, config.context_length)  # [A, B, T]
    ids = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(mesh, 3))
    return train.lower(state, {"inputs": ids, "targets": ids}, None).compile()


@dataclasses.dataclass(frozen=True)
class ReportOptions:
    """How the report is drawn: the step compiled on shapes when none is given (batch_size rows
    in accum_steps micro-batches), the rules table, and whether the per-parameter table shows
    (None: when the mesh has more than one device; on one every row says the same)."""

    batch_size: int = 8
    accum_steps: int = 1
    rules: tuple = RULES
    table: bool | None = None


def _param_rows(boxed, mesh: Mesh, rules) -> tuple[list[tuple], int, int]:
    """(rows of the table, parameter bytes in all, parameter bytes per device)."""
    shapes = nn.meta.unbox(boxed)
    flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    flat_specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, P))
    rows, param_global, param_device = [], 0, 0
    for (path, x), logical in zip(flat_shapes, flat_specs):
        spec = mesh_spec(logical, x.shape, mesh, rules)
        size = np.dtype(x.dtype).itemsize
        local = math.prod(NamedSharding(mesh, spec).shard_shape(x.shape)) * size
        param_global += math.prod(x.shape) * size
        param_device += local
        rows.append((_path(path), "x".join(map(str, x.shape)) or "scalar",
                     _spec_text(logical, x.ndim), _spec_text(spec, x.ndim), _bytes(local)))
    rows.sort(key=_natural)
    return rows, param_global, param_device


def _table(rows: list[tuple]) -> list[str]:
    header = ("parameter", "shape", "logical axes", "partition spec", "per device")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) if i == 4 else c.ljust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return [fmt(header), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)]


def _memory_lines(compiled) -> list[str]:
    mem = compiled.memory_analysis()
    if mem is None:
        return ["  (this backend reports no memory analysis)"]
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
    return [f"  arguments {_bytes(mem.argument_size_in_bytes)}, outputs "
            f"{_bytes(mem.output_size_in_bytes)} ({_bytes(mem.alias_size_in_bytes)} aliased to "
            f"donated arguments), temporaries {_bytes(mem.temp_size_in_bytes)}; "
            f"peak about {_bytes(peak)}"]


def sharding_report(config: GPTConfig, mesh: Mesh, tx=None, *, compiled=None, boxed_params=None,
                    options: ReportOptions = ReportOptions()) -> str:
    """The report as text; compiles the LM train step on shapes unless `compiled` is given.

    `tx` defaults to the library's AdamW (`make_optimizer(OptimConfig(), 1)`); `boxed_params`
    (abstract, with logical boxes) defaults to the parameters of GPT(config); the totals are
    always shown.
    """
    o = options
    table = mesh.size > 1 if o.table is None else o.table
    tx = make_optimizer(OptimConfig(), 1) if tx is None else tx
    boxed = abstract_params(config) if boxed_params is None else boxed_params
    rows, param_global, param_device = _param_rows(boxed, mesh, o.rules)
    shapes = nn.meta.unbox(boxed)
    abstract = abstract_state(boxed, tx)
    opt_shapes = nn.meta.unbox(abstract.opt_state)
    opt_device = _device_bytes(opt_shapes, boxed_shardings(abstract, mesh).opt_state)
    opt_global = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                     for x in jax.tree.leaves(opt_shapes))
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    dtypes = sorted({np.dtype(x.dtype).name for x in jax.tree.leaves(shapes)})
    axes = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
    lines = [
        f"sharding report: mesh {axes} ({mesh.size} devices, {jax.process_count()} process(es)); "
        f"params {'/'.join(dtypes)}, compute {config.compute_dtype.name}",
        *(_table(rows) if table else []),
        f"parameters: {n_params:,} = {_bytes(param_global)}, {_bytes(param_device)} per device",
        f"optimizer state: {_bytes(opt_global)}, {_bytes(opt_device)} per device",
    ]
    if compiled is None:
        compiled = _abstract_step(config, mesh, tx, boxed, o.batch_size, o.accum_steps)
        lines.append(f"train step (batch {o.batch_size} x {config.context_length} tokens, "
                     f"{o.accum_steps} micro-batch(es)), per device:")
    else:
        lines.append("compiled train step, per device:")
    return "\n".join(lines + _memory_lines(compiled))
