"""Parameter trees as flat dicts and back: the one place paths are spelled.

A path joins the dict keys from the root with "/" ("h_0/attn/query/kernel"), or, with
`sep=None`, is the tuple of keys. LoRA's targets, checkpoint fingerprints and the GPT-2
rename table all work on these paths. `fingerprint` hashes a tree's leaves by path.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import jax
import numpy as np


def _key(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


def flatten(tree, *, is_leaf: Callable[[Any], bool] | None = None, sep: str | None = "/") -> dict:
    """{path: leaf} in the tree's order; paths are "/"-joined strings, or tuples if sep=None."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    if sep is None:
        return {tuple(_key(k) for k in path): x for path, x in leaves}
    return {sep.join(_key(k) for k in path): x for path, x in leaves}


def unflatten(flat: dict, *, leaf: Callable[[Any], Any] | None = None, consume: bool = False) -> dict:
    """Nested dicts from {path: leaf} (string or tuple paths). `leaf` converts each value;
    `consume` pops entries from `flat` as it goes, so a converted copy never sits beside it."""
    tree: dict = {}
    for path in list(flat):
        value = flat.pop(path) if consume else flat[path]
        *parents, last = path.split("/") if isinstance(path, str) else path
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value if leaf is None else leaf(value)
    return tree


def check_like(flat: dict, expected: dict) -> None:
    """Raise a one-line ValueError unless `flat` (tuple paths, as flatten(sep=None) gives) has
    exactly `expected`'s paths, each with the expected shape."""
    if set(flat) != set(expected):
        missing = sorted("/".join(p) for p in set(expected) - set(flat))
        extra = sorted("/".join(p) for p in set(flat) - set(expected))
        raise ValueError(f"params do not match the config: missing {missing or 'none'}; "
                         f"unexpected {extra or 'none'}")
    for path, leaf in expected.items():
        if flat[path].shape != leaf.shape:
            raise ValueError(f"param {'/'.join(path)} has shape {flat[path].shape}, expected {leaf.shape}")


def host_array(x) -> np.ndarray:
    """A leaf as one contiguous host array (gathered first when other processes hold parts)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.ascontiguousarray(jax.device_get(x))


def fingerprint(tree, skip: Callable[[str], bool] = lambda path: False) -> str:
    """sha256 of every leaf (its path, dtype, shape and bytes) in sorted path order, on the host;
    leaves whose path `skip` accepts are left out."""
    h = hashlib.sha256()
    for path, x in sorted(flatten(tree).items()):
        if skip(path):
            continue
        host = host_array(x)
        h.update(f"{path}:{host.dtype.str}:{host.shape};".encode())
        h.update(host.reshape(-1).view(np.uint8))
    return h.hexdigest()
