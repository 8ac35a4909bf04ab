"""An int8 parameter tree on disk: one safetensors file (no pickle) and its config in the header.

`save_quantized(directory, config, tree, group)` writes `QUANTIZED_FILE` with every leaf under
its "/"-joined path (a quantized kernel as <path>/q, int8, and <path>/scale, float32; the float
leaves as they are) and, in the header's metadata, the model config and the quantization
(weights=int8, group). `load_quantized(directory, mesh=None)` reads it back, checks every path,
shape and dtype against what `quantize` makes of that config before anything is placed, and puts
each leaf on the default device or its shards of `mesh` (scales follow their kernel's axes), so
the float32 weights are never held. Transformers cannot read this file; export float weights
with `save_pretrained` for that.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxgpt.config import GPTConfig
from jaxgpt.fsutil import replace_atomically
from jaxgpt.models.model import abstract_params
from jaxgpt.trees import flatten, host_array, unflatten
from jaxgpt.weights.quantize import quantize, shardings

QUANTIZED_FILE = "model.int8.safetensors"
FORMAT = "jaxgpt-int8"


def save_quantized(directory: str | os.PathLike, config: GPTConfig, tree, group: int | None = None) -> Path:
    """Write `quantize(params, "int8", group)`'s tree of `config` to directory/QUANTIZED_FILE."""
    expected = jax.eval_shape(lambda p: quantize(p, "int8", group), abstract_params(config, boxed=False))
    _check(flatten(tree), flatten(expected), "the tree to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {path: host_array(x) for path, x in flatten(tree).items()}
    meta = {"format": FORMAT, "group": "" if group is None else str(group),
            "config": json.dumps(config.to_dict())}
    path = directory / QUANTIZED_FILE
    replace_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def load_quantized(directory: str | os.PathLike, mesh=None) -> tuple[GPTConfig, dict]:
    """(config, int8 tree) from directory/QUANTIZED_FILE, on one device or split over `mesh`."""
    path = Path(directory) / QUANTIZED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {QUANTIZED_FILE}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a jaxgpt int8 file (format {meta.get('format')!r})")
            config = GPTConfig.from_dict(json.loads(meta["config"]))
            group = int(meta["group"]) if meta.get("group") else None
            expected = flatten(jax.eval_shape(lambda p: quantize(p, "int8", group),
                                              abstract_params(config, boxed=False)))
            _check({k: f.get_slice(k) for k in f.keys()}, expected, str(path))
            flat = {k: f.get_tensor(k) for k in expected}
    except (SafetensorError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} cannot be read as a jaxgpt int8 file: {err}") from None
    tree = unflatten(flat)
    if mesh is None:
        return config, jax.device_put(tree)
    return config, jax.device_put(tree, shardings(abstract_params(config), mesh, "int8", group))


def _check(found: dict, expected: dict, what: str) -> None:
    """One line naming the first path missing, unexpected, or of another shape or dtype."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise ValueError(f"{what} does not match its config: missing {missing[:1] or 'none'}; "
                         f"unexpected {extra[:1] or 'none'}")
    for key, want in expected.items():
        got = found[key]
        shape = tuple(got.get_shape()) if hasattr(got, "get_shape") else tuple(got.shape)
        dtype = _dtype(got)
        if shape != tuple(want.shape) or dtype != np.dtype(want.dtype):
            raise ValueError(f"{what}: {key} is {dtype}{list(shape)}, expected "
                             f"{np.dtype(want.dtype)}{list(want.shape)}")


def _dtype(x) -> np.dtype:
    if hasattr(x, "get_dtype"):  # a safetensors slice: "I8", "F32", ...
        return np.dtype({"I8": np.int8, "F32": np.float32}.get(x.get_dtype(), np.void))
    return np.dtype(x.dtype)
