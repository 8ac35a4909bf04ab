"""Shared fixtures: tiny, odd, distinct sizes so that a transposed axis cannot pass."""

import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest

from jaxgpt.config import GPTConfig

# The training scripts cache compiled programs in ~/.cache/jaxgpt/xla by default: the tests'
# subprocesses use a directory of this session instead, removed at exit.
if "JAXGPT_CACHE_DIR" not in os.environ:
    os.environ["JAXGPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxgpt-test-xla-")
    atexit.register(shutil.rmtree, os.environ["JAXGPT_CACHE_DIR"], True)

# Sizes chosen pairwise distinct: V=17, context 11, D=12, H=3 (K=4), F=48, L=2. Float32 on
# every backend: the tests compare with float32 references at float32 tolerances, and
# dtype="auto" would mean bfloat16 on a GPU or TPU (tests/training/test_precision.py covers "auto").
TINY = dict(vocab_size=17, context_length=11, emb_dim=12, n_heads=3, n_layers=2, drop_rate=0.0,
            dtype="float32")


@pytest.fixture
def tiny_config() -> GPTConfig:
    return GPTConfig(**TINY)


@pytest.fixture
def data_dir():
    """The real data sets, reached only through JAXGPT_DATA_DIR (set by .ci/run)."""
    path = os.environ.get("JAXGPT_DATA_DIR")
    if not path or not os.path.isdir(path):
        pytest.skip("JAXGPT_DATA_DIR is not set to the shared data directory")
    return path


def write_run(run_dir, run_config, params_by_step: dict):
    """A run directory as the trainer leaves it: config.yaml and one committed checkpoint of a
    fresh train state per step, built with the real writers (no training needed)."""
    import optax

    from jaxgpt.training.checkpoint import Checkpointer
    from jaxgpt.training.runconfig import save_config
    from jaxgpt.training.state import init_state

    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(run_config, run_dir / "config.yaml")
    ckpt = Checkpointer(run_dir / "checkpoints", keep=100, async_save=False)  # keep every step
    for step, params in params_by_step.items():
        ckpt.save(step, init_state(params, optax.adam(1e-3), 0), {"step": step})
    ckpt.close()
    return run_dir


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small text file of random sentences (a corpus for tiny training runs)."""
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while cats sleep in warm sun".split()
    text = "\n".join(" ".join(rng.choice(words, 12)) + "." for _ in range(300))
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(text)
    return str(path)
