"""Hugging Face checkpoint files: finding them (a directory or a hub name through the local
cache), reading safetensors headers and tensors one at a time, and writing them (sharded with an
index past a size). Pickle-based files are refused unread. Every failure is one line naming the
file.

A tensor is read with a plain read at its offset, not a memory map, so the page cache does not
count as the process's memory and a loader holds one tensor at a time beside what it has built.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxgpt.fsutil import replace_atomically, write_text_atomic

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
FILE_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
SHARDS = "model-*-of-*.safetensors"


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


class Entry(NamedTuple):
    """Where one tensor is: its file, its key as stored, its shape and dtype, its byte range."""

    file: Path
    key: str
    shape: tuple
    dtype: str
    start: int  # absolute offset of the data in the file
    end: int


def _header(file: Path) -> tuple[int, dict]:
    with open(file, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return n, json.loads(f.read(n))


def tensor_index(files: list[Path]) -> dict[str, Entry]:
    """HF name (`transformer.` prefix stripped) -> where the tensor is, buffers left out."""
    found = {}
    for file in files:
        with open_file(file):  # safetensors checks the header and that the data covers it
            pass
        n, header = _header(file)
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            name = key.removeprefix("transformer.")
            if _BUFFER.fullmatch(name):
                continue
            if name in found:
                raise ValueError(f"tensor {name} appears twice (as {found[name].key} in "
                                 f"{found[name].file} and {key} in {file})")
            start, end = meta["data_offsets"]
            found[name] = Entry(file, key, tuple(meta["shape"]), meta["dtype"], 8 + n + start, 8 + n + end)
    return found


def open_file(file: Path):
    """safe_open, with a truncated or foreign file refused in one line that names it."""
    try:
        return safe_open(file, framework="numpy")
    except SafetensorError as err:  # safetensors checks the header and that the data covers it
        raise ValueError(f"{file} is not a readable safetensors file ({err})") from None


def read_tensor(entry: Entry) -> np.ndarray:
    """One float tensor read from its file into fresh memory (no memory map)."""
    if entry.dtype not in FILE_DTYPES:
        raise ValueError(f"{entry.file}: tensor {entry.key} has dtype {entry.dtype}; expected a float type")
    dtype = np.dtype(FILE_DTYPES[entry.dtype])
    with open(entry.file, "rb") as f:
        f.seek(entry.start)
        x = np.fromfile(f, dtype, (entry.end - entry.start) // dtype.itemsize)
    return x.reshape(entry.shape)


def write_safetensors(directory: Path, tensors: dict[str, np.ndarray], max_shard_size: int) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors shards and their index when the
    tensors pass `max_shard_size` bytes. Each file is replaced atomically and the files of an
    earlier save are removed only after, so a failed save leaves the old weights readable."""
    shards, size = [{}], 0
    for name, x in tensors.items():
        if shards[-1] and size + x.nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        written = [WEIGHTS]
        replace_atomically(directory / WEIGHTS, lambda tmp: save_file(shards[0], tmp, metadata=meta))
    else:
        weight_map = {}
        written = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for fname, shard in zip(written, shards):
            replace_atomically(directory / fname, lambda tmp, s=shard: save_file(s, tmp, metadata=meta))
            weight_map.update(dict.fromkeys(shard, fname))
        index = {"metadata": {"total_size": sum(x.nbytes for x in tensors.values())},
                 "weight_map": weight_map}
        write_text_atomic(directory / INDEX, json.dumps(index, indent=2) + "\n")
        written.append(INDEX)
    # the index first: while it stands, readers take the shards it names, old or new
    for stale in [directory / INDEX, *sorted(directory.glob(SHARDS)), directory / WEIGHTS]:
        if stale.name not in written:
            stale.unlink(missing_ok=True)
