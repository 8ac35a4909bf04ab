"""Reading Orbax checkpoints without the training stack, and the one-tree writer they pair with.

A step directory counts only when Orbax has committed it (`commit_success.txt`). Readers here
never change a directory: an uncommitted step is skipped, not moved aside (the training
Checkpointer does that when a run resumes). Trees are read as a partial restore, so a caller
asking for the parameters of a train state leaves the optimizer state, twice their size, on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

COMMITTED = ("commit_success.txt", "_CHECKPOINT_METADATA")


class CheckpointError(ValueError):
    """A checkpoint or run directory that cannot be written or used, in one line."""


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
