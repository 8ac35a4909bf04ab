"""Reading Orbax checkpoints without the training stack, and the one-tree writer they pair with.

A step directory counts only when Orbax has committed it (`commit_success.txt`). Readers here
never change a directory: an uncommitted step is skipped, not moved aside (the training
Checkpointer does that when a run resumes). Trees are read as a partial restore, so a caller
asking for the parameters of a train state leaves the optimizer state, twice their size, on disk.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxgpt.trees import flatten

COMMITTED = ("commit_success.txt", "_CHECKPOINT_METADATA")


class CheckpointError(ValueError):
    """A checkpoint or run directory that cannot be written or used, in one line."""


class CorruptCheckpoint(CheckpointError):
    """A committed step whose files cannot be read or do not hold what was written: an older
    complete step may still be good."""


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


# What Orbax and TensorStore say when a file of a checkpoint is short or garbled: their text is
# pages of internal spec, so a reader is told the cause instead.
_DAMAGE = ("Encountered error while reading", "DATA_LOSS", "OUT_OF_RANGE", "nexpected end",
           "truncated", "Unterminated string", "Expecting value", "Expecting ',' delimiter",
           "Invalid control character", "Extra data", "Error decoding", "corrupt")


def unreadable(where: str, err: BaseException) -> CorruptCheckpoint:
    """The one-line error for a checkpoint Orbax could not read: truncation or damage named as
    such (with the library's first words), anything else by its first line."""
    text = str(err)
    short = first_line(err).split(" See full TensorStore details")[0][:160]
    if any(mark in text for mark in _DAMAGE):
        return CorruptCheckpoint(f"{where} cannot be read: a file of it is truncated or damaged "
                                 f"({short})")
    return CorruptCheckpoint(f"{where} cannot be read: {short}")


def complete_steps(directory: str | Path) -> list[int]:
    """Steps whose checkpoint directories were fully committed, ascending."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(int(c.name) for c in d.iterdir()
                  if c.is_dir() and c.name.isdigit() and all((c / f).exists() for f in COMMITTED))


def _item_dir(directory: str | Path, step: int, item: str) -> Path:
    path = Path(directory).absolute() / str(step) / item
    if not path.is_dir():
        raise CheckpointError(f"{path.parent} has no {item!r} checkpoint item")
    return path


def tree_shapes(directory: str | Path, step: int = 0, item: str = "tree", key: str | None = None):
    """The ShapeDtypeStructs of one item (or its `key` subtree) of a checkpoint step."""
    path = _item_dir(directory, step, item)
    # The item's own handler, not a CheckpointManager: a manager opened on a run directory may
    # write to it, and logs warnings about the items it is not asked for.
    handler = ocp.PyTreeCheckpointHandler()
    try:
        meta = handler.metadata(path).tree
    except Exception as err:  # TensorStore on damaged metadata files
        raise unreadable(f"checkpoint step {step} in {directory}", err) from err
    finally:
        handler.close()
    if key is not None:
        if key not in meta:
            raise CheckpointError(f"{path} has no {key!r}")
        meta = meta[key]
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)), meta)


def restore_tree(directory: str | Path, step: int = 0, item: str = "tree", key: str | None = None,
                 shardings: Callable[[Any], Any] | None = None):
    """One item (or its `key` subtree) of a checkpoint step: on one local device, or where
    `shardings(shapes)` puts each array (any topology, whatever the writer ran on)."""
    path = _item_dir(directory, step, item)
    shapes = tree_shapes(directory, step, item, key)
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        placed = jax.tree.map(lambda _: one, shapes)
    else:
        placed = shardings(shapes)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, placed)
    target = target if key is None else {key: target}  # only this part is read from disk
    args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
    handler = ocp.PyTreeCheckpointHandler()
    try:
        out = handler.restore(path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=args, partial_restore=True))
    finally:
        handler.close()
    return out if key is None else out[key]


def save_tree(tree, directory: str | Path) -> None:
    """Write a parameter tree as a one-step Orbax checkpoint, which `restore_tree` reads."""
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    with ocp.CheckpointManager(Path(directory).absolute(), options=options) as mgr:
        mgr.save(0, args=ocp.args.Composite(tree=ocp.args.StandardSave(tree)))


# ---- integrity ----------------------------------------------------------------------------------
# A checkpoint's meta records two wrapping uint32 sums per array: of its bits, and of its bits
# times a per-position odd weight (so moved or swapped values change it too). Integer sums mod
# 2^32 are exact in any order, so the figures are the same whatever the sharding, and they are
# computed on the device: nothing is copied to the host to check a multi-gigabyte state.


def _bits(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).reshape(-1)


@jax.jit
def _checksums(leaves: list) -> tuple[jax.Array, jax.Array]:
    sums, finite = [], []
    for x in leaves:
        u = _bits(x)
        weight = jnp.arange(u.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
        sums.append(jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * weight, dtype=jnp.uint32)]))
        finite.append(jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.floating)
                      else jnp.array(True))
    return jnp.stack(sums), jnp.stack(finite)


def checksums(tree) -> tuple[dict[str, list[int]], list[str]]:
    """({path: [sum, weighted sum]} of every array, [paths of floating arrays with NaN or inf])."""
    flat = flatten(tree)
    if not flat:
        return {}, []
    sums, finite = jax.device_get(_checksums(list(flat.values())))
    paths = list(flat)
    return ({p: [int(a), int(b)] for p, (a, b) in zip(paths, sums)},
            [p for p, ok in zip(paths, finite) if not ok])


def verify(tree, expected: dict | None, where: str, prefix: str = "") -> None:
    """Raise CheckpointError naming the first array of `tree` whose values are not finite or do
    not match `expected` (the sums written with it; paths under `prefix`). None: finiteness only."""
    sums, not_finite = checksums(tree)
    if not_finite:
        raise CorruptCheckpoint(f"{where}: array {prefix}{not_finite[0]} holds NaN or inf")
    if expected is None:
        return
    for path, got in sums.items():
        want = expected.get(prefix + path)
        if want is not None and list(want) != got:
            raise CorruptCheckpoint(f"{where}: array {prefix}{path} does not match the checksum "
                                    "written with it (the file is corrupted)")


def read_meta(directory: str | Path, step: int) -> dict:
    """The JSON record saved beside a train state (step, tokens_seen, config, checksums)."""
    path = Path(directory) / str(step) / "meta" / "metadata"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CorruptCheckpoint(f"{path} cannot be read: {first_line(err)}") from None
    if not isinstance(meta, dict):
        raise CorruptCheckpoint(f"{path} is not a JSON object")
    return meta


def read_verified(directory: str | Path, step: int, key: str = "params",
                  shardings: Callable[[Any], Any] | None = None):
    """The `key` part of a train-state checkpoint, checked against the sums saved with it
    (checkpoints written before sums existed get the finiteness check only)."""
    where = f"checkpoint step {step} in {directory}"
    try:
        tree = restore_tree(directory, step, "state", key, shardings=shardings)
    except CheckpointError:
        raise
    except Exception as err:  # Orbax/TensorStore on a truncated or damaged file
        raise unreadable(where, err) from err
    verify(tree, read_meta(directory, step).get("checksums"), where, prefix=f"{key}/")
    return tree


def newest_intact(steps: list[int], read: Callable[[int], Any]) -> tuple[Any, int]:
    """(read(step), step) for the newest of `steps` that reads back intact. A reader never
    repairs a run directory: a damaged newer step is named on stderr and skipped."""
    candidates = sorted(steps, reverse=True)
    for i, step in enumerate(candidates):
        try:
            return read(step), step
        except CorruptCheckpoint as err:
            if i + 1 == len(candidates):
                raise
            print(f"warning: {err}; loading step {candidates[i + 1]} instead", file=sys.stderr)
    raise CheckpointError("no step to read")


def read_latest_verified(directory: str | Path, key: str = "params"):
    """(tree, step): `read_verified` of the newest complete step that reads back intact."""
    steps = complete_steps(directory)
    if not steps:
        raise CheckpointError(f"{directory} has no complete checkpoint")
    return newest_intact(steps, lambda step: read_verified(directory, step, key))
