"""Files written whole or not at all, and their sha256: one implementation for every writer.

An atomic write goes to a temporary file beside its target (same filesystem, so the rename is
atomic), is flushed to disk, renamed over the target, and the directory is synced: a reader, or
a crash, sees the old file or the whole new one, never half of one. The temporary file is
created with the process's umask like any other file (not mkstemp's owner-only 0600).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Callable


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_beside(path: Path) -> Path:
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:  # another writer drew the same name: draw again
            continue


def replace_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp)` to fill a temporary file beside `path`, then put it in `path`'s place
    (the temporary file is removed if `write` fails)."""
    path = Path(path)
    tmp = _temporary_beside(path)
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write `data` to `path` atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    replace_atomically(path, write)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    write_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, value, indent: int | None = 2) -> None:
    """Write `value` as JSON (non-ASCII kept as is, a final newline) to `path` atomically."""
    write_text_atomic(path, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, block: int = 1 << 24) -> str:
    """sha256 of a file's bytes, read `block` bytes at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()
