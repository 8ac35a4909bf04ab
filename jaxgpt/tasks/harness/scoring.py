"""Log-likelihoods of continuations, as lm-evaluation-harness asks a causal model for them.

A request is (context ids, continuation ids). The model reads the last `max_length` ids of
context + continuation but the final one (a context longer than the window loses its oldest
tokens, as the harness's `hf` model does) and is scored on the continuation: the summed
log-probability of its tokens and whether each is the argmax ("greedy"). Rows are grouped by
length into power-of-two widths (the scored positions into power-of-two counts, and only those
go through the LM head) with a fixed number of rows per call, so one compilation serves each
pair of widths. A document's rolling log-likelihood is the sum over windows of `max_length`
tokens, each token predicted once, the first after the prefix token.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxgpt.config import GPTConfig
from jaxgpt.models.model import GPT, head_logits

Pair = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


def model_row(context: Sequence[int], continuation: Sequence[int], max_length: int):
    """(input ids, number of scored positions at its end): the last max_length + 1 ids of
    context + continuation, less the final one; the continuation's tokens are the targets of
    the last len(continuation) positions (all of them if it is longer than the window)."""
    if not continuation:
        raise ValueError("a continuation to score has no tokens")
    if not context:
        raise ValueError("a continuation needs at least one context token (the prefix token)")
    whole = list(context) + list(continuation)
    ids = whole[-(max_length + 1):][:-1]
    return ids, min(len(continuation), len(ids))


def width_of(n: int, cap: int, least: int = 16) -> int:
    """The power-of-two width (at least `least`) that holds n, at most cap."""
    size = least
    while size < n:
        size *= 2
    return min(size, cap)


@functools.lru_cache(maxsize=8)  # one jitted function per model config, reused by every call
def _scorer(config: GPTConfig):
    model = GPT(config)

    @jax.jit
    def scores(params, ids, where, targets, mask):  # ids [R, W]; the rest [R, C]
        h = model.apply({"params": params}, ids, return_hidden=True)  # [R, W, D]
        h = jnp.take_along_axis(h, where[..., None], axis=1)  # [R, C, D]: the scored positions only
        R, C, D = h.shape
        logits = head_logits(params, config, h.reshape(R * C, D)).reshape(R, C, -1)  # [R, C, V]
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [R, C]
        greedy = jnp.argmax(logits, axis=-1) == targets
        m = mask.astype(bool)
        return jnp.sum(jnp.where(m, picked, 0.0), axis=1), jnp.all(greedy | ~m, axis=1)

    return scores


def loglikelihoods(params, config: GPTConfig, pairs: Sequence[Pair], *, batch_size: int = 16,
                   max_length: int | None = None, progress: bool = False) -> list[tuple[float, bool]]:
    """(summed log-probability, greedy) of each continuation after its context, in order. Only
    the scored positions go through the LM head (a [V]-wide row each)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_length = config.context_length if max_length is None else max_length
    if not 1 <= max_length <= config.context_length:
        raise ValueError(f"max_length must be in [1, {config.context_length}], got {max_length}")
    rows = [model_row(c, x, max_length) for c, x in pairs]
    targets = [list(x)[-n:] for (_, x), (_, n) in zip(pairs, rows)]
    for ids in (r[0] for r in rows):
        bad = [i for i in ids if not 0 <= i < config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the model's vocabulary of {config.vocab_size}")
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first, as the harness
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    scores = _scorer(config)
    bar = tqdm(total=len(rows), desc="loglikelihood", disable=not progress, unit="req")
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = width_of(len(rows[chunk[0]][0]), max_length)
        scored = width_of(max(rows[i][1] for i in chunk), width, least=8)
        ids = np.zeros((batch_size, width), np.int32)  # fixed shapes: one compile per widths
        where = np.zeros((batch_size, scored), np.int32)
        tgt = np.zeros((batch_size, scored), np.int32)
        mask = np.zeros((batch_size, scored), np.int32)
        for k, i in enumerate(chunk):
            row, n = rows[i]
            ids[k, : len(row)] = row
            where[k, :n] = np.arange(len(row) - n, len(row))  # position t predicts token t + 1
            tgt[k, :n], mask[k, :n] = targets[i], 1
        total, greedy = jax.device_get(scores(params, ids, where, tgt, mask))
        for k, i in enumerate(chunk):
            out[i] = (float(total[k]), bool(greedy[k]))
        bar.update(len(chunk))
    bar.close()
    return out  # type: ignore[return-value]


def rolling_windows(tokens: Sequence[int], prefix_id: int, max_length: int) -> list[Pair]:
    """Windows that predict every token of `tokens` once, as the harness's rolling windows do:
    window i scores tokens[i*max_length : (i+1)*max_length], each token after the max_length
    ids before it (the first window after the prefix token; a short last window reads back into
    the tokens before it)."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    tokens = list(tokens)
    padded = [prefix_id] + tokens
    return [(padded[s : s + 1], tokens[s : s + max_length]) if s == 0
            else (padded[s - max_length + 1 : s + 1], tokens[s : s + max_length])
            for s in range(0, len(tokens), max_length)]
