"""Device mesh and shardings: one rules table from logical axis names to mesh axes.

Every parameter carries logical axis names from the model (`jaxgpt.models.model.logical_axes`);
`RULES` maps them to the mesh axes ("data", "fsdp", "tensor"). Nothing else in the library names
a mesh axis. A mesh shape picks the strategy with no code change:
  data=N            pure data parallel (parameters replicated)
  fsdp=N            ZeRO-3 style: parameters, gradients and optimizer state split over "embed"
  tensor=N          Megatron style: attention heads, MLP width and vocabulary split
A dimension that a mesh axis does not divide evenly is left unsplit rather than failing.

Activations follow the same table: the model marks them with `constrain(x, names)`, which pins
them while a step is traced inside `activation_sharding(mesh)` (`traced_under` wraps a step so
that it always is). flax's own `nn.logical_axis_rules` context is not used: with it active, the
flat [D, H*K] kernel that `nn.DenseGeneral` initialises (even during `apply`, to check shapes)
is constrained with our 3-D names and fails; and it would resolve names without the shape
checks `mesh_spec` makes, so activations and parameters could disagree.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from dataclasses import dataclass

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgpt.checks import POSITIVE_INT, Rule, check_fields

MESH_AXES = ("data", "fsdp", "tensor")

RULES: tuple[tuple[str, tuple[str, ...] | str | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),  # grouped-query attention's key/value heads
    ("kv", None),
    ("mlp", "tensor"),
    ("layers", None),
)


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape; -1 means "all remaining devices"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        check_fields(self, _MESH_RULES)
        rest = [a for a in MESH_AXES if getattr(self, a) == -1]
        if len(rest) > 1:
            raise ValueError(f"MeshConfig.{rest[1]} cannot be -1 as well as {rest[0]}: only one "
                             "axis takes the remaining devices")


_MESH_RULES = dict.fromkeys(MESH_AXES, Rule("a positive integer or -1 (all remaining devices)",
                                            lambda v: POSITIVE_INT.test(v) or v == -1))


def make_mesh(cfg: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; -1 takes what the other axes leave."""
    devices = jax.devices() if devices is None else devices
    shape = [cfg.data, cfg.fsdp, cfg.tensor]
    if shape.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
    fixed = math.prod(s for s in shape if s != -1)
    if any(s == 0 or s < -1 for s in shape) or len(devices) % fixed:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape))} does not fit {len(devices)} devices"
        )
    shape = [len(devices) // fixed if s == -1 else s for s in shape]
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape))} uses {math.prod(shape)} devices, "
            f"but {len(devices)} are present"
        )
    per_chip = {getattr(d, "core_on_chip", 0) for d in devices}
    if len(per_chip) > 1:  # mesh_utils asserts "megacore" (one device per chip) on TPU v4/v5p
        raise ValueError(f"mesh: {len(devices)} devices hold {len(per_chip)} TensorCores of "
                         f"each {devices[0].device_kind} chip; pass one device per chip "
                         "(core_on_chip 0: megacore)")
    try:
        # Topology-aware placement on TPU (tensor, the chattiest axis, on the nearest chips),
        # ids in order on GPU, a plain reshape on CPU.
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError):  # a slice shape the helper cannot place
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def mesh_spec(logical: P, shape: tuple[int, ...], mesh: Mesh, rules=RULES) -> P:
    """The mesh PartitionSpec for one array from its logical names and shape."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, dim in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        # Skip axes already used by another dimension and axes of size 1 (no split).
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        else:
            out.append(None)
    return P(*out)


def logical_to_shardings(logical_tree, shapes_tree, mesh: Mesh, rules=RULES):
    """NamedShardings for a tree of arrays (or ShapeDtypeStructs) with logical specs."""
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, mesh_spec(spec, x.shape, mesh, rules)),
        logical_tree,
        shapes_tree,
        is_leaf=lambda x: isinstance(x, P),
    )


def boxed_shardings(boxed_tree, mesh: Mesh, rules=RULES):
    """Shardings for an abstract tree whose leaves may be flax LogicallyPartitioned boxes.

    Optimizer states built from boxed parameters keep the boxes, so one call covers params,
    Adam moments and scalars (replicated) alike.
    """
    specs = nn.get_partition_spec(boxed_tree)
    shapes = nn.meta.unbox(boxed_tree)
    return logical_to_shardings(specs, shapes, mesh, rules)


def is_boxed(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def with_axes(tree, axes):
    """`tree`'s leaves boxed with the logical axis names of `axes`, a boxed tree of the same
    structure (such as `model.abstract_params(config)`); unboxed leaves of `axes` stay plain."""
    return jax.tree.map(lambda ax, x: ax.replace_boxed(nn.meta.unbox(x)) if is_boxed(ax) else x,
                        axes, tree, is_leaf=is_boxed)


_active = threading.local()  # (mesh, rules) while a step is being traced


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=RULES):
    """While tracing inside this context, `constrain` pins activations to `rules` on `mesh`."""
    previous = getattr(_active, "value", None)
    _active.value = (mesh, rules)
    try:
        yield
    finally:
        _active.value = previous


def active_mesh() -> Mesh | None:
    """The mesh of the step being traced (inside `activation_sharding`), else None."""
    active = getattr(_active, "value", None)
    return None if active is None else active[0]


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Pin an activation to the split its logical axis names give (no-op outside a context)."""
    active = getattr(_active, "value", None)
    if active is None:
        return x
    mesh, rules = active
    spec = mesh_spec(P(*names), x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def traced_under(fn, mesh: Mesh, rules=RULES):
    """`fn` with `activation_sharding(mesh)` entered on every call, so also while jit traces it."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with activation_sharding(mesh, rules):
            return fn(*args, **kwargs)

    # A partial has no name of its own; keep the step's, so jit(train_step) shows in profiles.
    traced.__name__ = traced.__qualname__ = getattr(getattr(fn, "func", fn), "__name__", "step")
    return traced


def batch_sharding(mesh: Mesh, ndim: int = 3, batch_axis: int = 1) -> NamedSharding:
    """Sharding of a batch array whose `batch_axis` is split over the data-parallel axes."""
    spec = [None] * ndim
    spec[batch_axis] = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1) or None
    return NamedSharding(mesh, P(*spec))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def process_rows(mesh: Mesh, n_rows: int) -> np.ndarray:
    """Indices of the rows of an n_rows batch that this process's devices hold, in the order
    `make_array_from_process_local_data` expects (its distinct slices, ascending)."""
    index_map = batch_sharding(mesh, 1, 0).addressable_devices_indices_map((n_rows,))
    slices = {s[0].indices(n_rows)[:2] for s in index_map.values()}
    return np.concatenate([np.arange(a, b) for a, b in sorted(slices)])


def make_global_batch(local: dict, mesh: Mesh, global_shapes: dict, batch_axis: int = 1) -> dict:
    """Assemble each process's rows (see `process_rows`) into global arrays split over the data
    axes; `batch_axis` is 1 for [A, B, ...] step batches and 0 for [B, ...] eval batches."""
    return {
        k: jax.make_array_from_process_local_data(
            batch_sharding(mesh, v.ndim, batch_axis), v, global_shapes[k]
        )
        for k, v in local.items()
    }
