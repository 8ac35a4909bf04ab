"""HellaSwag completion scoring, as the GPT-2 reproductions (llm.c, nanoGPT) measure it.

Each example is a context and four endings, one of them right. Each ending is scored by the
model's cross-entropy on the ending's tokens after the context (the ending is encoded with a
leading space, as it follows the context in the text): `acc` picks the ending with the lowest
*summed* loss, `acc_norm` the lowest *mean* loss per token (llm.c and nanoGPT normalise by the
ending's token count; the official leaderboard's acc_norm normalises by its byte length).

The file is HellaSwag's JSONL: one object per line with `ctx` (or `ctx_a` and `ctx_b`, joined by
a space), `endings` (a list) and `label` (the right ending's index, an int or a digit string).
A context and ending longer than the model's context keep their last tokens.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.distributed import host_copy
from jaxgpt.models.model import GPT
from jaxgpt.data.tokenizer import get_tokenizer


@dataclass(frozen=True)
class Example:
    context: str
    endings: tuple[str, ...]
    label: int


def _example(row: object, where: str) -> Example:
    if not isinstance(row, dict):
        raise ValueError(f"{where} is not a JSON object")
    if "ctx" in row:
        context = row["ctx"]
    elif "ctx_a" in row:
        context = (row["ctx_a"] + " " + row.get("ctx_b", "")).strip()
    else:
        raise ValueError(f"{where} has no 'ctx' (nor 'ctx_a'/'ctx_b')")
    endings = row.get("endings")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise ValueError(f"{where}: 'endings' must be a list of at least two strings")
    try:
        label = int(row["label"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{where}: 'label' must be an ending's index, got {row.get('label')!r}") from None
    if not 0 <= label < len(endings):
        raise ValueError(f"{where}: label {label} is not an index of its {len(endings)} endings")
    return Example(context, tuple(endings), label)


def read_examples(path: str | os.PathLike, limit: int | None = None) -> list[Example]:
    """The examples of a HellaSwag-format JSONL file (the first `limit` of them)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HellaSwag file {path} does not exist")
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(examples) >= limit:
                break
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n} is not JSON ({e.msg})") from None
                examples.append(_example(row, f"{path} line {n}"))
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def completion_rows(example: Example, context_length: int, tokenizer_name: str = "gpt2"):
    """Per ending: (ids, mask) with mask 1 on the ending's tokens, the last `context_length`."""
    tok = get_tokenizer(tokenizer_name)
    ctx = tok.encode_ordinary(example.context)
    rows = []
    for ending in example.endings:
        end = tok.encode_ordinary(" " + ending)
        ids, mask = (ctx + end)[-context_length:], ([0] * len(ctx) + [1] * len(end))[-context_length:]
        rows.append((np.asarray(ids, np.int32), np.asarray(mask, np.int32)))
    return rows


def _bucket(n: int, cap: int) -> int:
    size = 16
    while size < n:
        size *= 2
    return min(size, cap)


@functools.lru_cache(maxsize=4)  # one jitted function per model config: evaluations reuse it
def _loss_fn(config: GPTConfig):
    model = GPT(config)

    @jax.jit
    def losses(params, ids, mask):  # ids, mask [R, T] -> summed loss and token count [R]
        logits = model.apply({"params": params}, ids)  # [R, T, V] float32
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # position t predicts token t + 1
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]  # [R, T-1]
        m = mask[:, 1:].astype(jnp.float32)
        return jnp.sum(nll * m, axis=1), jnp.sum(m, axis=1)

    return losses


def score(params, config: GPTConfig, examples: list[Example], *, rows_per_call: int = 32,
          tokenizer_name: str = "gpt2") -> dict:
    """acc and acc_norm over `examples`, with each example's summed and mean ending losses."""
    if rows_per_call <= 0:
        raise ValueError(f"rows_per_call must be positive, got {rows_per_call}")
    losses = _loss_fn(config)
    rows = [(i, j, ids, mask) for i, ex in enumerate(examples)
            for j, (ids, mask) in enumerate(completion_rows(ex, config.context_length, tokenizer_name))]
    sums = [np.zeros(len(ex.endings)) for ex in examples]
    means = [np.zeros(len(ex.endings)) for ex in examples]
    for start in range(0, len(rows), rows_per_call):
        chunk = rows[start : start + rows_per_call]
        width = _bucket(max(len(r[2]) for r in chunk), config.context_length)
        ids = np.zeros((rows_per_call, width), np.int32)  # fixed shapes: one compile per width
        mask = np.zeros((rows_per_call, width), np.int32)
        for k, (_, _, row_ids, row_mask) in enumerate(chunk):
            ids[k, : len(row_ids)], mask[k, : len(row_mask)] = row_ids, row_mask
        total, count = jax.device_get(losses(params, ids, mask))
        for k, (i, j, _, _) in enumerate(chunk):
            sums[i][j], means[i][j] = total[k], total[k] / max(count[k], 1.0)
    pred = np.array([int(np.argmin(s)) for s in sums])
    pred_norm = np.array([int(np.argmin(m)) for m in means])
    labels = np.array([ex.label for ex in examples])
    return {"acc": float(np.mean(pred == labels)), "acc_norm": float(np.mean(pred_norm == labels)),
            "examples": len(examples), "pred": pred, "pred_norm": pred_norm,
            "sum_loss": sums, "mean_loss": means}


def evaluator(path: str | os.PathLike, config: GPTConfig, limit: int | None = None):
    """`extra(params, step) -> {"hellaswag_acc", "hellaswag_acc_norm"}` for the evaluation hook;
    the file is read (and checked) now, not at the first evaluation."""
    examples = read_examples(path, limit)

    def extra(params, step):
        if jax.process_count() > 1:  # every process gathers the sharded weights and scores
            params = jax.device_put(host_copy(params))
        result = score(params, config, examples)
        return {"hellaswag_acc": result["acc"], "hellaswag_acc_norm": result["acc_norm"]}

    return extra
