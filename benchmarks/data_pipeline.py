"""Data pipeline: corpus preparation vs a plain tiktoken loop, its peak memory, and the loader.

  python benchmarks/data_pipeline.py [--gb 1.0] [--small-fraction 0.25] [--batches 400]

A synthetic corpus (text files of English-like words drawn from CPython's documentation, 4 MB
each, `--gb` in all) is written to a temporary directory, deleted at the end. Then:

1. Preparation: `train/prepare_data.py` (all cores, default shard sizes) on the whole corpus,
   against the peer, a single-process loop `tiktoken.encode_ordinary(file) -> uint16 file` over
   the same files, in the same run: MB/s, tokens/s and the ratio.
2. Peak RSS of the preparation (the script and its pool, summed, sampled every 20 ms) on a
   `--small-fraction` of the corpus and on all of it.
3. The loader: `ShardDataset` windows of 1024, batches of 16 at `--batches` consecutive steps
   from a random one (shuffled windows, as in training), read in a fresh process for each
   corpus size, with pread (the default) and with np.memmap: batches/s and RSS (anonymous, and
   mapped file pages).

With `--verify-only`, only the cost of shard verification at open is measured: a small corpus
is prepared for its manifest, then `--gb` of random ids below GPT-2's vocabulary are written as
shards of the same format (sha256 per block and whole, as prepare_data records them), and the
check of every shard is timed against opening the split with the check off.

Figures are wall-clock on whatever else the machine runs; the CPU model is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from common import cpu_model, usable_cores  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FILE_MB = 4


def make_corpus(root: Path, gb: float, seed: int = 0) -> list[Path]:
    """Files of FILE_MB MB: lines of words drawn by their frequency in CPython's docs."""
    from pydoc_data.topics import topics

    words, counts = np.unique(re.findall(r"\S+", " ".join(topics.values())), return_counts=True)
    rng = np.random.default_rng(seed)
    blocks = []
    for _ in range(16):  # distinct 1 MB blocks; each file is a random sequence of them
        picks = words[rng.choice(len(words), 200_000, p=counts / counts.sum())]
        lines = [" ".join(picks[i : i + int(rng.integers(5, 25))]) for i in range(0, len(picks), 15)]
        text = "\n".join(lines)
        blocks.append(text[: 1 << 20].rsplit("\n", 1)[0] + "\n")
    root.mkdir(parents=True)
    files = []
    for i in range(int(gb * 1024 / FILE_MB)):
        path = root / f"part_{i:05d}.txt"
        path.write_text("".join(blocks[j] for j in rng.integers(0, len(blocks), FILE_MB)), encoding="utf-8")
        files.append(path)
    return files


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, AttributeError):
            continue
    return total


def cpu_seconds(who) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_sampled(cmd: list[str], env=None) -> tuple[float, float, int, str]:
    """(seconds, CPU seconds of it and its pool, peak RSS of the process tree, stderr) of a command."""
    cpu0 = cpu_seconds(resource.RUSAGE_CHILDREN)  # reaped descendants count here, pool included
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"{cmd[1]} failed: {err[-2000:]}")
    return elapsed, cpu_seconds(resource.RUSAGE_CHILDREN) - cpu0, peak[0], err


def peer_loop(files: list[Path], out: Path) -> tuple[float, float, int]:
    """The plain loop: read, encode with tiktoken in this process, write uint16."""
    from jaxgpt.data.tokenizer import get_tokenizer

    enc = get_tokenizer("gpt2")
    cpu0 = cpu_seconds(resource.RUSAGE_SELF)
    start, tokens = time.perf_counter(), 0
    with open(out, "wb") as f:
        for path in files:
            ids = enc.encode_ordinary(path.read_text(encoding="utf-8"))
            np.asarray(ids, np.uint16).tofile(f)
            tokens += len(ids)
    return time.perf_counter() - start, cpu_seconds(resource.RUSAGE_SELF) - cpu0, tokens


LOADER = """
import sys, time, json, re
import numpy as np
from pathlib import Path
sys.path.insert(0, {root!r})
from jaxgpt.data.windows import batch_indices
from jaxgpt.data.shards import ShardDataset
def rss():
    status = Path("/proc/self/status").read_text()
    return {{k: int(re.search(k + r":\\s+(\\d+) kB", status).group(1)) * 1024 for k in ("RssAnon", "RssFile")}}
ds = ShardDataset({path!r}, "train", 1024, memory_map={memory_map}, verify=False)
n = len(ds)
first = int(np.random.default_rng(0).integers(0, 10**6))  # consecutive steps, as a run reads them
ds.rows(batch_indices(n, batch_size=16, step=first, seed=1))  # warm the code paths
start = time.perf_counter()
for step in range(first, first + {batches}):
    rows = ds.rows(batch_indices(n, batch_size=16, step=step, seed=1))
elapsed = time.perf_counter() - start
print(json.dumps({{"windows": n, "batches_per_s": {batches} / elapsed, **rss()}}))
"""


VERIFY = """
import sys, time, json
sys.path.insert(0, {root!r})
from jaxgpt.data.shards import ShardDataset, verify_shards
from jaxgpt.data.windows import batch_indices
start = time.perf_counter()
ds = ShardDataset({path!r}, "train", 1024, verify=False, vocab_size=50257)
ds.rows(batch_indices(len(ds), batch_size=16, step=0, seed=1))
off = time.perf_counter() - start
start = time.perf_counter()
verify_shards({path!r}, vocab_size=50257)  # what a process reads once, over its first batches
print(json.dumps({{"off_s": off, "verify_s": time.perf_counter() - start}}))
"""


def verification_figures(path: Path) -> dict:
    """Seconds to check every shard (sha256 by block, ids against the vocabulary), and to open
    the split and read a first batch with the check off; in a fresh process, warm page cache."""
    code = VERIFY.format(root=str(ROOT), path=str(path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def synthetic_shards(template: Path, out: Path, gb: float, shard_tokens: int = 100_000_000) -> int:
    """`gb` of random ids (< 50257) in shards of `template`'s format (its validation shard
    kept, its training shards replaced); returns the bytes written."""
    from jaxgpt.data.shards import block_sums, read_manifest, shard_name, write_manifest
    from jaxgpt.fsutil import sha256_bytes

    manifest = read_manifest(template)
    out.mkdir()
    val = manifest["shards"][0]
    shutil.copy(template / val["file"], out / val["file"])
    shards, total, rng = [val], int(gb * 1e9) // 2, np.random.default_rng(0)
    while sum(s["tokens"] for s in shards[1:]) < total:
        n = min(shard_tokens, total - sum(s["tokens"] for s in shards[1:]))
        ids = rng.integers(0, 50257, n, dtype=np.uint16)
        raw = memoryview(ids).cast("B")
        name = shard_name(len(shards))
        (out / name).write_bytes(raw)
        shards.append({**manifest["shards"][-1], "file": name, "split": "train", "tokens": int(n),
                       "sha256": sha256_bytes(raw), "block_sha256": block_sums(raw),
                       "max_id": int(ids.max())})
    manifest.update(shards=shards, tokens=sum(s["tokens"] for s in shards))
    write_manifest(out, manifest)
    return 2 * manifest["tokens"]


def print_verification(path: Path, nbytes: int) -> None:
    figs = verification_figures(path)
    print(f"shard verification (data.verify_shards=true): {figs['verify_s']:.2f} s for "
          f"{nbytes / 1e9:.2f} GB of shards ({nbytes / 1e9 / figs['verify_s']:.2f} GB/s), once per "
          f"process, spread over the first batch that reads each shard; with it off, opening the "
          f"split and reading a first batch: {figs['off_s']:.3f} s", flush=True)


def verify_only(tmp: Path, gb: float) -> None:
    files = make_corpus(tmp / "corpus", 0.02)
    template = tmp / "template"
    run_sampled([sys.executable, str(ROOT / "train" / "prepare_data.py"), str(tmp / "corpus"),
                 str(template), "--val-tokens", "100000"])
    t0 = time.perf_counter()
    nbytes = synthetic_shards(template, tmp / "shards", gb)
    print(f"{len(files)} files prepared for the manifest; {nbytes / 1e9:.2f} GB of synthetic shards "
          f"written in {time.perf_counter() - t0:.0f} s")
    print_verification(tmp / "shards", nbytes)


def loader_figures(path: Path, batches: int, memory_map: bool) -> dict:
    code = LOADER.format(root=str(ROOT), path=str(path), batches=batches, memory_map=memory_map)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    return json.loads(out.stdout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=1.0, help="size of the synthetic corpus")
    p.add_argument("--small-fraction", type=float, default=0.25, help="the smaller corpus, as a fraction")
    p.add_argument("--batches", type=int, default=400, help="loader batches timed per size")
    p.add_argument("--tmp", default=None, help="where to put the temporary corpus")
    p.add_argument("--val-tokens", type=int, default=None, help="passed to prepare_data.py")
    p.add_argument("--shard-tokens", type=int, default=None, help="passed to prepare_data.py")
    p.add_argument("--verify-only", action="store_true",
                   help="only the shard verification cost, on --gb of synthetic shards")
    args = p.parse_args(argv)
    print(f"CPU: {cpu_model()}, {usable_cores()} usable cores ({os.cpu_count()} online)")
    tmp = Path(tempfile.mkdtemp(prefix="jaxgpt-bench-", dir=args.tmp))
    try:
        if args.verify_only:
            verify_only(tmp, args.gb)
            return 0
        t0 = time.perf_counter()
        files = make_corpus(tmp / "all", args.gb)
        small = tmp / "small"
        small.mkdir()
        for f in files[: max(1, int(len(files) * args.small_fraction))]:
            os.link(f, small / f.name)
        sizes = {d: sum(f.stat().st_size for f in d.iterdir()) for d in (small, tmp / "all")}
        print(f"corpus: {len(files)} files, {sizes[tmp / 'all'] / 1e9:.2f} GB of text "
              f"(written in {time.perf_counter() - t0:.0f} s)")

        script = [sys.executable, str(ROOT / "train" / "prepare_data.py")]
        tail = [x for flag, v in (("--val-tokens", args.val_tokens), ("--shard-tokens", args.shard_tokens))
                if v is not None for x in (flag, str(v))]
        results = {}
        for d in (small, tmp / "all"):
            out = tmp / f"shards_{d.name}"
            seconds, cpu, peak, _ = run_sampled(script + [str(d), str(out), *tail])
            tokens = json.loads((out / "manifest.json").read_text())["tokens"]
            results[d.name] = (seconds, cpu, tokens, out)
            print(f"prepare {d.name:>5}: {sizes[d] / 1e6:7.0f} MB -> {tokens / 1e6:6.1f} M tokens in "
                  f"{seconds:6.1f} s: {sizes[d] / 1e6 / seconds:6.2f} MB/s, {tokens / seconds / 1e6:5.2f} "
                  f"M tokens/s ({cpu:.0f} CPU s); peak RSS {peak / 2**30:.2f} GiB (script + pool)", flush=True)

        seconds, cpu, tokens = peer_loop(files, tmp / "peer.bin")
        mine = results["all"]
        # The shards also hold the end-of-text separators between the files.
        assert tokens + len(files) - 1 == mine[2], "the peer and the preparation disagree on the token count"
        print(f"peer (plain tiktoken loop, 1 process): {sizes[tmp / 'all'] / 1e6 / seconds:6.2f} MB/s, "
              f"{tokens / seconds / 1e6:5.2f} M tokens/s ({cpu:.0f} CPU s)")
        print(f"preparation / peer, wall clock: {seconds / mine[0]:.2f}x; CPU seconds per byte: "
              f"{mine[1] / cpu:.2f}x the peer's (the pool's overhead)", flush=True)

        print_verification(results["all"][3], 2 * results["all"][2])
        for memory_map in (False, True):
            for name in ("small", "all"):
                figs = loader_figures(results[name][3], args.batches, memory_map)
                print(f"loader {'memmap' if memory_map else 'pread':>6} {name:>5} ({figs['windows']:,} windows "
                      f"of 1024): {figs['batches_per_s']:6.0f} batches/s of 16 x 1024 (1 process); RSS "
                      f"anonymous {figs['RssAnon'] / 2**20:.0f} MiB + file pages {figs['RssFile'] / 2**20:.0f} MiB",
                      flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
