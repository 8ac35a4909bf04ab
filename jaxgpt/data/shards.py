"""Token shards on disk: the format, the manifest, and windows read from the shard files.

A prepared corpus is a directory of flat little-endian uint16 token files plus `manifest.json`
(written by jaxgpt.data.prepare, read here). The corpus is one token stream: the documents in source
order, separated by `<|endoftext|>` (id 50256), cut into shards. Shard 0 is the held-out
validation split: it ends at the first document end at or after `val_tokens`, so no document
is split between validation and training. The training shards that follow hold exactly
`shard_tokens` tokens each (the last one fewer), cut wherever that count falls.

Windows cross shard boundaries: a split (its shards concatenated) is read as one stream, so
`ShardDataset(dir, "train", L, s)` has exactly the windows of `sliding_windows(stream, L, s)`
and no token is lost at a cut. A window is one or two small reads of one or two files, so
reading one costs the same whatever the corpus size, and memory holds only the batch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from jaxgpt.checks import check_positive_int
from jaxgpt.data.windows import Windows
from jaxgpt.fsutil import sha256_file, write_atomic

MANIFEST = "manifest.json"
FORMAT = "jaxgpt-token-shards"
VERSION = 1
DTYPE = np.dtype("<u2")  # GPT-2's 50257 ids fit in 16 bits
SPLITS = ("train", "val")


def shard_name(index: int) -> str:
    """File name of shard `index` (0 is the validation shard)."""
    return f"{'val' if index == 0 else 'train'}_{index:06d}.bin"


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a shard directory; one-line errors for a missing or foreign file."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no {MANIFEST}; prepare it with train/prepare_data.py")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path} has format version {manifest.get('version')!r}; this jaxgpt reads {VERSION}")
    return manifest


def write_manifest(directory: Path, manifest: dict) -> None:
    write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1).encode("utf-8"))


def split_shards(manifest: dict, split: str) -> list[dict]:
    """The manifest's entries for `split` ("train" or "val"), in stream order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [s for s in manifest["shards"] if s["split"] == split]


def verify_shards(directory: str | os.PathLike, manifest: dict | None = None) -> None:
    """Check every shard's size and sha256 against the manifest (reads every byte)."""
    directory = Path(directory)
    manifest = read_manifest(directory) if manifest is None else manifest
    for entry in manifest["shards"]:
        path = directory / entry["file"]
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise ValueError(f"{path}: sha256 {digest} does not match the manifest's {entry['sha256']}")


class TokenStream:
    """The concatenated shards of one split as a read-only sequence of token ids.

    Reads go through the OS page cache with `os.pread`, or through `np.memmap` views with
    `memory_map=True`. Both read only the bytes asked for; the difference is what stays in the
    process: a memory map keeps every page it touched (plus the kernel's fault-around, 64 KB a
    fault) mapped, so a long run's RSS climbs towards the size of the corpus (clean file pages
    the kernel can drop, but counted, nanoGPT's memmap "leak"); pread maps nothing and RSS
    stays flat whatever the corpus size (benchmarks/data_pipeline.py measures both)."""

    def __init__(self, directory: str | os.PathLike, split: str = "train", *, memory_map: bool = False):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if not self.manifest.get("complete"):
            raise ValueError(f"{self.directory} is still being prepared (or was interrupted); "
                             "rerun train/prepare_data.py with the same arguments to finish it")
        entries = [e for e in split_shards(self.manifest, split) if e["tokens"]]
        paths = []
        for entry in entries:
            path = self.directory / entry["file"]
            size = path.stat().st_size if path.is_file() else None
            if size != entry["tokens"] * DTYPE.itemsize:
                raise ValueError(f"{path}: expected {entry['tokens'] * DTYPE.itemsize} bytes "
                                 f"(manifest), found {'no file' if size is None else size}")
            paths.append(path)
        self.maps = [np.memmap(p, dtype=DTYPE, mode="r") for p in paths] if memory_map else None
        self.fds = None if memory_map else [os.open(p, os.O_RDONLY) for p in paths]
        # starts[i]: position in the stream of shard i's first token; starts[-1]: the length.
        self.starts = np.cumsum([0] + [e["tokens"] for e in entries])
        self.max_id = max((e["max_id"] for e in entries), default=-1)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __del__(self):
        for fd in getattr(self, "fds", None) or ():
            os.close(fd)

    def _shard_slice(self, shard: int, offset: int, n: int) -> np.ndarray:
        if self.maps is not None:
            return self.maps[shard][offset : offset + n]
        data = os.pread(self.fds[shard], n * DTYPE.itemsize, offset * DTYPE.itemsize)
        return np.frombuffer(data, DTYPE)

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) as int32, across shard boundaries."""
        if start < 0 or start + n > len(self):
            raise IndexError(f"tokens [{start}, {start + n}) outside a stream of {len(self)}")
        out = np.empty(n, np.int32)
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < n:
            offset = start + done - int(self.starts[shard])
            take = min(n - done, int(self.starts[shard + 1] - self.starts[shard]) - offset)
            out[done : done + take] = self._shard_slice(shard, offset, take)
            done += take
            shard += 1
        return out


class ShardDataset(Windows):
    """Next-token windows of one split of a shard directory, read on demand.

    Window i is tokens [i * stride, i * stride + max_length] of the split's stream (inputs the
    first max_length, targets the last), exactly as `sliding_windows` makes them in memory."""

    def __init__(self, directory: str | os.PathLike, split: str, max_length: int, stride: int | None = None,
                 *, memory_map: bool = False):
        check_positive_int("max_length", max_length)
        stride = max_length if stride is None else stride
        check_positive_int("stride", stride)
        self.stream = TokenStream(directory, split, memory_map=memory_map)
        self.max_length, self.stride = max_length, stride
        n = len(self.stream)
        if n < max_length + 1:
            raise ValueError(f"the {split} split of {directory} has {n} tokens, fewer than "
                             f"max_length + 1 = {max_length + 1}")
        self._len = (n - max_length - 1) // stride + 1

    @property
    def manifest(self) -> dict:
        return self.stream.manifest

    def __len__(self) -> int:
        return self._len

    def rows(self, indices) -> dict[str, np.ndarray]:
        """The windows at `indices` as the trainer's batch dict ([n, T] int32 each)."""
        indices = np.asarray(indices)
        if indices.size and (indices.min() < 0 or indices.max() >= self._len):
            raise IndexError(f"window index outside [0, {self._len})")
        span = self.max_length + 1
        buf = np.empty((indices.size, span), np.int32)  # [n, T+1]
        for row, i in enumerate(indices.reshape(-1)):
            buf[row] = self.stream.read(int(i) * self.stride, span)
        shape = indices.shape + (self.max_length,)
        return {"inputs": np.ascontiguousarray(buf[:, :-1]).reshape(shape),
                "targets": np.ascontiguousarray(buf[:, 1:]).reshape(shape)}
