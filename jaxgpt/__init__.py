"""jaxgpt: build, train, finetune and serve GPT-style language models in JAX/Flax.

The public API, each name imported from its module on first use: importing jaxgpt runs no
JAX code and changes nothing in the process. Settings such as glibc's memory retention
(`jaxgpt.hostmem.retain_freed_memory`) are applied by the entry points that want them
(train/*.py, jaxgpt.cli.*, the benchmarks), before they import JAX.
"""

import importlib

_EXPORTS = {
    "EOT_ID": "jaxgpt.data.tokenizer",
    "Engine": "jaxgpt.inference.engine",

    "FamilyTokenizer": "jaxgpt.data.tokenizer",
    "GPT": "jaxgpt.models.model",
    "GPTConfig": "jaxgpt.config",
    "LoRAConfig": "jaxgpt.lora.transform",
    "ShardDataset": "jaxgpt.data.shards",
    "SimpleTokenizerV1": "jaxgpt.data.tokenizer",
    "SimpleTokenizerV2": "jaxgpt.data.tokenizer",
    "WindowDataset": "jaxgpt.data.windows",
    "Windows": "jaxgpt.data.windows",
    "batch_indices": "jaxgpt.data.windows",
    "build_vocab": "jaxgpt.data.tokenizer",
    "classify": "jaxgpt.tasks.classification.model",
    "count_params": "jaxgpt.models.model",
    "dataset_path": "jaxgpt.data.corpus",
    "generate": "jaxgpt.inference.generate",
    "generate_simple": "jaxgpt.inference.generate",
    "generate_stream": "jaxgpt.inference.generate",
    "get_batch": "jaxgpt.data.windows",
    "get_tokenizer": "jaxgpt.data.tokenizer",
    "init_cache": "jaxgpt.models.cache",
    "init_params": "jaxgpt.models.model",
    "load_family_tokenizer": "jaxgpt.data.tokenizer",
    "load_classifier": "jaxgpt.tasks.classification.model",
    "load_hf_text": "jaxgpt.data.corpus",
    "load_model": "jaxgpt.weights.loader",
    "load_pretrained": "jaxgpt.weights.huggingface",
    "load_text": "jaxgpt.data.corpus",
    "logical_axes": "jaxgpt.models.model",
    "lora_loss_fn": "jaxgpt.lora.transform",
    "save_pretrained": "jaxgpt.weights.huggingface",
    "sliding_windows": "jaxgpt.data.windows",
    "split_ids": "jaxgpt.data.windows",
    "tokenize_cached": "jaxgpt.data.corpus",
    "validate_ids": "jaxgpt.models.model",
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
