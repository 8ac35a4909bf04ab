"""Corpus preparation: shards hold exactly the source's token stream; kill + resume is exact.

The reference is one call of tiktoken on the whole corpus joined by <|endoftext|>, so piece
cutting, the pool, shard cuts and resuming must all be invisible in the output.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import jaxgpt.data.prepare as prepare_mod
import jaxgpt.data.sources as sources_mod
from jaxgpt.data.prepare import PrepareOptions, prepare
from jaxgpt.data.shards import MANIFEST, TokenStream, read_manifest, verify_shards
from jaxgpt.data.sources import SourceSpec
from jaxgpt.data.tokenizer import EOT_ID, EOT_TOKEN, get_tokenizer

ROOT = Path(__file__).resolve().parents[2]
QUIET = dict(log=lambda text: None)


def random_documents(seed: int, n: int, max_words: int) -> list[str]:
    """Text with the pre-tokenizer's hard cases: runs of spaces and newlines (also \\r\\n and
    \\r), digits, contractions, non-ASCII letters, a literal "<|endoftext|>" (text, not the
    separator)."""
    rng = np.random.default_rng(seed)
    words = ["the", "Cat", " sat", "on", "mat.", "\n", "\n\n", "  ", "\t", "é", "日本", "1234",
             "don't", "!", "  \n", "<|endoftext|>", "über", "x", "\r\n", "\r", "\r\r\n"]
    docs = []
    for i in range(n):
        k = int(rng.integers(0, max_words)) if i % 5 else 0  # some documents are empty
        picks = rng.choice(len(words), k)
        docs.append("".join(words[j] + (" " if rng.random() < 0.6 else "") for j in picks))
    return docs


def reference_ids(docs: list[str]) -> np.ndarray:
    enc = get_tokenizer("gpt2")
    parts = []
    for i, doc in enumerate(docs):
        if i:
            parts.append([EOT_ID])
        parts.append(enc.encode_ordinary(doc))  # a literal "<|endoftext|>" stays text
    return np.concatenate([np.asarray(p, np.int64) for p in parts])


def shard_ids(out: Path) -> np.ndarray:
    m = read_manifest(out)
    return np.concatenate([np.fromfile(out / s["file"], dtype="<u2") for s in m["shards"]])


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces and tasks of a few hundred characters, so documents span several of each."""
    monkeypatch.setattr(sources_mod, "PIECE_CHARS", 257)
    monkeypatch.setattr(sources_mod, "_CUT_BLOCK", 7)
    monkeypatch.setattr(prepare_mod, "TASK_CHARS", 613)


def test_text_files_decode_to_the_source_stream(tmp_path, small_pieces):
    docs = random_documents(0, 13, 400)
    src = tmp_path / "src"
    src.mkdir()
    for i, doc in enumerate(docs):
        (src / f"doc{i:02d}.txt").write_bytes(doc.encode("utf-8"))
    out = tmp_path / "out"
    m = prepare(SourceSpec(str(src)), out, PrepareOptions(shard_tokens=211, val_tokens=300, workers=2), **QUIET)
    # Text files are read with universal newlines, as open() and corpus.load_text read them.
    texts = [(src / f"doc{i:02d}.txt").open(encoding="utf-8").read() for i in range(len(docs))]
    assert any("\r" in d for d in docs) and not any("\r" in t for t in texts)
    ref = reference_ids(texts)
    np.testing.assert_array_equal(shard_ids(out), ref)
    assert get_tokenizer("gpt2").decode(shard_ids(out).tolist()) == EOT_TOKEN.join(texts)
    # The validation shard ends just before the first separator at or after val_tokens (no
    # document in both splits) when one comes within shard_tokens more, else at val_tokens;
    # training shards are exactly shard_tokens long.
    val, *train = m["shards"]
    hits = np.flatnonzero(ref[300 : 300 + 211 + 1] == EOT_ID)
    assert val["split"] == "val" and val["tokens"] == (300 + int(hits[0]) if hits.size else 300)
    assert all(s["tokens"] == 211 for s in train[:-1]) and 0 < train[-1]["tokens"] <= 211
    assert m["complete"] and m["tokens"] == len(ref) and m["documents"] == len(docs)
    assert m["tokenizer"]["name"] == "gpt2" and len(m["fingerprint"]) == 64
    verify_shards(out)  # sha256 of every shard as recorded
    assert max(s["max_id"] for s in m["shards"]) == int(ref.max())
    # The loader's view of the splits is the same stream.
    stream = TokenStream(out, "train")
    np.testing.assert_array_equal(stream.read(0, len(stream)), ref[val["tokens"] :])


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r", "mixed"])
def test_text_files_are_cut_under_every_line_ending(tmp_path, small_pieces, ending):
    # A CRLF (or CR) file is cut as often as the same file with LF endings, never read whole,
    # and its pieces decode to exactly what universal-newline reading of the whole file gives.
    rng = np.random.default_rng(3)
    lines = [" ".join(rng.choice(["alpha", "Beta", "  gamma", "d\u00e9j\u00e0", "42"], 6)) for _ in range(300)]
    ends = ["\n", "\r\n", "\r"]
    body = "".join(line + (ends[i % 3] if ending == "mixed" else ending) for i, line in enumerate(lines))
    path = tmp_path / "doc.txt"
    path.write_bytes(body.encode("utf-8"))
    got = list(sources_mod.pieces(SourceSpec(str(path))))
    spans = [p for _, p in got]
    assert len(spans) > 20 and all(end - start <= 257 + 200 for _, start, end in spans)
    assert [first for first, _ in got] == [True] + [False] * (len(got) - 1)
    assert "".join(sources_mod.decode_piece(p) for p in spans) == path.open(encoding="utf-8").read()
    lf = tmp_path / "lf.txt"
    lf.write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))
    assert len(spans) >= 0.8 * len(list(sources_mod.pieces(SourceSpec(str(lf)))))


def test_jsonl_parquet_and_streamed_dataset_rows_are_documents(tmp_path, small_pieces):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = random_documents(1, 9, 300)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"body": docs, "n": list(range(len(docs)))}), parquet, row_group_size=4)
    opts = PrepareOptions(shard_tokens=150, val_tokens=100, workers=0)
    ref = reference_ids(docs)
    for name, spec in [("jsonl", SourceSpec(str(jsonl), text_column="body")),
                       ("parquet", SourceSpec(str(parquet), text_column="body")),
                       ("hf", SourceSpec("hf:json", text_column="body", data_files=(str(jsonl),)))]:
        prepare(spec, tmp_path / name, opts, **QUIET)
        np.testing.assert_array_equal(shard_ids(tmp_path / name), ref, err_msg=name)
    with pytest.raises(ValueError, match="no column 'text'"):
        prepare(SourceSpec(str(jsonl)), tmp_path / "bad", opts, **QUIET)


def test_resume_refuses_other_arguments(tmp_path):
    for name in "ab":
        (tmp_path / f"{name}.txt").write_text("one two three\n" * 50)
    out = tmp_path / "out"
    prepare(SourceSpec(str(tmp_path / "*.txt")), out, PrepareOptions(shard_tokens=40, val_tokens=20, workers=0), **QUIET)
    with pytest.raises(ValueError, match="different shard_tokens"):
        prepare(SourceSpec(str(tmp_path / "*.txt")), out, PrepareOptions(shard_tokens=41, val_tokens=20, workers=0), **QUIET)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8 text"):
        prepare(SourceSpec(str(tmp_path / "latin1.txt")), tmp_path / "l1", PrepareOptions(workers=2), **QUIET)


def test_a_single_text_file_is_split_inside_its_one_document(tmp_path):
    # One file is one document: validation ends at val_tokens exactly, the rest trains.
    (tmp_path / "a.txt").write_text("one two three\n" * 50)
    out = tmp_path / "one"
    m = prepare(SourceSpec(str(tmp_path / "a.txt")), out, PrepareOptions(val_tokens=20, workers=0), **QUIET)
    ref = reference_ids([(tmp_path / "a.txt").read_text()])
    assert m["complete"] and [s["tokens"] for s in m["shards"]] == [20, len(ref) - 20]
    np.testing.assert_array_equal(shard_ids(out), ref)
    # A document end within shard_tokens past val_tokens still ends validation there.
    for name in "bc":
        (tmp_path / f"{name}.txt").write_text("one two three\n" * 10)  # 40 tokens each
    m = prepare(SourceSpec(str(tmp_path / "[bc].txt")), tmp_path / "two",
                PrepareOptions(shard_tokens=30, val_tokens=20, workers=0), **QUIET)
    assert m["shards"][0]["tokens"] == 40  # the end of b.txt, 20 past val_tokens (<= 30)
    m = prepare(SourceSpec(str(tmp_path / "[bc].txt")), tmp_path / "three",
                PrepareOptions(shard_tokens=10, val_tokens=20, workers=0), **QUIET)
    assert m["shards"][0]["tokens"] == 20  # b.txt's end is too far: cut inside it


@pytest.mark.parametrize("text", ["", "one two three\n" * 4])
def test_too_small_a_source_names_the_fix_and_leaves_no_directory(tmp_path, text):
    n = len(reference_ids([text]))
    match = f"only {n} tokens, not more than val_tokens=20: lower val_tokens below {n}" if n \
        else "holds no text"
    (tmp_path / "a.txt").write_text(text)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        prepare(SourceSpec(str(tmp_path / "a.txt")), out, PrepareOptions(val_tokens=20, workers=0), **QUIET)
    assert not out.exists()
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("a user's file")
    with pytest.raises(ValueError, match=match):
        prepare(SourceSpec(str(tmp_path / "a.txt")), keep, PrepareOptions(val_tokens=20, workers=0), **QUIET)
    assert (keep / "notes.txt").read_text() == "a user's file"  # a directory not ours is kept


def _big_corpus(root: Path) -> Path:
    src = root / "big"
    src.mkdir()
    rng = np.random.default_rng(2)
    vocab = np.array("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu Ω".split())
    for i in range(24):  # 24 documents of about 250 KB: several pieces each
        words = vocab[rng.integers(0, len(vocab), 40_000)]
        lines = [" ".join(words[j : j + 13]) for j in range(0, len(words), 13)]
        (src / f"part{i:03d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return src


def test_sigkill_mid_preparation_then_resume_is_byte_identical(tmp_path):
    src = _big_corpus(tmp_path)
    args = ["--shard-tokens", "49999", "--val-tokens", "30000"]
    ref_out = tmp_path / "uninterrupted"
    # The uninterrupted reference tokenizes in-process; the killed run uses a pool of two.
    prepare(SourceSpec(str(src)), ref_out, PrepareOptions(shard_tokens=49999, val_tokens=30000, workers=0), **QUIET)
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "train" / "prepare_data.py"), str(src), str(out), *args, "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    finished = []
    while time.time() < deadline and proc.poll() is None:
        try:
            finished = read_manifest(out)["shards"]
        except (FileNotFoundError, ValueError):
            finished = []
        if len(finished) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "preparation ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the script and its pool: no cleanup at all
    proc.wait()
    before = read_manifest(out)
    assert not before["complete"] and len(before["shards"]) < len(read_manifest(ref_out)["shards"])
    kept = {s["file"]: os.stat(out / s["file"]).st_ino for s in before["shards"]}
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after" in resumed.stderr
    # Shards finished before the kill are kept, not rewritten.
    assert all(os.stat(out / f).st_ino == ino for f, ino in kept.items())
    ref_m, got_m = read_manifest(ref_out), read_manifest(out)
    assert [s["file"] for s in got_m["shards"]] == [s["file"] for s in ref_m["shards"]]
    for s in ref_m["shards"]:
        assert (out / s["file"]).read_bytes() == (ref_out / s["file"]).read_bytes(), s["file"]
    assert got_m == ref_m
    assert any(s["carry"] for s in ref_m["shards"])  # cuts inside pieces were exercised
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref_out.iterdir())
    np.testing.assert_array_equal(shard_ids(out), reference_ids(
        [p.read_text(encoding="utf-8") for p in sorted(src.iterdir())]))


def test_script_reports_a_missing_source_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "prepare_data.py"),
                           str(tmp_path / "nothing.txt"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "nothing.txt" in proc.stderr and not (tmp_path / "out" / MANIFEST).exists()
