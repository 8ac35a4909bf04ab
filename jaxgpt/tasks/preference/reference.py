"""Stored reference log-probabilities: the frozen reference model's, computed once and kept.

With `preference.reference=stored` the reference model is run once over every pair of the
train and validation splits before training, and its [N, 2] log-probabilities are written to
RUN_DIR/reference_logps.safetensors (atomically), so training holds one model, not two. The file
records a fingerprint of what the numbers depend on: the start weights, the pairs' tokens and
prompt lengths, the model config and the reduction. A rerun (a resume) reads the file when its
fingerprint matches and otherwise computes it again from the start weights, which the run loads
in either case.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save

from jaxgpt.config import GPTConfig
from jaxgpt.distributed import is_lead
from jaxgpt.fsutil import write_atomic
from jaxgpt.sharding import make_global_batch, make_mesh, process_rows, traced_under
from jaxgpt.tasks.preference.data import PreferenceDataset
from jaxgpt.tasks.preference.loss import logps_fn
from jaxgpt.trees import fingerprint, host_array
from jaxgpt.weights.loader import place

FILE = "reference_logps.safetensors"


def _fingerprint(params, config: GPTConfig, sets: dict[str, PreferenceDataset], reduction: str) -> str:
    h = hashlib.sha256(fingerprint(params).encode())
    h.update(json.dumps([config.to_dict(), reduction], sort_keys=True, default=str).encode())
    for name, data in sorted(sets.items()):
        h.update(f"{name}:{data.length}:{data.prompt_lengths};".encode())
        for tokens in data.tokens:
            h.update(np.asarray(tokens, np.int64).tobytes() + b";")
    return h.hexdigest()


def compute(params, config: GPTConfig, data: PreferenceDataset, rows: int, reduction: str,
            mesh) -> np.ndarray:
    """[N, 2] log-probabilities of every pair under `params` (placed on `mesh`), `rows` at a time."""
    step = jax.jit(traced_under(lambda p, b: logps_fn(config, reduction)(p, None, b, None, True)[0],
                                mesh))
    placed = place(config, params, mesh)
    mine = process_rows(mesh, rows)
    out = []
    for start in range(0, len(data), rows):
        idx = np.minimum(np.arange(start, start + rows), len(data) - 1)  # the last batch repeats
        local = {k: v for k, v in data.rows(idx[mine]).items() if k in ("inputs", "targets")}
        shapes = {k: (rows,) + v.shape[1:] for k, v in local.items()}
        logps = step(placed, make_global_batch(local, mesh, shapes, batch_axis=0))
        out.append(host_array(logps))
    return np.concatenate(out)[: len(data)].astype(np.float32)


def attach(run_dir: Path, params, config: GPTConfig, sets: dict[str, PreferenceDataset], *,
           rows: int, reduction: str, mesh_config) -> bool:
    """Set each data set's `reference` from the run's file, or compute and write it; True if
    it was computed."""
    key = _fingerprint(params, config, sets, reduction)
    path = Path(run_dir) / FILE
    if path.is_file():
        with safe_open(str(path), "np") as f:
            stored = (f.metadata() or {}).get("fingerprint")
        if stored == key:
            arrays = load_file(str(path))
            for name, data in sets.items():
                data.reference = arrays[name]
            return False
    mesh = make_mesh(mesh_config)
    arrays = {name: compute(params, config, data, rows, reduction, mesh)
              for name, data in sets.items() if len(data)}
    for name, data in sets.items():
        data.reference = arrays.get(name, np.zeros((0, 2), np.float32))
    if is_lead():
        write_atomic(path, save(arrays, metadata={"fingerprint": key, "reduction": reduction}))
    return True
