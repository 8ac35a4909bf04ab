"""End-to-end behaviour of the training loop: resume, preemption, faults, artifacts."""

import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from train_run import TINY_RUN  # noqa: E402  (tests/e2e/workers is on sys.path via the conftest)

from jaxgpt.weights.loader import load_model
from jaxgpt.training.checkpoint import Checkpointer, complete_steps
from jaxgpt.training.metrics import read_metrics
from jaxgpt.training.runconfig import ConfigError, load_config
from tests.training.conftest import ROOT, WORKER
from tests.training.conftest import run_worker as _run
from tests.training.conftest import train_records as _train_records


def test_run_writes_artifacts(uninterrupted):
    names = {p.name for p in uninterrupted.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "loss.png", "checkpoints", "tensorboard"} <= names
    records = _train_records(uninterrupted)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert [r["step"] for r in evals] == [1, 4, 7]  # the book's eval_freq timing
    assert train[-1]["tokens_seen"] == 8 * 4 * 16
    assert complete_steps(uninterrupted / "checkpoints")[-1] == 8
    assert any(f.name.startswith("events") for f in (uninterrupted / "tensorboard").iterdir())


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, corpus, uninterrupted):
    # Killed at step 5, after step 5's metrics were written; the asynchronous save of step 4
    # may or may not have committed, so the resume starts from step 2 or 4.
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp_path), corpus, "--kill-at", "5"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9
    run = tmp_path / "default"
    assert complete_steps(run / "checkpoints")[-1] in (2, 4)
    assert max(r["step"] for r in _train_records(run)) == 5
    _run(tmp_path, corpus)
    assert _train_records(run) == _train_records(uninterrupted)  # bitwise-equal float history
    _, resumed = load_model(run)
    _, full = load_model(uninterrupted)
    jax.tree.map(np.testing.assert_array_equal, resumed, full)


def test_sigterm_saves_and_exits_zero(tmp_path, corpus):
    proc = _run(tmp_path, corpus, "--term-at", "3")
    assert "PREEMPTED" in proc.stdout
    assert complete_steps(tmp_path / "default" / "checkpoints") == [2, 3]


def test_partial_checkpoint_is_ignored(tmp_path, corpus, uninterrupted):
    run = tmp_path / "default"
    shutil.copytree(uninterrupted, run)
    # Keep step 6 as the last good one and plant a half-written step 8 (no commit marker).
    ckpts = run / "checkpoints"
    (ckpts / "8" / "commit_success.txt").unlink()
    shutil.rmtree(ckpts / "8" / "state" / "d", ignore_errors=True)
    assert complete_steps(ckpts)[-1] == 6
    ckpt = Checkpointer(ckpts)
    assert ckpt.latest_step() == 6 and [p.name.startswith("incomplete-8") for p in ckpt.moved_aside]
    ckpt.close()
    _run(tmp_path, corpus)  # resumes from 6, redoes 7 and 8
    assert _train_records(run) == _train_records(uninterrupted)


def test_nan_updates_are_skipped_then_halt(tmp_path, corpus):
    proc = _run(tmp_path, corpus, "optim.learning_rate=1e30", "optim.grad_clip=null",
                "train.max_consecutive_skips=3", expect_rc=1)
    # Stopped by the skip counter or by the evaluation that first sees a non-finite loss,
    # whichever comes first; either names the divergence and the key to change.
    assert "training diverged (lower optim.learning_rate" in proc.stderr
    records = _train_records(tmp_path / "default")
    assert any(r["kind"] == "train" and r["skipped"] == 1 for r in records)
    # No checkpoint written after the model went non-finite.
    for step in complete_steps(tmp_path / "default" / "checkpoints"):
        _, params = load_model(tmp_path / "default", step=step)
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_run_dir_of_another_model_is_refused(uninterrupted, corpus):
    from jaxgpt.tasks.pretraining import pretrain

    cfg = load_config(None, TINY_RUN + [f"runs_dir={uninterrupted.parent}", f"data.source={corpus}",
                                        "model.emb_dim=24"])
    with pytest.raises(ConfigError, match=r"emb_dim: 12 != 24"):
        pretrain(cfg)


def test_pretrain_script_two_steps(tmp_path, corpus):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train" / "pretrain.py"), *TINY_RUN, f"runs_dir={tmp_path}",
         f"data.source={corpus}", "train.max_steps=2", "train.sample_tokens=4", "name=two"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "two"
    assert (run / "loss.png").stat().st_size > 0
    evals = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals and isinstance(evals[0]["sample"], str) and evals[0]["sample"]


def test_script_reports_bad_config_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "pretrain.py"), "optim.learning_rte=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "learning_rte" in proc.stderr
