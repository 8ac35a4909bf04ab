"""One loader for every model source: `load_model(source) -> (GPTConfig, params)`.

A source is a directory with config.yaml (a jaxgpt run) or anything `load_pretrained` takes (a
GPT-2 hub name, a Hugging Face directory). Runs, by what they hold:

- a finished instruction or preference run (model/config.json beside config.yaml): its exported
  merged model;
- a LoRA instruction or preference run without that export (config.yaml's `lora` is set; the
  checkpoints hold {"lora": adapters, "full": ...} and not the frozen base): its base, loaded
  from `instruct.init_from` (`preference.init_from`) by this same function, adapters merged;
- any other run: the parameters of its latest complete checkpoint (or `step`);
- a classifier run: refused, its head predicts classes, not tokens (`load_classifier`).

Only config.yaml's raw sections are read (yaml.safe_load), so core needs no run-config schema.
Reading never changes a run directory (see jaxgpt.weights.runs).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

from jaxgpt.config import RUNTIME_FIELDS, GPTConfig
from jaxgpt.lora import transform as lora
from jaxgpt.models.model import abstract_params
from jaxgpt.sharding import boxed_shardings
from jaxgpt.weights.hf_files import resolve
from jaxgpt.weights.huggingface import load_hf
from jaxgpt.weights.runs import (
    CheckpointError,
    complete_steps,
    newest_intact,
    read_verified,
    tree_shapes,
)

CLASSIFIER_HEAD = "cls_head"  # the classifier's parameter key (tasks/classification/model.py)


def load_model(source: str | os.PathLike, *, step: int | None = None, mesh=None,
               **config_overrides) -> tuple[GPTConfig, Any]:
    """(config, params) of a GPT-2 name, a Hugging Face directory or a jaxgpt run directory; on
    one device, or split over `mesh` by the logical axis rules."""
    path = Path(source).expanduser()
    if not is_run_dir(path):
        if (path / "checkpoints").is_dir():
            raise CheckpointError(f"{path} is not a run directory (no config.yaml)")
        if step is not None:
            raise ValueError(f"step={step} needs a run directory; {source} is not one")
        # streamed leaf by leaf into its shards: never a host copy of the whole model
        return load_hf(resolve(source), mesh=mesh, **config_overrides)
    fixed = sorted(set(config_overrides) - set(RUNTIME_FIELDS))
    if fixed:
        raise ValueError(f"cannot override {fixed[0]} when loading run directory {path}: its "
                         f"weights fix it; only {', '.join(RUNTIME_FIELDS)} may change")
    return _load_run(path, step, mesh, config_overrides)


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a jaxgpt run directory (it has config.yaml)."""
    return (Path(path) / "config.yaml").is_file()


def start_overrides(source: str | os.PathLike, model: GPTConfig) -> dict:
    """What a run finetuning from `source` lays over its weights' config: the runtime fields of
    `model`, and for Hugging Face weights its layout (scan_layers, tie_embeddings) too; a run
    directory's layout is fixed by that run."""
    layout = {} if is_run_dir(source) else dict(scan_layers=model.scan_layers,
                                                 tie_embeddings=model.tie_embeddings)
    return {**model.runtime(), **layout}


def read_run_yaml(run_dir: str | os.PathLike) -> dict:
    """A run directory's config.yaml as plain sections (no schema: any recipe's run reads)."""
    path = Path(run_dir) / "config.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise CheckpointError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise CheckpointError(f"{path} has no model section")
    return raw


def task_section(raw: dict) -> dict:
    """The finetuning section of a run's raw config.yaml (instruct or preference), or {}."""
    return raw.get("instruct") or raw.get("preference") or {}


def _refuse_classifier(run_dir: Path) -> None:
    raise CheckpointError(f"{run_dir} is a classifier run (its head predicts classes, not tokens); "
                          "load it with jaxgpt.load_classifier")


def _load_run(run_dir: Path, step: int | None, mesh, overrides: dict) -> tuple[GPTConfig, Any]:
    raw = read_run_yaml(run_dir)
    if "classifier" in raw:
        _refuse_classifier(run_dir)
    if step is None and (run_dir / "model" / "config.json").is_file():  # a finished instruction run
        return load_model(run_dir / "model", mesh=mesh, **overrides)
    try:
        model = GPTConfig.from_dict(raw["model"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{run_dir / 'config.yaml'}: {err}") from None
    model = model.replace(**overrides)
    ckpts = run_dir / "checkpoints"
    steps = complete_steps(ckpts)
    if not steps:
        raise CheckpointError(f"{run_dir} has no complete checkpoint")
    if step is not None and step not in steps:
        raise CheckpointError(f"{run_dir} has no complete checkpoint {step} (it has {steps})")
    _note_uncommitted(ckpts, steps[-1])
    candidates = [step] if step is not None else steps
    return model, newest_intact(candidates, lambda s: _load_step(run_dir, raw, model, s, mesh))[0]


def _note_uncommitted(ckpts: Path, latest: int) -> None:
    newer = sorted(int(c.name) for c in ckpts.iterdir()
                   if c.is_dir() and c.name.isdigit() and int(c.name) > latest)
    if newer:
        print(f"note: step {newer[-1]} in {ckpts} is not committed (being written, or a write "
              f"that died); loading step {latest}", file=sys.stderr)


def _load_step(run_dir: Path, raw: dict, model: GPTConfig, step: int, mesh):
    ckpts = run_dir / "checkpoints"
    shapes = tree_shapes(ckpts, step, "state", "params")
    if CLASSIFIER_HEAD in shapes:
        _refuse_classifier(run_dir)
    if raw.get("lora") is not None:
        return place(model, _merge_lora_run(run_dir, raw, model, step), mesh)
    expected = abstract_params(model, boxed=False)
    if (jax.tree.structure(expected) != jax.tree.structure(shapes)
            or any(e.shape != s.shape for e, s in zip(jax.tree.leaves(expected), jax.tree.leaves(shapes)))):
        raise CheckpointError(f"checkpoint {step} in {run_dir} does not hold a GPT of its config")
    shardings = None if mesh is None else (lambda _: _shardings(model, mesh))
    return read_verified(ckpts, step, "params", shardings=shardings)


_merging: set[Path] = set()  # LoRA runs whose bases are being loaded (a cycle guard)


def _merge_lora_run(run_dir: Path, raw: dict, model: GPTConfig, step: int):
    """The effective params of a LoRA run's checkpoint: its base with the adapters merged."""
    base_source = task_section(raw).get("init_from")
    key = run_dir.resolve()
    try:
        if base_source in (None, "scratch"):
            raise CheckpointError("its random initial weights were never saved")
        if key in _merging:  # A's base is B whose base is A: no weights at the bottom
            raise CheckpointError("its chain of bases leads back to itself")
        _merging.add(key)
        try:
            # The base exactly as the run started from it (tasks/instruct/finetune.py:load_start).
            base_config, base = load_model(base_source, **start_overrides(base_source, model))
        finally:
            _merging.discard(key)
    except (ValueError, OSError) as err:
        raise CheckpointError(f"{run_dir} is a LoRA run whose base {base_source!r} could not be "
                              f"loaded: {err}") from None
    differ = [k for k, v in model.to_dict().items()
              if k not in RUNTIME_FIELDS and getattr(base_config, k) != v]
    if differ:
        raise CheckpointError(f"{run_dir} is a LoRA run whose base {base_source!r} is another model "
                              f"({', '.join(differ)} differ)")
    trainable = read_verified(run_dir / "checkpoints", step, "params")
    # An empty "full" (no leaf trained in full) may not survive the round trip through Orbax.
    trainable = {"lora": trainable.get("lora", {}), "full": trainable.get("full", {})}
    return lora.combine(trainable, base, lora.LoRAConfig.from_dict(raw["lora"]))


def _shardings(config: GPTConfig, mesh):
    return boxed_shardings(abstract_params(config), mesh)


def place(config: GPTConfig, params, mesh=None):
    """Params as they are (mesh None), or split over `mesh` by the logical axis rules; every
    process holds the whole host copy and contributes its own shards."""
    if mesh is None:
        return params

    def put(x, sharding):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, params, _shardings(config, mesh))
