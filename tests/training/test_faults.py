"""Fault injection: kills during checkpoint writes, a damaged array, a full disk, a reader and a
second trainer beside a live one. In every case the run resumes to the same final parameters
as an uninterrupted run, or refuses with one line, and no committed checkpoint is lost."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgpt.weights.loader import load_model
from jaxgpt.weights.runs import (
    CheckpointError,
    CorruptCheckpoint,
    complete_steps,
    read_verified,
)
from tests.training.conftest import WORKER, run_worker, train_records


def _final_params(run_dir):
    _, params = load_model(run_dir)
    return params


def _assert_same_run(run_dir, reference):
    assert train_records(run_dir) == train_records(reference)  # bitwise-equal float history
    jax.tree.map(np.testing.assert_array_equal, _final_params(run_dir), _final_params(reference))


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("delay_ms", [0, 3, 15, 60])
def test_kill_during_a_checkpoint_write_then_resume(tmp_path, corpus, uninterrupted, delay_ms):
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp_path), corpus,
                           "--kill-after-save", "4", str(delay_ms)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpts = tmp_path / "default" / "checkpoints"
    committed = complete_steps(ckpts)
    # Step 2 was committed before step 4's write began: the kill must not have cost it.
    assert committed and committed[0] == 2 and set(committed) <= {2, 4}
    for step in committed:  # whatever committed reads back intact
        read_verified(ckpts, step)
    run_worker(tmp_path, corpus)
    _assert_same_run(tmp_path / "default", uninterrupted)


def _damage_arrays(step_dir: Path) -> None:
    """Invert 64 bytes in the middle of every array data file of a committed step (OCDBT packs
    arrays into files by hash, so which file holds the parameters is not known here)."""
    for target in (p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"):
        data = bytearray(target.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(255 - b for b in data[mid:mid + 64])
        target.write_bytes(bytes(data))


def test_damaged_latest_step_falls_back_to_the_previous_one(tmp_path, corpus, uninterrupted):
    run = tmp_path / "default"
    shutil.copytree(uninterrupted, run)
    _damage_arrays(run / "checkpoints" / "8")
    with pytest.raises(CorruptCheckpoint, match=r"checkpoint step 8 in .*checkpoints"):
        read_verified(run / "checkpoints", 8)
    # A reader serves step 6, says so, and changes nothing.
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    code = ("import sys; from jaxgpt.weights.loader import load_model; load_model(sys.argv[1])")
    reader = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True,
                            timeout=120, cwd=Path(WORKER).parents[3])
    assert reader.returncode == 0, reader.stderr[-2000:]
    assert "checkpoint step 8" in reader.stderr and "loading step 6 instead" in reader.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    # The trainer moves step 8 aside (kept, not deleted), resumes from 6 and ends where the
    # uninterrupted run ended.
    proc = run_worker(tmp_path, corpus)
    assert "checkpoint step 8" in proc.stderr and "trying the step before" in proc.stderr
    assert any(p.name.startswith("corrupt-8-") for p in run.iterdir())
    _assert_same_run(run, uninterrupted)


def test_a_tampered_array_is_named(tmp_path, uninterrupted):
    run = tmp_path / "default"
    shutil.copytree(uninterrupted, run)
    meta_path = run / "checkpoints" / "8" / "meta" / "metadata"
    meta = json.loads(meta_path.read_text())
    name = "params/h_1/mlp/c_fc/kernel"
    meta["checksums"][name][0] ^= 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CorruptCheckpoint, match=f"array {name} does not match the checksum"):
        read_verified(run / "checkpoints", 8)


def test_every_step_damaged_is_refused_in_one_line(tmp_path, corpus, uninterrupted):
    run = tmp_path / "default"
    shutil.copytree(uninterrupted, run)
    for step in complete_steps(run / "checkpoints"):
        _damage_arrays(run / "checkpoints" / str(step))
    proc = run_worker(tmp_path, corpus, expect_rc=1)
    assert "reads back intact" in proc.stderr
    assert complete_steps(run / "checkpoints") == complete_steps(uninterrupted / "checkpoints")


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_full_disk_refuses_in_one_line_and_resumes(tmp_path, corpus, uninterrupted):
    disk = tmp_path / "disk"
    if not sys.platform.startswith("linux") or not _mount_tmpfs(disk, "20m"):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount rights)")
    try:
        # Each checkpoint of this model takes ~8.5 MB: steps 2 and 4 fit in 20 MB, step 6 does not.
        script = Path(WORKER).parents[3] / "train" / "pretrain.py"
        from train_run import TINY_RUN

        plain = tmp_path / "plain.yaml"  # the worker's settings: no config file, TINY_RUN only
        plain.write_text("{}\n")
        args = [sys.executable, str(script), "--config", str(plain), *TINY_RUN,
                f"runs_dir={disk}", f"data.source={corpus}"]
        full = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert full.returncode == 2, full.stderr[-2000:]
        lines = _error_lines(full.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and "No space left" in lines[0], full.stderr
        committed = complete_steps(disk / "default" / "checkpoints")
        assert committed and committed[0] == 2
        for step in committed:
            read_verified(disk / "default" / "checkpoints", step)
        subprocess.run(["mount", "-o", "remount,size=400m", str(disk)], check=True)
        again = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        assert train_records(disk / "default") == train_records(uninterrupted)
        jax.tree.map(np.testing.assert_array_equal, _final_params(disk / "default"),
                     _final_params(uninterrupted))
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_reader_and_second_trainer_beside_a_live_run(tmp_path, corpus, uninterrupted):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    live = subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), corpus,
                             "train.checkpoint_every=1", "train.keep_checkpoints=2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    run = tmp_path / "default"
    deadline = time.time() + 240
    while not (run / ".lock").exists() and time.time() < deadline:
        time.sleep(0.05)
    second = run_worker(tmp_path, corpus, expect_rc=1)
    assert "is in use by pid" in second.stderr
    served = errors = 0
    while live.poll() is None and time.time() < deadline:  # a reader, over and over
        try:
            _, params = load_model(run)
            assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
            served += 1
        except CheckpointError as err:  # e.g. before the first commit: one line
            assert "\n" not in str(err)
            errors += 1
    out, err = live.communicate(timeout=60)
    assert live.returncode == 0, err[-2000:]
    assert served + errors > 0
    # The trainer was not disturbed: the same history and parameters as a run left alone
    # (checkpoint_every only changes when it saved).
    assert train_records(run) == train_records(uninterrupted)
    jax.tree.map(np.testing.assert_array_equal, _final_params(run), _final_params(uninterrupted))


def test_generation_refuses_non_finite_weights():
    from jaxgpt import GPTConfig, generate, init_params
    from tests.conftest import TINY

    cfg = GPTConfig(**TINY)
    params = init_params(cfg, jax.random.key(0))
    params["ln_f"]["scale"] = params["ln_f"]["scale"].at[0].set(np.nan)
    with pytest.raises(ValueError, match="logits for the prompt are NaN or infinite"):
        generate(params, cfg, [[1, 2, 3]], 5)


@pytest.mark.parametrize("fault, verify", [("flipped", True), ("garbage", True), ("garbage", False),
                                           ("out_of_vocabulary", False)])
def test_a_bad_shard_stops_the_run_naming_it(tmp_path, corpus, fault, verify):
    # Shards from the corpus, then one damaged: a run on them must refuse in one line naming
    # the shard (and where in it), never train on it to "done".
    from train_run import TINY_RUN

    from jaxgpt.data.prepare import PrepareOptions, prepare
    from jaxgpt.data.shards import block_sums, read_manifest, write_manifest
    from jaxgpt.fsutil import sha256_bytes
    from jaxgpt.data.sources import SourceSpec

    shards = tmp_path / "shards"
    prepare(SourceSpec(corpus), shards, PrepareOptions(shard_tokens=2000, val_tokens=400, workers=0),
            log=lambda text: None)
    m = read_manifest(shards)
    victim = m["shards"][1]
    path = shards / victim["file"]
    ids = np.fromfile(path, "<u2")
    if fault == "flipped":
        ids[123] ^= 1  # one bit; the id is still a word of the vocabulary
    elif fault == "garbage":
        ids[:] = np.random.default_rng(0).integers(0, 1 << 16, ids.size)
    else:  # ids past the vocabulary (in every window), and a manifest rewritten to agree
        ids[700::9] = 50300
    ids.tofile(path)
    if fault == "out_of_vocabulary":
        raw = path.read_bytes()
        victim.update(sha256=sha256_bytes(raw), block_sha256=block_sums(raw))
        write_manifest(shards, m)
    plain = tmp_path / "plain.yaml"
    plain.write_text("{}\n")
    run = subprocess.run([sys.executable, str(Path(WORKER).parents[3] / "train" / "pretrain.py"),
                          "--config", str(plain), *TINY_RUN, f"runs_dir={tmp_path / 'runs'}",
                          f"data.shards={shards}", f"data.verify_shards={str(verify).lower()}"],
                         capture_output=True, text=True, timeout=300)
    lines = _error_lines(run.stderr)
    assert run.returncode == 2 and len(lines) == 1 and victim["file"] in lines[0], run.stderr[-3000:]
    assert ("not what prepare_data wrote" in lines[0] or "sha256" in lines[0]) if verify and \
        fault != "out_of_vocabulary" else "does not fit model.vocab_size=50257" in lines[0]
    assert "offset" in lines[0] or "tokens" in lines[0]
