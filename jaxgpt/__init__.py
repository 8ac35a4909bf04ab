"""jaxgpt: build, train, finetune and serve GPT-style language models in JAX/Flax.

The public API, each name imported from its module on first use: importing jaxgpt runs no
JAX code and changes nothing in the process. Settings such as glibc's memory retention
(`jaxgpt.hostmem.retain_freed_memory`) are applied by the entry points that want them
(train/*.py, jaxgpt.cli.*, the benchmarks), before they import JAX.
"""

import importlib

_EXPORTS = {
    "EOT_ID": "jaxgpt.tokenizer",
    "Engine": "jaxgpt.engine",

    "FamilyTokenizer": "jaxgpt.tokenizer",
    "GPT": "jaxgpt.model",
    "GPTConfig": "jaxgpt.config",
    "LoRAConfig": "jaxgpt.lora",
    "ShardDataset": "jaxgpt.shards",
    "SimpleTokenizerV1": "jaxgpt.tokenizer",
    "SimpleTokenizerV2": "jaxgpt.tokenizer",
    "WindowDataset": "jaxgpt.data",
    "Windows": "jaxgpt.data",
    "batch_indices": "jaxgpt.data",
    "build_vocab": "jaxgpt.tokenizer",
    "classify": "jaxgpt.tasks.classification.model",
    "count_params": "jaxgpt.model",
    "dataset_path": "jaxgpt.corpus",
    "generate": "jaxgpt.generation",
    "generate_simple": "jaxgpt.generation",
    "generate_stream": "jaxgpt.generation",
    "get_batch": "jaxgpt.data",
    "get_tokenizer": "jaxgpt.tokenizer",
    "init_cache": "jaxgpt.cache",
    "init_params": "jaxgpt.model",
    "load_family_tokenizer": "jaxgpt.tokenizer",
    "load_classifier": "jaxgpt.tasks.classification.model",
    "load_hf_text": "jaxgpt.corpus",
    "load_model": "jaxgpt.loading",
    "load_pretrained": "jaxgpt.pretrained",
    "load_text": "jaxgpt.corpus",
    "logical_axes": "jaxgpt.model",
    "lora_loss_fn": "jaxgpt.lora",
    "save_pretrained": "jaxgpt.pretrained",
    "sliding_windows": "jaxgpt.data",
    "split_ids": "jaxgpt.data",
    "tokenize_cached": "jaxgpt.corpus",
    "validate_ids": "jaxgpt.model",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxgpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
