"""Tiny training runs in their own processes, shared by the trainer and fault-injection tests.

`uninterrupted` is one complete run of tests/e2e/workers/train_run.py (8 steps, checkpoints every
2); tests compare interrupted, damaged or contended runs against it, bit for bit.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxgpt.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "e2e" / "workers" / "train_run.py"
sys.path.insert(0, str(WORKER.parent))


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
