"""Stream a source through the GPT-2 tokenizer on all cores into token shards (jaxgpt.data.shards).

Pieces of text (jaxgpt.data.sources) go to a process pool in tasks of about a megabyte; results come
back in submission order, with at most a few tasks in flight, so memory is bounded by the shard
being filled plus those tasks, whatever the corpus size, and the output is the same for any
number of workers.

Resuming: after each shard the manifest records where the source stands at the shard's end:
`pieces`, the number of pieces whose tokens are all written, and `carry`, how many tokens of the
next piece are. An interrupted run (killed at any point) restarts from the last finished
shard: it re-reads the source, skips `pieces` pieces without tokenizing them, drops the first
`carry` tokens of the next, and goes on; so no document is lost or repeated and the shards are
byte-identical to those of an uninterrupted run.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from jaxgpt.data.shards import (
    DTYPE,
    FORMAT,
    MANIFEST,
    VERSION,
    read_manifest,
    shard_name,
    write_manifest,
)
from jaxgpt.data.sources import SourceSpec, decode_piece, fingerprint, pieces
from jaxgpt.data.tokenizer import EOT_ID, get_tokenizer
from jaxgpt.fsutil import sha256_bytes, write_atomic

TASK_CHARS = 1 << 20  # text per pool task


@dataclass(frozen=True)
class PrepareOptions:
    shard_tokens: int = 100_000_000  # llm.c's shard size: 200 MB of uint16
    val_tokens: int = 10_000_000  # the validation shard ends at the first document end after this
    tokenizer: str = "gpt2"
    workers: int | None = None  # None: all the cores this process may use; 0: in this process
    in_flight: int | None = None  # tasks queued at once; None: 2 per worker

    def __post_init__(self):
        for name in ("shard_tokens", "val_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")


# --- Tokenizing (in the workers) ---

_ENC = None


def _init_worker(name: str) -> None:
    global _ENC
    _ENC = get_tokenizer(name)


def _encode_task(task: list[tuple[bool, object]]) -> list[np.ndarray]:
    """Ids of each piece, with end-of-text before each document after the first."""
    out = []
    for sep, piece in task:
        ids = _ENC.encode_ordinary(decode_piece(piece))
        if sep:
            ids.insert(0, EOT_ID)
        out.append(np.asarray(ids, DTYPE))
    return out


def _tasks(stream: Iterator[tuple[bool, object]]) -> Iterator[list[tuple[bool, object]]]:
    task, size = [], 0
    for piece in stream:
        task.append(piece)
        size += len(piece[1]) if isinstance(piece[1], str) else piece[1][2] - piece[1][1]
        if size >= TASK_CHARS:
            yield task
            task, size = [], 0
    if task:
        yield task


def _encoded(stream, opts: PrepareOptions) -> Iterator[np.ndarray]:
    """Token ids per piece, in order, tokenized by a pool with a bounded queue."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = cores if opts.workers is None else opts.workers
    if workers == 0:
        _init_worker(opts.tokenizer)
        for task in _tasks(stream):
            yield from _encode_task(task)
        return
    limit = opts.in_flight or 2 * workers
    # fork is quick and needs no importable __main__ (a notebook, a REPL), but it copies a
    # process with threads (JAX's) half-alive; spawn then.
    threads = threading.active_count() > 1 or "jax" in sys.modules
    ctx = multiprocessing.get_context("spawn" if threads or sys.platform != "linux" else "fork")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(opts.tokenizer,)) as pool:
        pending = collections.deque()
        for task in _tasks(stream):
            pending.append(pool.apply_async(_encode_task, (task,)))
            if len(pending) >= limit:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


# --- Writing shards ---


class _ShardWriter:
    """Fills a buffer with ids, cuts shards from it, writes each with its manifest entry."""

    def __init__(self, out: Path, manifest: dict, opts: PrepareOptions, log):
        self.out, self.manifest, self.opts, self.log = out, manifest, opts, log
        done = manifest["shards"]
        self.pieces = done[-1]["pieces"] if done else 0  # pieces whose ids are all in shards
        self.carry = done[-1]["carry"] if done else 0  # ids of the next piece already in shards
        self.documents = done[-1]["documents"] if done else 0  # documents with ids in shards
        self.buf = np.empty(max(opts.shard_tokens, opts.val_tokens) + 1, DTYPE)
        self.fill = 0
        self.searched = 0  # validation: the buffer has no separator before this position
        self.lengths = collections.deque()  # [ids still buffered, starts a document] per piece

    def add(self, ids: np.ndarray, starts_document: bool) -> None:
        self.lengths.append([len(ids), starts_document])
        done = 0
        while done < len(ids):  # piece by piece into the fixed buffer, cutting shards as it fills
            if self.fill == len(self.buf):  # only a validation shard waiting for a document end
                grown = np.empty(2 * len(self.buf), DTYPE)
                grown[: self.fill] = self.buf
                self.buf = grown
            take = min(len(ids) - done, len(self.buf) - self.fill)
            self.buf[self.fill : self.fill + take] = ids[done : done + take]
            self.fill, done = self.fill + take, done + take
            while (cut := self._cut()) is not None:
                self.write(cut)
        if not len(ids):
            while (cut := self._cut()) is not None:
                self.write(cut)

    def _cut(self) -> int | None:
        """Tokens of the buffer that make the next shard, or None if it is not full yet."""
        if self.manifest["shards"]:
            return self.opts.shard_tokens if self.fill >= self.opts.shard_tokens else None
        # Validation ends just before the first separator at or after val_tokens.
        start = max(self.opts.val_tokens, self.searched)
        hits = np.flatnonzero(self.buf[start : self.fill] == EOT_ID)
        self.searched = max(start, self.fill)
        return start + int(hits[0]) if hits.size else None

    def _account(self, n: int) -> None:
        """Advance (pieces, carry, documents) past the next `n` buffered ids."""
        while n or (self.lengths and self.lengths[0][0] == 0):
            entry = self.lengths[0]
            take = min(n, entry[0])
            if entry[1]:  # the piece starts a document, which now has ids in a shard
                self.documents += 1
                entry[1] = False
            entry[0] -= take
            n -= take
            self.carry += take
            if entry[0] == 0:
                self.lengths.popleft()
                self.pieces, self.carry = self.pieces + 1, 0

    def write(self, n: int) -> None:
        """Write the first `n` buffered ids as the next shard and record it."""
        data = self.buf[:n]
        raw = memoryview(data).cast("B")
        index = len(self.manifest["shards"])
        name = shard_name(index)
        write_atomic(self.out / name, raw)
        entry = {"file": name, "split": "val" if index == 0 else "train", "tokens": int(n),
                 "sha256": sha256_bytes(raw), "max_id": int(data.max()) if n else -1}
        self._account(n)
        self.buf[: self.fill - n] = self.buf[n : self.fill]  # the rest moves to the front
        self.fill -= n
        self.searched = 0
        entry.update(pieces=self.pieces, carry=self.carry, documents=self.documents)
        self.manifest["shards"].append(entry)
        write_manifest(self.out, self.manifest)
        self.log(f"wrote {name}: {n:,} tokens ({self.documents:,} documents so far)")


def _new_manifest(spec: SourceSpec, opts: PrepareOptions) -> dict:
    enc = get_tokenizer(opts.tokenizer)
    return {"format": FORMAT, "version": VERSION, "complete": False,
            "source": spec.describe(), "fingerprint": fingerprint(spec),
            "tokenizer": {"name": opts.tokenizer, "n_vocab": enc.n_vocab, "eot_id": EOT_ID},
            "dtype": DTYPE.str, "shard_tokens": opts.shard_tokens, "val_tokens": opts.val_tokens,
            "shards": []}


def _resumable(old: dict, new: dict, out: Path) -> None:
    for key in ("source", "fingerprint", "tokenizer", "dtype", "shard_tokens", "val_tokens"):
        if old.get(key) != new[key]:
            raise ValueError(f"{out} was prepared with a different {key} ({old.get(key)!r}, now "
                             f"{new[key]!r}); use a new directory or delete this one")


def prepare(spec: SourceSpec, out: str | os.PathLike, opts: PrepareOptions = PrepareOptions(),
            log=None) -> dict:
    """Tokenize `spec` into shards in `out` (resuming a partial run there); the manifest."""
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _new_manifest(spec, opts)
    if (out / MANIFEST).exists():
        old = read_manifest(out)
        _resumable(old, manifest, out)
        if old["complete"]:
            log(f"{out} is already complete")
            return old
        manifest["shards"] = old["shards"]
        if old["shards"]:
            log(f"resuming after {old['shards'][-1]['file']} ({old['shards'][-1]['documents']:,} documents)")
    for stale in out.glob(".*.tmp"):  # left by a run killed while writing
        stale.unlink()
    writer = _ShardWriter(out, manifest, opts, log)
    resume_carry = writer.carry
    flags = collections.deque()  # starts_document of each piece sent; ids come back in order

    def sent():  # (separator before it, text): a document's first piece, bar the corpus's first
        stream = itertools.islice(pieces(spec), writer.pieces, None)
        for index, (starts, text) in enumerate(stream, writer.pieces):
            flags.append(starts)
            yield starts and index > 0, text

    for i, ids in enumerate(_encoded(sent(), opts)):
        starts = flags.popleft()
        if i == 0 and resume_carry:  # this piece's first ids are already in the last shard
            ids, starts = ids[resume_carry:], False
        writer.add(ids, starts)
    if writer.fill or not manifest["shards"]:
        writer.write(writer.fill)
    train = sum(s["tokens"] for s in manifest["shards"] if s["split"] == "train")
    if train == 0:
        raise ValueError(f"the source has {manifest['shards'][0]['tokens']:,} tokens, all in the "
                         f"validation shard; lower val_tokens (now {opts.val_tokens:,})")
    manifest["complete"] = True
    manifest["tokens"] = sum(s["tokens"] for s in manifest["shards"])
    manifest["documents"] = manifest["shards"][-1]["documents"]
    write_manifest(out, manifest)
    log(f"done: {manifest['tokens']:,} tokens, {manifest['documents']:,} documents, "
        f"{len(manifest['shards'])} shards in {out}")
    return manifest
