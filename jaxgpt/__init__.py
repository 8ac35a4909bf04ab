"""jaxgpt: build, train, finetune and serve GPT-style language models in JAX/Flax."""

from jaxgpt.config import GPTConfig
from jaxgpt.corpus import dataset_path, load_hf_text, load_text, tokenize_cached
from jaxgpt.data import WindowDataset, batch_indices, get_batch, sliding_windows, split_ids
from jaxgpt.model import GPT, count_params, init_cache, init_params, logical_axes, validate_ids
from jaxgpt.tokenizer import (
    EOT_ID,
    SimpleTokenizerV1,
    SimpleTokenizerV2,
    build_vocab,
    get_tokenizer,
)

__all__ = [
    "EOT_ID",
    "GPT",
    "GPTConfig",
    "SimpleTokenizerV1",
    "SimpleTokenizerV2",
    "WindowDataset",
    "batch_indices",
    "build_vocab",
    "count_params",
    "dataset_path",
    "get_batch",
    "get_tokenizer",
    "init_cache",
    "init_params",
    "load_hf_text",
    "load_text",
    "logical_axes",
    "sliding_windows",
    "split_ids",
    "tokenize_cached",
    "validate_ids",
]
