"""Tiny training runs in their own processes, shared by the trainer and fault-injection tests.

`uninterrupted` is one complete run of tests/workers/train_run.py (8 steps, checkpoints every
2); tests compare interrupted, damaged or contended runs against it, bit for bit.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxgpt.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "workers" / "train_run.py"
sys.path.insert(0, str(WORKER.parent))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while cats sleep in warm sun".split()
    text = "\n".join(" ".join(rng.choice(words, 12)) + "." for _ in range(300))
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(text)
    return str(path)


def run_worker(runs_dir, corpus, *extra, expect_rc=0, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(WORKER), str(runs_dir), corpus, *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == expect_rc, proc.stderr[-3000:]
    return proc


def train_records(run_dir):
    return read_metrics(Path(run_dir) / "metrics.jsonl")


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, corpus):
    runs = tmp_path_factory.mktemp("full")
    run_worker(runs, corpus)
    return runs / "default"
