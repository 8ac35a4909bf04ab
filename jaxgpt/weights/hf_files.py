"""Hugging Face checkpoint files: finding them (a directory or a hub name through the local
cache), reading safetensors headers and tensors one at a time, and replacing files atomically.
Pickle-based files are refused unread. Every failure is one line naming the file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
# GPT2LMHeadModel's attention-mask buffers: saved by old versions, not weights.
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")

HUB_MODELS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
_HUB_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def resolve(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise ValueError(f"{path} is a pickle checkpoint; jaxgpt loads only safetensors (pickle can "
                         "run code): convert it to model.safetensors")
    if path.is_dir():
        return path
    if str(name_or_path) in HUB_MODELS:
        from huggingface_hub import snapshot_download  # the network is needed only here

        repo = HUB_MODELS[str(name_or_path)]
        try:
            return Path(snapshot_download(repo, allow_patterns=_HUB_FILES))
        except Exception as err:  # offline with an empty cache, or the Hub is unreachable
            raise OSError(f"could not download or find a cached copy of {repo}: {err}") from err
    raise FileNotFoundError(f"{str(name_or_path)!r} is neither a directory nor one of {sorted(HUB_MODELS)}")


def read_json(path: Path):
    """A JSON file's value; a file that is not JSON is one line naming it."""
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX
    if index.is_file():
        weight_map = read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index} has no weight_map object of tensor name -> shard file name")
        names = sorted(set(weight_map.values()))
        outside = [n for n in names if Path(n).name != n or n in ("", ".", "..")]
        if outside:  # a shard is a file beside the index, never a path elsewhere
            raise ValueError(f"{index} names shard(s) outside its directory: {', '.join(outside)}")
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) missing from {directory}: {', '.join(missing)}")
        return [directory / n for n in names]
    if (directory / WEIGHTS).is_file():
        return [directory / WEIGHTS]
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{directory} holds only pickle checkpoint(s) ({', '.join(pickles)}); jaxgpt "
                         f"loads only {WEIGHTS} (pickle can run code): re-save with safetensors")
    raise FileNotFoundError(f"{directory} has no {WEIGHTS} or {INDEX}")


def tensor_index(files: list[Path]) -> dict[str, tuple[Path, str, tuple]]:
    """HF name (prefix stripped) -> (file, key as stored, shape), buffers left out."""
    found = {}
    for file in files:
        with open_file(file) as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                name = key.removeprefix("transformer.")
                if _BUFFER.fullmatch(name):
                    continue
                if name in found:
                    raise ValueError(f"tensor {name} appears twice (as {found[name][1]} in "
                                     f"{found[name][0]} and {key} in {file})")
                found[name] = (file, key, tuple(f.get_slice(key).get_shape()))
    return found


def open_file(file: Path):
    """safe_open, with a truncated or foreign file refused in one line that names it."""
    try:
        return safe_open(file, framework="numpy")
    except SafetensorError as err:  # safetensors checks the header and that the data covers it
        raise ValueError(f"{file} is not a readable safetensors file ({err})") from None


def read_tensor(f, file: Path, key: str) -> np.ndarray:
    try:
        return f.get_tensor(key)
    except (SafetensorError, TypeError) as err:  # TypeError: a dtype numpy lacks, e.g. bfloat16
        raise ValueError(f"{file}: cannot read tensor {key} ({err})") from None


def read_entry(entry) -> np.ndarray:
    file, key, _ = entry
    with open_file(file) as f:
        return read_tensor(f, file, key)


def replace_atomically(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except BaseException:
        os.unlink(tmp)
        raise
