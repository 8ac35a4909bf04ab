"""Hugging Face model directories of every family: config.json and safetensors <-> (GPTConfig,
params), through the family's name table (jaxgpt.weights.gpt2, jaxgpt.weights.llama).

`FAMILIES` is the one dispatch: a config.json model_type, or a GPTConfig.family (the same
names), picks the module that holds the family's config conversion and name table. Every module
there offers the same functions (config_from_hf, hf_config, hf_shapes, top_leaves,
block_leaves, tensors_to_hf) and names (MODEL_TYPES, BLOCK, HF_BLOCK, EMBEDDING, HEAD).

Loading streams, for every family: the key set and every shape are checked from the file
headers first; then each jaxgpt leaf is read from disk (a plain read, not a memory map),
converted, and put at once in its final place (its shard of the mesh, when one is given) before
the next is read, so the host holds one leaf at a time beside the tensor it comes from. A float32
or bfloat16 checkpoint loads as float32, or as `param_dtype` (e.g. "bfloat16"). A head that
config.json calls tied but that differs from the embedding was trained untied and stays so.
Saving writes float32 tensors, split into model-0000i-of-0000n.safetensors shards with an index
when they pass `max_shard_size` bytes. Pickle checkpoints are refused: unpickling can run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.fsutil import write_text_atomic
from jaxgpt.models.model import abstract_params
from jaxgpt.sharding import boxed_shardings
from jaxgpt.trees import check_like, flatten, unflatten
from jaxgpt.weights import gpt2, llama
from jaxgpt.weights.hf_files import read_json, read_tensor, resolve, tensor_index, weight_files, write_safetensors

# config.json model_type, and GPTConfig.family -> the module with that family's name table.
FAMILIES = {t: module for module in (gpt2, llama) for t in module.MODEL_TYPES}


def family_of(hf, source: str | os.PathLike = "config.json"):
    """The name table module for a config.json dict (GPT-2's files may lack model_type)."""
    if not isinstance(hf, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
        raise ValueError(f"{source} holds {kind.get(type(hf), 'a number')}, not a JSON object of settings")
    model_type = hf.get("model_type", "gpt2")
    if model_type not in FAMILIES:
        raise ValueError(f"{source} has model_type={model_type!r}; jaxgpt loads {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def is_family_dir(path: Path) -> bool:
    """Whether `path` is a Hugging Face Llama/Qwen3 directory (by its config.json's model_type)."""
    config = path / "config.json"
    if not config.is_file():
        return False
    hf = read_json(config)
    return isinstance(hf, dict) and FAMILIES.get(hf.get("model_type", "gpt2"), gpt2) is not gpt2


def load_pretrained(name_or_path: str | os.PathLike, **config_overrides) -> tuple[GPTConfig, dict]:
    """(config, float32 params) from a GPT-2 name (gpt2, gpt2-medium/-large/-xl) or a local dir
    (GPT-2, or Llama 3 / Qwen3 by its config.json's model_type)."""
    return load_hf(resolve(name_or_path), **config_overrides)


def load_hf(directory: str | os.PathLike, *, mesh=None, param_dtype=None,
            **overrides) -> tuple[GPTConfig, dict]:
    """(config, params) of a Hugging Face directory of any family; each leaf goes straight to
    its shards of `mesh` (or the default device) as it is read."""
    directory = Path(directory)
    source = directory / "config.json"
    if not source.is_file():
        raise FileNotFoundError(f"{directory} has no config.json")
    hf = read_json(source)
    family = family_of(hf, source)
    tied = family.config_from_hf(hf, source).tie_embeddings  # the file's own problems first
    headers = tensor_index(weight_files(directory))
    if tied and {family.HEAD, family.EMBEDDING} <= set(headers) and not np.array_equal(
            read_tensor(headers[family.HEAD]), read_tensor(headers[family.EMBEDDING])):
        hf = {**hf, "tie_word_embeddings": False}  # a head that differs was trained untied: keep it
    file_config = family.config_from_hf(hf, source)  # what the tensors hold
    config = family.config_from_hf(hf, source, **overrides)  # what the caller asked for
    if file_config.tie_embeddings:
        headers.pop(family.HEAD, None)  # a tied model's head is its embedding
    elif config.tie_embeddings:
        raise ValueError("cannot override tie_embeddings=True: the checkpoint has its own lm_head.weight")
    expected = family.hf_shapes(file_config)
    missing, extra = sorted(set(expected) - set(headers)), sorted(set(headers) - set(expected))
    if missing or extra:
        raise ValueError(f"{directory} does not hold a {config.family} model with {config.n_layers} "
                         f"layers: missing {missing or 'none'}; unexpected {extra or 'none'}")
    for name, shape in expected.items():
        if headers[name].shape != shape:
            raise ValueError(f"tensor {name} has shape {headers[name].shape} in "
                             f"{Path(headers[name].file).name}, but {source} describes {shape}: "
                             "config.json and the weights disagree")
    sources = leaf_sources(family, config, untie=file_config.tie_embeddings)
    return config, _stream(sources, headers, config, mesh, jnp.dtype(param_dtype or jnp.float32))


def leaf_sources(family, config: GPTConfig, untie: bool = False) -> dict[tuple, tuple[list[str], object]]:
    """jaxgpt leaf path -> (the HF tensors it is made of, in layer order; HF -> jaxgpt). `untie`:
    the file ties the head, `config` does not, so the head starts as the embedding."""
    out = {path: ([name], to_jx) for path, (name, to_jx) in family.top_leaves(config).items()}
    if untie and ("lm_head",) in out:
        out[("lm_head",)] = ([family.EMBEDDING], out[("lm_head",)][1])
    for path, (suffix, to_jx) in family.block_leaves(config).items():
        names = [family.HF_BLOCK.format(i) + suffix for i in range(config.n_layers)]
        if config.scan_layers:  # one leaf [L, ...] of every layer's tensor
            out[(family.BLOCK, *path)] = (names, to_jx)
        else:
            out.update({(f"{family.BLOCK}_{i}", *path): ([n], to_jx) for i, n in enumerate(names)})
    return out


def _stream(sources: dict, headers: dict, config: GPTConfig, mesh, dtype) -> dict:
    """Every leaf read, converted and placed in turn: its shards of `mesh`, or the default device."""
    expected = flatten(abstract_params(config, boxed=False), sep=None)
    shardings = None if mesh is None else flatten(boxed_shardings(abstract_params(config), mesh), sep=None)
    flat = {}
    for path, (names, to_jx) in sources.items():
        x = _read_leaf(headers, names, to_jx, config, dtype)
        x = _pad_to(x, expected[path].shape, path)
        flat[path] = jax.device_put(x, shardings[path]) if shardings else jnp.asarray(x)
        del x
    check_like(flat, expected)
    return unflatten(flat)


def _read_leaf(headers: dict, names: list[str], to_jx, config: GPTConfig, dtype) -> np.ndarray:
    """One leaf in `dtype`: the converted tensor, or the layers' tensors stacked [L, ...]."""
    out = None
    for i, name in enumerate(names):
        part = np.asarray(to_jx(read_tensor(headers[name]), config), dtype)  # one converted copy
        if not np.isfinite(part).all():
            raise ValueError(f"{headers[name].file}: tensor {name} holds NaN or infinite values")
        if len(names) == 1:
            return part
        if out is None:
            out = np.empty((len(names), *part.shape), dtype)
        out[i] = part
        del part
    return out


def _pad_to(x: np.ndarray, shape: tuple, path: tuple) -> np.ndarray:
    """A padded vocabulary's extra rows of wte [V, D] / columns of lm_head [D, V], as zeros."""
    if x.shape == tuple(shape):
        return x
    if x.ndim != len(shape) or any(have > want for have, want in zip(x.shape, shape)):
        raise ValueError(f"param {'/'.join(path)} converts to shape {x.shape}, expected {tuple(shape)}")
    return np.pad(x, [(0, want - have) for have, want in zip(x.shape, shape)])


def to_hf_tensors(config: GPTConfig, params) -> dict[str, np.ndarray]:
    """jaxgpt params (plain or scanned) -> the HF model's named float32 tensors, shapes checked."""
    family = FAMILIES[config.family]
    flat = flatten(params, sep=None)
    check_like(flat, flatten(abstract_params(config, boxed=False), sep=None))
    flat = {p: np.asarray(x, np.float32) for p, x in flat.items()}
    if config.scan_layers:  # unstack BLOCK/... [L, ...] into BLOCK_<i>/...
        for path in [p for p in flat if p[0] == family.BLOCK]:
            stacked = flat.pop(path)
            flat.update({(f"{family.BLOCK}_{i}", *path[1:]): stacked[i] for i in range(config.n_layers)})
    return {k: np.ascontiguousarray(v) for k, v in family.tensors_to_hf(config, flat).items()}


def save_pretrained(config: GPTConfig, params, directory: str | os.PathLike, *,
                    max_shard_size: int = 5 << 30, **config_extra) -> Path:
    """Write config.json and safetensors (sharded with an index past max_shard_size bytes) that
    transformers' GPT2LMHeadModel / LlamaForCausalLM / Qwen3ForCausalLM.from_pretrained load;
    `config_extra` joins config.json (e.g. bos_token_id)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory, to_hf_tensors(config, params), max_shard_size)
    text = json.dumps(FAMILIES[config.family].hf_config(config, **config_extra), indent=2) + "\n"
    write_text_atomic(directory / "config.json", text)
    return directory
