"""jaxgpt: build, train, finetune and serve GPT-style language models in JAX/Flax.

The public API. Importing it changes nothing in the process: settings such as glibc's
memory retention (`jaxgpt.hostmem.retain_freed_memory`) are applied by the entry points that
want them (train/*.py, jaxgpt.cli.*, the benchmarks).
"""

from jaxgpt.config import GPTConfig
from jaxgpt.corpus import dataset_path, load_hf_text, load_text, tokenize_cached
from jaxgpt.data import (
    WindowDataset,
    batch_indices,
    get_batch,
    sliding_windows,
    split_ids,
)
from jaxgpt.generation import generate, generate_simple, generate_stream
from jaxgpt.loading import load_model
from jaxgpt.lora import LoRAConfig, lora_loss_fn
from jaxgpt.model import (
    GPT,
    count_params,
    init_cache,
    init_params,
    logical_axes,
    validate_ids,
)
from jaxgpt.pretrained import load_pretrained, save_pretrained
from jaxgpt.tasks.classification.model import classify, load_classifier
from jaxgpt.tokenizer import (
    EOT_ID,
    SimpleTokenizerV1,
    SimpleTokenizerV2,
    build_vocab,
    get_tokenizer,
)

__all__ = [
    "EOT_ID",
    "LoRAConfig",
    "GPT",
    "GPTConfig",
    "SimpleTokenizerV1",
    "SimpleTokenizerV2",
    "WindowDataset",
    "batch_indices",
    "build_vocab",
    "classify",
    "count_params",
    "dataset_path",
    "generate",
    "generate_simple",
    "generate_stream",
    "get_batch",
    "get_tokenizer",
    "init_cache",
    "init_params",
    "load_classifier",
    "load_hf_text",
    "load_model",
    "load_pretrained",
    "load_text",
    "logical_axes",
    "lora_loss_fn",
    "save_pretrained",
    "sliding_windows",
    "split_ids",
    "tokenize_cached",
    "validate_ids",
]
