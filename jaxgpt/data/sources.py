"""Documents of a corpus as a stream of bounded text pieces, never the whole source at once.

A source is a text file, a directory (its *.txt, *.jsonl and *.parquet files, sorted), a glob,
a list of these, or "hf:<path>[:<config>]" (a Hugging Face dataset read in streaming mode).
A text file is one document; each row of a JSONL or Parquet file, or of a dataset, is one.

`pieces(spec)` yields `(starts_document, piece)`: a long document comes in pieces cut just
before a newline that precedes a visible character, where GPT-2's pre-tokenizer always cuts
too, so the pieces encode to exactly the ids of the whole document (see jaxgpt.data.corpus). The
sequence of pieces is a pure function of the source, which is what makes resuming exact. A
piece of a table row is its text; a piece of a text file is a byte range (path, start, end),
found by reading only the bytes around each cut, which `decode_piece` reads and decodes where
the tokenizing happens (in the pool's processes), so the text never passes through a pipe.
"""

from __future__ import annotations

import glob as globlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from jaxgpt.data.corpus import cut_pieces
from jaxgpt.fsutil import sha256_bytes

PIECE_CHARS = 1 << 20  # a piece is cut at the first safe point after this many characters (bytes)
_CUT_BLOCK = 1 << 16  # bytes read at a time while looking for a cut
_TABLE_SUFFIXES = (".jsonl", ".parquet")
_DIR_SUFFIXES = (".txt",) + _TABLE_SUFFIXES


@dataclass(frozen=True)
class SourceSpec:
    """What to read: `source` as above, the text column of tables, the split of a dataset."""

    source: str | tuple[str, ...]
    text_column: str = "text"
    split: str = "train"
    data_files: tuple[str, ...] | None = None  # for hf: sources (e.g. hf:json with local files)
    options: dict = field(default_factory=dict, compare=False)

    def describe(self) -> dict:
        return {"source": list(self.source) if isinstance(self.source, tuple) else self.source,
                "text_column": self.text_column, "split": self.split,
                "data_files": list(self.data_files) if self.data_files else None}


def files_of(source: str | os.PathLike | tuple) -> list[Path]:
    """The local files of a source, in reading order; one-line errors for nothing found."""
    if isinstance(source, (list, tuple)):
        return [f for item in source for f in files_of(item)]
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _DIR_SUFFIXES)
        if not found:
            raise ValueError(f"directory {path} holds no {', '.join(_DIR_SUFFIXES)} files")
        return found
    if globlib.has_magic(str(source)):
        found = sorted(Path(p) for p in globlib.glob(str(source), recursive=True) if os.path.isfile(p))
        if not found:
            raise ValueError(f"no files match {str(source)!r}")
        return found
    raise FileNotFoundError(f"no file, directory or glob match for {str(source)!r}")


def fingerprint(spec: SourceSpec) -> str:
    """sha256 of what identifies the source's content cheaply: each local file's path, size and
    modification time (a dataset: its name, config, split and local data files)."""
    if isinstance(spec.source, str) and spec.source.startswith("hf:"):
        files = [Path(p) for p in spec.data_files or () if Path(p).is_file()]  # not patterns, URLs
    else:
        files = files_of(spec.source)
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    blob = json.dumps({"spec": spec.describe(), "files": stats}, sort_keys=True)
    return sha256_bytes(blob.encode())


# The same safe cut on the file's bytes (the ASCII bytes of UTF-8 are the characters), never
# between "\r" and "\n": `decode_piece` then turns "\r\n" and "\r" into "\n" in each piece as
# universal-newline reading (corpus.load_text) does in the whole file.
_SAFE_SPLIT_BYTES = re.compile(rb"(?<!\r)(?=\n[!-~])")


def _next_cut(f, target: int) -> int | None:
    """The first safe cut at or after byte `target` of file `f`, or None before its end."""
    lo, block = target, _CUT_BLOCK
    while True:
        f.seek(lo - 1)  # one byte before, for the "\r" lookbehind
        chunk = f.read(block + 2)  # positions lo - 1 .. lo + block: cuts at lo .. lo + block - 1
        match = _SAFE_SPLIT_BYTES.search(chunk, 1)
        if match is not None and match.start() <= block:
            return lo - 1 + match.start()
        if len(chunk) < block + 2:
            return None
        lo += block


def _text_file_pieces(path: Path) -> Iterator[tuple[str, int, int]]:
    # Byte ranges, not text: the tokenizer processes read and decode them (see decode_piece), so
    # this process reads only the few bytes around each cut.
    size = path.stat().st_size
    start = 0
    with open(path, "rb") as f:
        while size - start > PIECE_CHARS:
            cut = _next_cut(f, start + PIECE_CHARS)
            if cut is None:
                break
            yield str(path), start, cut
            start = cut
    yield str(path), start, size


def decode_piece(piece: str | tuple[str, int, int]) -> str:
    """The text of a piece: a str as it is; a text file's (path, start, end) byte range read and
    decoded as UTF-8 with universal newlines."""
    if isinstance(piece, str):
        return piece
    path, start, end = piece
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {start + e.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _column(row: dict, column: str, where: str) -> str:
    if column not in row:
        raise ValueError(f"{where} has no column {column!r}; it has {', '.join(map(str, row))}")
    value = row[column]
    if not isinstance(value, str):
        raise ValueError(f"{where}: column {column!r} holds {type(value).__name__}, not text")
    return value


def _jsonl_rows(path: Path, column: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n} is not JSON ({e.msg})") from None
                yield _column(row, column, f"{path} line {n}")


def _parquet_rows(path: Path, column: str) -> Iterator[str]:
    import pyarrow.parquet as pq  # installed with `datasets`

    table = pq.ParquetFile(path)
    if column not in table.schema_arrow.names:
        raise ValueError(f"{path} has no column {column!r}; it has {', '.join(table.schema_arrow.names)}")
    for batch in table.iter_batches(batch_size=1024, columns=[column]):
        yield from batch.column(0).to_pylist()


def _hf_rows(spec: SourceSpec) -> Iterator[str]:
    import datasets  # slow to import; only this source needs it

    path, _, config = spec.source[3:].partition(":")
    ds = datasets.load_dataset(path, config or None, split=spec.split, streaming=True,
                               data_files=list(spec.data_files) if spec.data_files else None)
    for i, row in enumerate(ds):
        yield _column(row, spec.text_column, f"dataset {path!r} row {i}")


def documents(spec: SourceSpec) -> Iterator[Iterator]:
    """Each document of the source as an iterator over its pieces."""
    if isinstance(spec.source, str) and spec.source.startswith("hf:"):
        for text in _hf_rows(spec):
            yield cut_pieces(text, PIECE_CHARS)
        return
    for path in files_of(spec.source):
        if path.suffix in _TABLE_SUFFIXES:
            rows = _jsonl_rows if path.suffix == ".jsonl" else _parquet_rows
            for text in rows(path, spec.text_column):
                yield cut_pieces(text, PIECE_CHARS)
        else:
            yield _text_file_pieces(path)


def pieces(spec: SourceSpec) -> Iterator[tuple[bool, str | tuple[str, int, int]]]:
    """(starts_document, piece) for every piece of every document, in order; `decode_piece`
    gives a piece's text."""
    for doc in documents(spec):
        first = True
        for piece in doc:
            yield first, piece
            first = False
