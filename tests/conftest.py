"""Shared fixtures: tiny, odd, distinct sizes so that a transposed axis cannot pass."""

import os

import pytest

from jaxgpt.config import GPTConfig

# Sizes chosen pairwise distinct: V=17, context 11, D=12, H=3 (K=4), F=48, L=2. Float32 on
# every backend: the tests compare with float32 references at float32 tolerances, and
# dtype="auto" would mean bfloat16 on a GPU or TPU (tests/test_precision.py covers "auto").
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
