"""Windows read from memory-mapped shards: the same windows and batches as the in-memory path,
whatever the process count, and a pretraining run from shards that resumes exactly."""

import sys
from pathlib import Path

import numpy as np
import pytest

from jaxgpt.data.windows import WindowDataset, batch_indices, sliding_windows
from jaxgpt.data.prepare import PrepareOptions, prepare
from jaxgpt.data.shards import ShardDataset, TokenStream, read_manifest, write_manifest
from jaxgpt.data.sources import SourceSpec

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e" / "workers"))
from train_run import TINY_RUN  # noqa: E402


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """About 3,000 tokens in train shards of 97 tokens: windows of 11-23 tokens cross cuts."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(5)
    words = "the quick brown fox jumps over a lazy dog while cats sleep in warm sun".split()
    for i in range(12):
        text = "\n".join(" ".join(rng.choice(words, 9)) + "." for _ in range(25))
        (root / f"d{i:02d}.txt").write_text(text)
    out = root / "out"
    prepare(SourceSpec(str(root / "*.txt")), out, PrepareOptions(shard_tokens=97, val_tokens=500, workers=0),
            log=lambda text: None)
    return out


def _stream(directory, split):
    m = read_manifest(directory)
    return np.concatenate([np.fromfile(directory / s["file"], dtype="<u2")
                           for s in m["shards"] if s["split"] == split])


@pytest.mark.parametrize("memory_map", [False, True], ids=["pread", "memmap"])
@pytest.mark.parametrize("length,stride", [(11, 11), (13, 5), (23, 31), (96, 97), (97, 1)])
def test_windows_equal_sliding_windows_over_the_stream(shard_dir, length, stride, memory_map):
    for split in ("train", "val"):
        ids = _stream(shard_dir, split)  # independent of TokenStream: the files themselves
        inputs, targets = sliding_windows(ids, length, stride)
        ds = ShardDataset(shard_dir, split, length, stride, memory_map=memory_map)
        assert len(ds) == len(inputs)
        rows = ds.rows(np.arange(len(ds)))
        np.testing.assert_array_equal(rows["inputs"], inputs)
        np.testing.assert_array_equal(rows["targets"], targets)
        assert rows["inputs"].dtype == np.int32
        picked = np.array([[len(ds) - 1, 0], [3 % len(ds), 1]])  # any index shape
        np.testing.assert_array_equal(ds.rows(picked)["inputs"], inputs[picked])


def test_batches_match_memory_and_are_independent_of_process_count(shard_dir):
    ds = ShardDataset(shard_dir, "train", 13, 7)
    mem = WindowDataset.from_ids(_stream(shard_dir, "train"), 13, 7)
    epoch = len(ds) // 12
    for step in (0, 1, epoch, 3 * epoch + 2):  # steps in several epochs (reshuffled)
        x, y = ds.batch(step, batch_size=12, seed=9)
        np.testing.assert_array_equal(x, mem.batch(step, batch_size=12, seed=9)[0])
        for count in (2, 3):  # each process its rows, concatenated: the one-process batch
            parts = [ds.batch(step, batch_size=12, seed=9, process_index=p, process_count=count)
                     for p in range(count)]
            np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)
            np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)
        # A resumed run opens the shards afresh: the step alone gives the same batch.
        again = ShardDataset(shard_dir, "train", 13, 7).batch(step, batch_size=12, seed=9)
        np.testing.assert_array_equal(again[0], x)
    idx = batch_indices(len(ds), batch_size=12, step=5, seed=9)
    np.testing.assert_array_equal(ds.rows(idx)["targets"], mem.targets[idx])


def test_incomplete_or_damaged_directories_are_refused(shard_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    m = read_manifest(copy)
    write_manifest(copy, {**m, "complete": False})
    with pytest.raises(ValueError, match="still being prepared"):
        TokenStream(copy, "train")
    write_manifest(copy, m)
    last = copy / m["shards"][-1]["file"]
    last.write_bytes(last.read_bytes()[:-2])
    with pytest.raises(ValueError, match="expected .* bytes"):
        TokenStream(copy, "train")
    with pytest.raises(ValueError, match="fewer than max_length"):
        ShardDataset(shard_dir, "val", 5000)


def test_pretraining_from_shards_resumes_exactly(shard_dir, tmp_path):
    """Pretraining on data.shards: 4 steps straight, or 2 then a resumed run to 4: the same
    losses and evaluations (the batches are a pure function of the step)."""
    from jaxgpt.tasks.pretraining import pretrain
    from jaxgpt.training.metrics import read_metrics
    from jaxgpt.training.runconfig import load_config

    common = [*TINY_RUN, f"data.shards={shard_dir}", "data.source=unused-when-shards-are-set",
              "train.eval_freq=2", "train.checkpoint_every=2", "model.drop_rate=0.0", "train.report=false"]

    def run(runs, steps):
        pretrain(load_config(None, [*common, f"runs_dir={runs}", f"train.max_steps={steps}"]))

    run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    run(tmp_path / "b", 4)
    a = read_metrics(tmp_path / "a" / "default" / "metrics.jsonl")
    b = read_metrics(tmp_path / "b" / "default" / "metrics.jsonl")
    assert [r["kind"] for r in a] == [r["kind"] for r in b] and len(a) >= 6
    for ra, rb in zip(a, b):
        for key in ("loss", "val_loss", "train_loss"):
            if key in ra:
                assert ra[key] == rb[key], (key, ra, rb)
    assert all(np.isfinite(r["loss"]) for r in a if r["kind"] == "train")


def test_two_processes_each_read_their_rows_of_the_shard_batches(shard_dir, tmp_path):
    """Two real JAX processes (jax.distributed on CPU) training from shards: at every step each
    reads a disjoint half of the one-process batch, and both see the same global losses."""
    import json

    from tests.e2e.test_multihost import TINY, launch

    launch(tmp_path / "out", tmp_path / "runs", "unused", *TINY, f"data.shards={shard_dir}",
           "mesh.data=2", "mesh.fsdp=1", "mesh.tensor=1", "train.max_steps=3", "train.report=false",
           "model.vocab_size=50257", processes=2, devices=1)
    p0, p1 = [json.loads((tmp_path / "out" / f"process{i}.json").read_text()) for i in (0, 1)]
    assert p0["losses"] == p1["losses"] and len(p0["losses"]) == 3
    n = len(ShardDataset(shard_dir, "train", 16))
    steps = p0["rows"][1:]  # after the fixed evaluation batch: steps 0, 1, 2
    assert len(steps) == 3
    for step, (a, b) in enumerate(zip(steps, p1["rows"][1:])):
        assert len(a) == len(b) == 4 and not set(a) & set(b)
        assert a + b == batch_indices(n, batch_size=8, step=step, seed=123).tolist()


# --- shards are checked, not trusted ---

def _copy(shard_dir, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(shard_dir, out)
    return out, read_manifest(out)


def _poke(path, token_offset, value):
    data = bytearray(path.read_bytes())
    data[2 * token_offset : 2 * token_offset + 2] = int(value).to_bytes(2, "little")
    path.write_bytes(bytes(data))


def test_a_corrupted_shard_is_refused_naming_the_shard_and_tokens(shard_dir, tmp_path):
    import jaxgpt.data.shards as shards

    out, m = _copy(shard_dir, tmp_path)
    second = m["shards"][2]  # train shard 2: tokens 97..193 of the train stream
    _poke(out / second["file"], 40, (np.fromfile(out / second["file"], "<u2")[40] + 1) % 50257)
    ds = ShardDataset(out, "train", 11, 11, vocab_size=50257)
    ds.rows([0])  # shard 1 is intact and reads
    with pytest.raises(ValueError, match=rf"{second['file']}: tokens 0 to 97 are not what "
                                         "prepare_data wrote \\(sha256\\); the shard is corrupt"):
        ds.rows([10])  # tokens 110..121: shard 2
    assert ShardDataset(out, "train", 11, 11, verify=False).rows([10])["inputs"].shape == (1, 11)
    # A manifest of before block sums: the whole file's sha256 is checked instead.
    for entry in m["shards"]:
        entry.pop("block_sha256")
    write_manifest(out, m)
    with pytest.raises(ValueError, match=rf"{second['file']}: sha256 \w+ does not match"):
        ShardDataset(out, "train", 11, 11).rows([10])
    small = dict(BLOCK_TOKENS=8)  # blocks name where in a long shard the damage is
    for name, value in small.items():
        setattr(shards, name, value)
    try:
        sums = shards.block_sums((shard_dir / second["file"]).read_bytes())
        entry = {**second, "block_sha256": sums}
        with pytest.raises(ValueError, match="tokens 40 to 48 are not what prepare_data wrote"):
            shards.verify_shard(out / second["file"], entry)
    finally:
        shards.BLOCK_TOKENS = 1 << 20


def test_ids_beyond_the_vocabulary_are_refused_with_their_offset(shard_dir, tmp_path):
    from jaxgpt.data.shards import block_sums
    from jaxgpt.fsutil import sha256_bytes

    out, m = _copy(shard_dir, tmp_path)
    entry = m["shards"][3]
    path = out / entry["file"]
    _poke(path, 17, 60000)  # then the manifest made to agree: bytes as written, max_id a lie
    raw = path.read_bytes()
    entry.update(sha256=sha256_bytes(raw), block_sha256=block_sums(raw))
    write_manifest(out, m)
    with pytest.raises(ValueError, match=rf"{entry['file']}: token id 60000 at offset 17 does "
                                         "not fit model.vocab_size=50257"):
        ShardDataset(out, "train", 11, 11, vocab_size=50257).rows(np.arange(30))
    # With verification off, the batch's own check still refuses the id, at its offset.
    with pytest.raises(ValueError, match=rf"{entry['file']}: token id 60000 at offset 17 does"):
        ShardDataset(out, "train", 11, 11, vocab_size=50257, verify=False).rows(np.arange(30))
    # A manifest that records an id too large is refused when the split opens.
    entry["max_id"] = 60000
    write_manifest(out, m)
    with pytest.raises(ValueError, match=rf"{entry['file']} holds token id 60000 \(manifest\)"):
        ShardDataset(out, "train", 11, 11, vocab_size=50257)


def test_each_shard_is_read_whole_once_per_process(shard_dir, monkeypatch):
    import jaxgpt.data.shards as shards

    calls = []
    real = shards.verify_shard
    monkeypatch.setattr(shards, "verify_shard", lambda *a: calls.append(a[0].name) or real(*a))
    ds = ShardDataset(shard_dir, "train", 13, 7, vocab_size=50257)
    for step in range(6):
        ds.batch(step, batch_size=12, seed=9)
    ds.rows(np.arange(len(ds)))  # every window: every shard
    assert sorted(calls) == sorted(set(calls)) and len(calls) == len(ds.stream.entries)
