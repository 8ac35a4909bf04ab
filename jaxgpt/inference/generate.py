"""Autoregressive generation: a KV-cached, jitted decoding loop, and the book's simple loop.

`generate` checks everything on the host, left-pads the prompts to a common length, runs one
jitted prefill over the prompt into a static-shape KV cache, then one jitted `lax.while_loop`
that decodes a token per iteration and exits early once every row has emitted `eos_id`. The
loop's state (cache included) is donated to it, so its buffers are reused rather than copied
between calls. `generate_stream` runs the same two compiled functions (`prefill`, `decode`),
only asking the loop to stop every `chunk_size` tokens so the caller sees them as they come.

Choices, all matching the book's `generate` where it has one:
  - Prompts of different lengths are left-padded (masked) so every row's next token is in the
    same column; each row's positions start at 0 at its first real token.
  - A prompt longer than the context is cut to its last `context_length` tokens.
  - The prompt is padded further to a power-of-two bucket (at least 16, at most the context),
    so one compilation serves every prompt length in a bucket: a compile happens once per
    (batch, bucket, max_new_tokens, greedy or not, top_k, top_p given or not, eos given or not).
  - Once a sequence outgrows the context, each further token re-runs the model on the last
    `context_length` tokens, exactly as the book's loop does (absolute positions shift, so
    cached keys cannot be reused); decoding is then as slow as `generate_simple`.
  - Sampling is `jaxgpt.inference.sampling`'s, the engine's too: top-k keeps logits >= the k-th
    largest, then logits are divided by the temperature, then top-p keeps the smallest set of
    most likely tokens whose mass reaches p. Step s draws with `fold_in(key, s)`, so a key fixes
    the output. The options come as keywords (temperature, top_k, top_p) or as one `Sampling`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxgpt.config import GPTConfig
from jaxgpt.inference.requests import (
    as_prompts,
    check_key,
    check_prompts,
    check_request,
    check_size,
    eos_ids,
    prompt_bucket,
)
from jaxgpt.inference.sampling import GREEDY, Sampling, sample
from jaxgpt.models.cache import init_cache
from jaxgpt.models.model import GPT, head_logits, validate_ids

_STATIC = ("config", "max_new_tokens")


@functools.partial(jax.jit, static_argnames=_STATIC)
def prefill(params, prompt, prompt_mask, key, sampling: Sampling, eos, *, config,
            max_new_tokens):
    """Prefill the cache with the bucketed prompt [B, P] and pick the first new token; eos [E]
    (None: no stop ids). Returns the decoding state."""
    B, P = prompt.shape
    slots = P + min(max_new_tokens - 1, config.context_length - 1)  # no later write goes past
    pad = 0 if eos is None else eos[0]
    tokens = jnp.full((B, P + max_new_tokens), pad, jnp.int32).at[:, :P].set(prompt)
    mask = jnp.concatenate([prompt_mask, jnp.ones((B, max_new_tokens), bool)], axis=1)  # [B, N]
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)  # [B, P]
    hidden, cache = GPT(config).apply(
        {"params": params}, prompt, positions=positions, attention_mask=mask[:, :slots],
        cache=init_cache(config, B, slots), cache_index=0, return_hidden=True,
    )  # [B, P, D]
    logits = head_logits(params, config, hidden[:, -1])  # left padding puts every last token here
    first = sample(logits, jax.random.fold_in(key, 0), sampling)
    done = jnp.zeros((B,), bool) if eos is None else jnp.isin(first, eos)
    return {
        "tokens": tokens.at[:, P].set(first),  # [B, N] prompt bucket, then new tokens (pad ahead)
        "mask": mask,  # [B, N] real tokens: the prompt's mask, then all new tokens
        "n_prompt": prompt_mask.sum(axis=1).astype(jnp.int32),  # [B] real prompt tokens
        "cache": cache,  # {"k", "v"} [L, B, H, S, K]
        "step": jnp.int32(1),  # tokens generated so far; the newest is fed next
        "done": done,  # [B] rows that have emitted one of the eos ids
        "key": key,  # step s samples with fold_in(key, s)
        # Whether the prompt's logits are finite: NaN or inf weights would otherwise decode
        # as token 0 forever (argmax of NaN), silently.
        "finite": jnp.all(jnp.isfinite(logits)),
    }


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("state",))
def decode(params, state, stop, sampling: Sampling, eos, *, config, max_new_tokens):
    """Decode until `stop` tokens exist or every row is done: one lax.while_loop."""
    P, C = state["tokens"].shape[1] - max_new_tokens, config.context_length
    slots = state["cache"]["k"].shape[3]
    cache_mask = state["mask"][:, :slots]  # [B, S]
    model = GPT(config)

    def cached(s):
        col = P + s["step"] - 1  # the token fed now sits in column col and goes to slot col
        fed = lax.dynamic_slice_in_dim(s["tokens"], col, 1, axis=1)  # [B, 1]
        positions = (s["n_prompt"] + s["step"] - 1)[:, None]  # [B, 1]
        logits, cache = model.apply({"params": params}, fed, positions=positions,
                                    attention_mask=cache_mask, cache=s["cache"], cache_index=col)
        return logits[:, 0, :config.vocab_size], cache  # [B, V] (a padded vocabulary cut)

    def window(s):
        # Past the context: the book's step, the model on the last C tokens, positions from 0.
        start = P + s["step"] - C
        ids = lax.dynamic_slice_in_dim(s["tokens"], start, C, axis=1)  # [B, C]
        real = lax.dynamic_slice_in_dim(s["mask"], start, C, axis=1)  # [B, C]
        positions = jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0)
        hidden = model.apply({"params": params}, ids, positions=positions, attention_mask=real,
                             return_hidden=True)  # [B, C, D]
        return head_logits(params, config, hidden[:, -1]), s["cache"]

    def body(s):
        if P + max_new_tokens - 1 > C:  # static: only then can a position reach the context
            overflow = jnp.max(s["n_prompt"]) + s["step"] - 1 >= C
            logits, cache = lax.cond(overflow, window, cached, s)
        else:
            logits, cache = cached(s)
        nxt = sample(logits, jax.random.fold_in(s["key"], s["step"]), sampling)
        done = s["done"]
        if eos is not None:
            nxt = jnp.where(done, eos[0], nxt)  # finished rows keep emitting eos
            done = done | jnp.isin(nxt, eos)
        tokens = lax.dynamic_update_slice_in_dim(s["tokens"], nxt[:, None], P + s["step"], axis=1)
        return {**s, "tokens": tokens, "cache": cache, "step": s["step"] + 1, "done": done}

    def cond(s):
        return (s["step"] < stop) & ~jnp.all(s["done"])

    return lax.while_loop(cond, body, state)


def sampling_options(sampling: Sampling | None = None, temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None) -> Sampling:
    """The options of a call: `sampling`, or the keywords (giving both is refused)."""
    if sampling is None:
        return Sampling(temperature, top_k, top_p)
    if (temperature, top_k, top_p) != (0.0, None, None):
        raise ValueError("give the sampling options as sampling= or as temperature/top_k/top_p "
                         "keywords, not both")
    return sampling


def generate_stream(params, config: GPTConfig, prompt_ids, max_new_tokens: int, *,
                    temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, eos_id: int | Sequence[int] | None = None,
                    key=None, prompt_mask=None, chunk_size: int = 8,
                    sampling: Sampling | None = None) -> Iterator[np.ndarray]:
    """Yield new tokens [B, n] as decoded, chunk_size at a time, until all rows are done."""
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    sampling = sampling_options(sampling, temperature, top_k, top_p)
    prompts = as_prompts(prompt_ids, prompt_mask, _pad_id(eos_id))
    for state, lo, hi in _run(params, config, prompts, max_new_tokens, sampling, eos_id, key,
                              chunk_size):
        yield np.asarray(state["tokens"][:, lo:hi])


def generate(params, config: GPTConfig, prompt_ids, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | Sequence[int] | None = None, key=None, prompt_mask=None,
             sampling: Sampling | None = None) -> np.ndarray:
    """Prompt ids followed by max_new_tokens new ones, int32 [B, T0 + max_new_tokens].

    prompt_ids is a list of id lists (left-padded here with eos_id, else 0) or an array [B, T0]
    with an optional left-padding prompt_mask; greedy when temperature is 0, otherwise sampled
    with `key` (the options as keywords or as one `sampling=Sampling(...)`); rows that emit
    eos_id are padded with it and the loop stops once all have. eos_id may be several ids (a
    family's end-of-text and end-of-turn tokens): any one ends a row, which is then padded with
    the first. The prompt is padded to a power-of-two bucket so one compilation serves many
    lengths.
    """
    sampling = sampling_options(sampling, temperature, top_k, top_p)
    ids, mask = as_prompts(prompt_ids, prompt_mask, _pad_id(eos_id))
    state = None
    for state, _, _ in _run(params, config, (ids, mask), max_new_tokens, sampling, eos_id, key,
                            max(max_new_tokens, 1)):
        pass
    new = np.zeros((ids.shape[0], 0), np.int32)
    if state is not None:  # the last max_new_tokens columns, padded ahead with eos_id
        new = np.asarray(state["tokens"][:, -max_new_tokens:])
    return np.concatenate([ids.astype(np.int32), new], axis=1)


def _run(params, config, prompts, max_new_tokens, sampling, eos_id, key, chunk_size):
    """Yield (state, lo, hi) after each compiled call: its new tokens are tokens[:, lo:hi]."""
    ids, mask = prompts
    check_request(max_new_tokens, sampling, vocab_size=config.vocab_size, eos_id=eos_id, least=0,
                  name="max_new_tokens")
    check_key(sampling, key)
    check_prompts(ids, mask, config.vocab_size)
    # The book's cut: only the last context_length tokens are ever seen.
    width = min(int(mask.sum(axis=1).max()), config.context_length)
    check_size(ids.shape[0], width, max_new_tokens, config.context_length)
    if max_new_tokens == 0:
        return
    params = jax.device_put(params)  # host arrays would otherwise be copied on every call
    P = prompt_bucket(width, config.context_length)
    prompt = np.zeros((ids.shape[0], P), np.int32)  # padding may hold any id; the model sees 0
    real = np.zeros((ids.shape[0], P), bool)
    prompt[:, P - width:] = np.where(mask, ids, 0)[:, -width:]
    real[:, P - width:] = mask[:, -width:]
    static = dict(config=config, max_new_tokens=int(max_new_tokens))
    sampling = _traced(sampling)
    eos = None if eos_id is None else jnp.asarray(eos_ids(eos_id), jnp.int32)  # [E]
    key = jax.random.key(0) if key is None else key  # unused when greedy
    state = prefill(params, jnp.asarray(prompt), jnp.asarray(real), key, sampling, eos, **static)
    if not bool(state["finite"]):
        raise ValueError("the model's logits for the prompt are NaN or infinite: its parameters "
                         "are not finite or overflow in this dtype (check the weights it loaded)")
    produced = 1
    yield state, P, P + 1
    while produced < max_new_tokens and not bool(state["done"].all()):
        stop = min(produced + chunk_size, max_new_tokens)
        state = decode(params, state, jnp.int32(stop), sampling, eos, **static)
        end = int(state["step"])
        yield state, P + produced, P + end
        produced = end


def _traced(sampling: Sampling) -> Sampling:
    """The options as the compiled loop takes them: greedy ignores top-k and top-p (they cannot
    change an argmax); otherwise plain numbers, so the temperature and top-p are traced and
    top_k is static (one compilation per k)."""
    if float(sampling.temperature) == 0:
        return GREEDY
    top_k, top_p = sampling.top_k, sampling.top_p
    return Sampling(float(sampling.temperature), None if top_k is None else int(top_k),
                    None if top_p is None else float(top_p))


def _pad_id(eos_id) -> int:
    return 0 if eos_id is None else eos_ids(eos_id)[0]


@functools.partial(jax.jit, static_argnums=2)
def _last_logits(params, ids, config):
    return GPT(config).apply({"params": params}, ids)[:, -1, :]  # compiled once per length


def generate_simple(params, config: GPTConfig, ids, max_new_tokens: int,
                    context_size: int | None = None, temperature: float = 0.0,
                    top_k: int | None = None, eos_id: int | Sequence[int] | None = None,
                    key=None, *, sampling: Sampling | None = None) -> jax.Array:
    """The book's loop: re-run the model on the last context_size tokens for each new token;
    greedy unless the temperature is > 0 (then drawn with fold_in(key, step))."""
    sampling = sampling_options(sampling, temperature, top_k)
    if not sampling.temperature > 0.0:  # the book's test: anything else decodes greedily
        sampling = GREEDY
    ids = jnp.asarray(ids)
    context_size = config.context_length if context_size is None else context_size
    done = jnp.zeros((ids.shape[0],), bool)
    for step in range(max_new_tokens):
        idx_cond = ids[:, -context_size:]  # crop to the supported context
        validate_ids(np.asarray(idx_cond), config)  # on the host: inside jit ids are unknown
        logits = _last_logits(params, idx_cond, config)  # [B, V]
        idx_next = sample(logits, None if sampling.greedy else jax.random.fold_in(key, step),
                          sampling)
        if eos_id is not None:
            # Unlike the book (batch 1, stop before eos), finished rows keep eos so rows align.
            stops = jnp.asarray(eos_ids(eos_id))  # [E]
            idx_next = jnp.where(done, stops[0], idx_next)
            done = done | jnp.isin(idx_next, stops)
        ids = jnp.concatenate([ids, idx_next[:, None].astype(ids.dtype)], axis=1)  # [B, T + 1]
        if eos_id is not None and bool(done.all()):
            break
    return ids
