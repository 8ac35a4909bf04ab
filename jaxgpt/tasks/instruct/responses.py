"""Responses of an instruction-tuned model: batched, KV-cached greedy (or sampled) generation."""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.data.prompts import Template, extract_response, get_template
from jaxgpt.data.tokenizer import EOT_ID, get_tokenizer
from jaxgpt.inference.generate import generate
from jaxgpt.inference.requests import eos_ids
from jaxgpt.inference.sampling import GREEDY, Sampling


def generate_responses(params, config: GPTConfig, records: Sequence[Mapping[str, str]],
                       template: Template | str = "alpaca", *, max_new_tokens: int = 256,
                       batch_size: int = 8, tokenizer=None, eos_id: int | tuple = EOT_ID,
                       sampling: Sampling = GREEDY, key=None) -> list[dict]:
    """Each record plus `model_response` and `ended` (it emitted eos_id within max_new_tokens);
    greedy unless `sampling` says otherwise (then drawn with `key`)."""
    template = get_template(template) if isinstance(template, str) else template
    tok = get_tokenizer("gpt2") if tokenizer is None else tokenizer
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} and batch_size={batch_size} must be positive")
    queries = [template.query(r) for r in records]
    ids = [tok.encode(q, disallowed_special=()) for q in queries]
    # Similar lengths batched together pad less and share generate's power-of-two prompt buckets.
    order = np.argsort([len(x) for x in ids], kind="stable")
    key = jax.random.key(0) if key is None else key
    params = jax.device_put(params)  # host arrays would be copied to the device on every call
    out: list[dict] = [{}] * len(records)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        rows = [ids[i] for i in chunk]
        rows += [rows[-1]] * (batch_size - len(rows))  # one batch shape: no recompilation
        new = generate(params, config, rows, max_new_tokens, sampling=sampling, eos_id=eos_id,
                       key=jax.random.fold_in(key, start))[:, -max_new_tokens:]  # [B, new]
        for b, i in enumerate(chunk):
            tokens = new[b].tolist()
            stops = [i for i, t in enumerate(tokens) if t in eos_ids(eos_id)]  # several: a family's
            ended = bool(stops)
            tokens = tokens[: stops[0]] if ended else tokens
            text = tok.decode([t for t in tokens if t < tok.n_vocab])  # padded vocab: no text
            response = extract_response(queries[i] + text, template, query=queries[i])
            out[i] = {**records[i], "model_response": response, "ended": ended}
    return out
