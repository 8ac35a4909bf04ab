"""Text sources (files, an embedded default, Hugging Face datasets, the book's named data sets)
and a token cache keyed by the text's sha256.

Named data sets are looked up in `$JAXGPT_DATA_DIR`, then in the cache directory
(`$JAXGPT_CACHE_DIR`, else `$XDG_CACHE_HOME/jaxgpt`, else `~/.cache/jaxgpt`), and only then
downloaded. Every file found or fetched must match its registered sha256.
"""

from __future__ import annotations

import glob as globlib
import io
import os
import re
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from jaxgpt.data.tokenizer import EOT_TOKEN, get_tokenizer
from jaxgpt.fsutil import sha256_bytes, sha256_file, write_atomic

# Separate documents (files, documentation topics) are joined with GPT-2's end-of-text marker,
# which tokenize_cached encodes as the single token 50256.
DOC_SEPARATOR = EOT_TOKEN
DOWNLOAD_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class NamedDataset:
    """A downloadable file: where it comes from and the sha256 it must have."""

    filename: str
    url: str
    sha256: str
    zip_member: str | None = None  # the file inside a zip archive at `url`, if it is one


DATASETS: dict[str, NamedDataset] = {
    "the-verdict": NamedDataset(
        "the-verdict.txt",
        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt",
        "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
    ),
    "sms-spam": NamedDataset(
        "SMSSpamCollection",
        "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
        "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
        zip_member="SMSSpamCollection",
    ),
    "instruction-data": NamedDataset(
        "instruction-data.json",
        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json",
        "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
    ),
    # The same 1,100 instructions with a polite (chosen) and an impolite (rejected) response.
    "instruction-data-with-preference": NamedDataset(
        "instruction-data-with-preference.json",
        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json",
        "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
    ),
}


def default_cache_dir() -> Path:
    """Where jaxgpt keeps downloads and token caches."""
    if os.environ.get("JAXGPT_CACHE_DIR"):
        return Path(os.environ["JAXGPT_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "jaxgpt"


def _download(spec: NamedDataset) -> bytes:
    with urllib.request.urlopen(spec.url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        data = response.read()
    if spec.zip_member is not None:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            data = archive.read(spec.zip_member)
    return data


def dataset_path(name: str) -> Path:
    """Local path of the named data set, verified by sha256 (downloaded once if absent)."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}")
    spec = DATASETS[name]
    cached = default_cache_dir() / spec.filename
    candidates = [cached]
    if os.environ.get("JAXGPT_DATA_DIR"):
        candidates.insert(0, Path(os.environ["JAXGPT_DATA_DIR"]) / spec.filename)
    for path in candidates:
        if path.is_file():
            actual = sha256_file(path)
            if actual != spec.sha256:
                raise ValueError(f"sha256 mismatch for {path}: expected {spec.sha256}, got {actual}")
            return path
    try:
        data = _download(spec)
    except (OSError, zipfile.BadZipFile, KeyError) as err:  # URLError and timeouts are OSErrors
        raise RuntimeError(
            f"could not download {name} from {spec.url} ({err}); place {spec.filename} at {cached} "
            f"or set JAXGPT_DATA_DIR to a directory that holds it"
        ) from None
    actual = sha256_bytes(data)
    if actual != spec.sha256:
        raise ValueError(
            f"sha256 mismatch for {name} downloaded from {spec.url}: expected {spec.sha256}, got {actual}"
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(cached, data)
    return cached


def _default_text() -> str:
    # CPython's own English documentation (the pydoc topics), so "default" needs no network.
    from pydoc_data.topics import topics

    return DOC_SEPARATOR.join(topics[key] for key in sorted(topics))


def _read_file(path: str | os.PathLike) -> str:
    """A UTF-8 text file; any failure is one line naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise OSError(f"cannot read {path}: {e.strerror or e}") from None


def _read_files(paths: Sequence[str | os.PathLike], source: object) -> str:
    if not paths:
        raise ValueError(f"no text files found for {source!r}")
    return DOC_SEPARATOR.join(_read_file(p) for p in paths)


def load_hf_text(
    path: str,
    *,
    data_files=None,
    split: str = "train",
    text_column: str = "text",
    name: str | None = None,
    separator: str = "\n",
    cache_dir: str | None = None,
) -> str:
    """One column of a Hugging Face `datasets` split, rows joined by `separator`."""
    # Rows of the "text" builder are the lines of the files, hence the newline default.
    import datasets  # slow to import; only this source needs it

    ds = datasets.load_dataset(path, name, data_files=data_files, split=split, cache_dir=cache_dir)
    if text_column not in ds.column_names:
        available = ", ".join(ds.column_names)
        raise ValueError(f"column {text_column!r} not in dataset {path!r}; available: {available}")
    return separator.join(ds[text_column])


def load_text(source: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    """Text of a source: "default", "hf:<path>[:<config>]", a data set name, file, dir, glob or list."""
    # Files are joined with DOC_SEPARATOR; a directory contributes its *.txt files in sorted order.
    if isinstance(source, (list, tuple)):
        return _read_files(list(source), source)
    if isinstance(source, str):
        if source == "default":
            return _default_text()
        if source.startswith("hf:"):
            path, _, config = source[3:].partition(":")
            return load_hf_text(path, name=config or None)
        if source in DATASETS:
            return _read_file(dataset_path(source))
    path = Path(source)
    if path.is_file():
        return _read_file(path)
    if path.is_dir():  # a subdirectory named like a text file is not one
        return _read_files(sorted(p for p in path.glob("*.txt") if not p.is_dir()), source)
    if globlib.has_magic(str(source)):
        matches = globlib.glob(str(source), recursive=True)
        return _read_files(sorted(p for p in matches if os.path.isfile(p)), source)
    raise FileNotFoundError(
        f"no file, directory or glob match for {str(source)!r}; named sources: default, hf:<path>, "
        f"{', '.join(sorted(DATASETS))}"
    )


# --- Token cache ---

# GPT-2's pre-tokenizer always makes a newline just before a non-space character a piece of
# its own, and the whitespace run before that newline another; so a cut just before such a
# newline changes no piece, and chunks cut there encode exactly as the whole text does.
# (Visible ASCII stands for "non-space" because Python's \s and the Rust regex's differ.)
SAFE_SPLIT = re.compile(r"(?=\n[!-~])")
_CHUNK_CHARS = 1 << 20


def cut_pieces(text: str, size: int) -> Iterator[str]:
    """`text` in pieces of about `size` characters, cut only at SAFE_SPLIT points."""
    start = 0
    while len(text) - start > size:
        match = SAFE_SPLIT.search(text, start + size)
        if match is None:
            break
        yield text[start : match.start()]
        start = match.start()
    yield text[start:]


def _encode(text: str, tokenizer_name: str, chunk_chars: int = _CHUNK_CHARS) -> np.ndarray:
    """Same ids as `encode(text, allowed_special={EOT})`, encoded in parallel chunks."""
    enc = get_tokenizer(tokenizer_name)
    eot = enc.encode_single_token(EOT_TOKEN)
    # Special tokens are matched before pre-tokenizing, so the text between two of them encodes
    # on its own; each document is then cut at safe newlines for the thread pool.
    docs = text.split(EOT_TOKEN)
    chunks = [list(cut_pieces(doc, chunk_chars)) for doc in docs]
    flat = [chunk for doc in chunks for chunk in doc]
    encoded = iter(enc.encode_ordinary_batch(flat, num_threads=os.cpu_count() or 1))
    parts: list[list[int]] = []
    for i, doc in enumerate(chunks):
        if i:
            parts.append([eot])
        parts.extend(next(encoded) for _ in doc)
    dtype = np.uint16 if enc.n_vocab <= np.iinfo(np.uint16).max + 1 else np.int32
    return np.concatenate([np.asarray(part, dtype=dtype) for part in parts])


def tokenize_cached(
    text: str, tokenizer_name: str = "gpt2", cache_dir: str | os.PathLike | None = None
) -> np.ndarray:
    """Token ids of `text` (uint16 if the vocabulary fits), cached on disk by sha256 of the text."""
    get_tokenizer(tokenizer_name)  # an unknown name fails here, before touching the cache
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = sha256_bytes(text.encode("utf-8", "surrogatepass"))
    path = root / "tokens" / f"{tokenizer_name}-{key}.npy"
    if path.is_file():
        return np.load(path, allow_pickle=False)
    ids = _encode(text, tokenizer_name)
    buffer = io.BytesIO()
    np.save(buffer, ids, allow_pickle=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())
    return ids
