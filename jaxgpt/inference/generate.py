"""Autoregressive generation: a KV-cached, jitted decoding loop, and the book's simple loop.

`generate` checks everything on the host, left-pads the prompts to a common length, runs one
jitted prefill over the prompt into a static-shape KV cache, then one jitted `lax.while_loop`
that decodes a token per iteration and exits early once every row has emitted `eos_id`. The
loop's state (cache included) is donated to it, so its buffers are reused rather than copied
between calls. `generate_stream` runs
the same two compiled functions, only asking the loop to stop every `chunk_size` tokens so the
caller sees them as they come.

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
  - Sampling: top-k keeps logits >= the k-th largest, then logits are divided by the
    temperature, then top-p keeps the smallest set of most likely tokens whose mass reaches p.
    Step s draws with `fold_in(key, s)`, so a key fixes the output.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxgpt.models.cache import init_cache
from jaxgpt.config import GPTConfig
from jaxgpt.inference.requests import (
    _as_prompts,
    _check_options,
    _check_prompts,
    check_size,
    prompt_bucket,
)
from jaxgpt.models.model import GPT, head_logits, validate_ids


def _filter_logits(logits, temperature, top_k, top_p):
    """Top-k (book semantics), temperature, then nucleus top-p; dropped logits become -inf."""
    if top_k is not None:
        kth = lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    logits = logits / temperature
    if top_p is not None:
        desc = -jnp.sort(-logits, axis=-1)  # [B, V] largest first
        probs = jax.nn.softmax(desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # The smallest kept logit: the first token always stays, so no row is left empty.
        cutoff = jnp.min(jnp.where(mass_before < top_p, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def _next_token(logits, key, step, opts, *, greedy, top_k, use_top_p):
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    top_p = opts["top_p"] if use_top_p else None
    logits = _filter_logits(logits, opts["temperature"], top_k, top_p)
    return jax.random.categorical(jax.random.fold_in(key, step), logits).astype(jnp.int32)


_STATIC = ("config", "max_new_tokens", "greedy", "top_k", "use_top_p", "use_eos")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _start(params, prompt, prompt_mask, key, opts, *, config, max_new_tokens, greedy, top_k,
           use_top_p, use_eos):
    """Prefill the cache with the bucketed prompt [B, P] and pick the first new token."""
    B, P = prompt.shape
    slots = P + min(max_new_tokens - 1, config.context_length - 1)  # no later write goes past
    pad = opts["eos_id"][0] if use_eos else 0
    tokens = jnp.full((B, P + max_new_tokens), pad, jnp.int32).at[:, :P].set(prompt)
    mask = jnp.concatenate([prompt_mask, jnp.ones((B, max_new_tokens), bool)], axis=1)  # [B, N]
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)  # [B, P]
    hidden, cache = GPT(config).apply(
        {"params": params}, prompt, positions=positions, attention_mask=mask[:, :slots],
        cache=init_cache(config, B, slots), cache_index=0, return_hidden=True,
    )  # [B, P, D]
    logits = head_logits(params, config, hidden[:, -1])  # left padding puts every last token here
    first = _next_token(logits, key, 0, opts, greedy=greedy, top_k=top_k, use_top_p=use_top_p)
    done = jnp.isin(first, opts["eos_id"]) if use_eos else jnp.zeros((B,), bool)
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
def _continue(params, state, stop, opts, *, config, max_new_tokens, greedy, top_k, use_top_p,
              use_eos):
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
        nxt = _next_token(logits, s["key"], s["step"], opts, greedy=greedy, top_k=top_k,
                          use_top_p=use_top_p)
        done = s["done"]
        if use_eos:
            nxt = jnp.where(done, opts["eos_id"][0], nxt)  # finished rows keep emitting eos
            done = done | jnp.isin(nxt, opts["eos_id"])
        tokens = lax.dynamic_update_slice_in_dim(s["tokens"], nxt[:, None], P + s["step"], axis=1)
        return {**s, "tokens": tokens, "cache": cache, "step": s["step"] + 1, "done": done}

    def cond(s):
        return (s["step"] < stop) & ~jnp.all(s["done"])

    return lax.while_loop(cond, body, state)


def generate_stream(params, config: GPTConfig, prompt_ids, max_new_tokens: int, *,
                    temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, eos_id: int | Sequence[int] | None = None,
                    key=None, prompt_mask=None, chunk_size: int = 8) -> Iterator[np.ndarray]:
    """Yield new tokens [B, n] as decoded, chunk_size at a time, until all rows are done."""
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    ids, mask = _as_prompts(prompt_ids, prompt_mask, _pad_id(eos_id))
    for state, lo, hi in _run(params, config, ids, mask, max_new_tokens, temperature, top_k,
                              top_p, eos_id, key, chunk_size):
        yield np.asarray(state["tokens"][:, lo:hi])


def generate(params, config: GPTConfig, prompt_ids, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | Sequence[int] | None = None, key=None, prompt_mask=None) -> np.ndarray:
    """Prompt ids followed by max_new_tokens new ones, int32 [B, T0 + max_new_tokens].

    prompt_ids is a list of id lists (left-padded here with eos_id, else 0) or an array [B, T0]
    with an optional left-padding prompt_mask; greedy when temperature is 0, otherwise sampled
    with `key`; rows that emit eos_id are padded with it and the loop stops once all have.
    eos_id may be several ids (a family's end-of-text and end-of-turn tokens): any one ends a
    row, which is then padded with the first. The prompt is padded to a power-of-two bucket so
    one compilation serves many lengths.
    """
    ids, mask = _as_prompts(prompt_ids, prompt_mask, _pad_id(eos_id))
    state = None
    for state, _, _ in _run(params, config, ids, mask, max_new_tokens, temperature, top_k, top_p,
                            eos_id, key, max(max_new_tokens, 1)):
        pass
    new = np.zeros((ids.shape[0], 0), np.int32)
    if state is not None:  # the last max_new_tokens columns, padded ahead with eos_id
        new = np.asarray(state["tokens"][:, -max_new_tokens:])
    return np.concatenate([ids.astype(np.int32), new], axis=1)


def _run(params, config, ids, mask, max_new_tokens, temperature, top_k, top_p, eos_id, key,
         chunk_size):
    """Yield (state, lo, hi) after each compiled call: its new tokens are tokens[:, lo:hi]."""
    _check_options(config, max_new_tokens, temperature, top_k, top_p, eos_id, key)
    _check_prompts(ids, mask, config)
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
    greedy = temperature == 0  # then top-k and top-p cannot change the argmax: ignore them
    static = dict(config=config, max_new_tokens=int(max_new_tokens), greedy=greedy,
                  top_k=None if greedy or top_k is None else int(top_k),
                  use_top_p=top_p is not None and not greedy, use_eos=eos_id is not None)
    opts = {"temperature": jnp.float32(temperature or 1.0), "top_p": jnp.float32(top_p or 1.0),
            "eos_id": jnp.asarray(eos_ids(eos_id) or (0,), jnp.int32)}  # [E]
    key = jax.random.key(0) if key is None else key  # unused when greedy
    state = _start(params, jnp.asarray(prompt), jnp.asarray(real), key, opts, **static)
    if not bool(state["finite"]):
        raise ValueError("the model's logits for the prompt are NaN or infinite: its parameters "
                         "are not finite or overflow in this dtype (check the weights it loaded)")
    produced = 1
    yield state, P, P + 1
    while produced < max_new_tokens and not bool(state["done"].all()):
        stop = min(produced + chunk_size, max_new_tokens)
        state = _continue(params, state, jnp.int32(stop), opts, **static)
        end = int(state["step"])
        yield state, P + produced, P + end
        produced = end


def eos_ids(eos_id) -> tuple[int, ...] | None:
    """eos_id as a tuple of ids (None: no stop token)."""
    if eos_id is None:
        return None
    ids = (eos_id,) if isinstance(eos_id, (int, np.integer)) else tuple(eos_id)
    if not ids:
        raise ValueError("eos_id is an empty collection; give None for no stop token")
    return tuple(int(i) for i in ids)


def _pad_id(eos_id) -> int:
    return 0 if eos_id is None else eos_ids(eos_id)[0]


@functools.partial(jax.jit, static_argnums=2)
def _last_logits(params, ids, config):
    return GPT(config).apply({"params": params}, ids)[:, -1, :]  # compiled once per length


def generate_simple(params, config: GPTConfig, ids, max_new_tokens: int,
                    context_size: int | None = None, temperature: float = 0.0,
                    top_k: int | None = None, eos_id: int | Sequence[int] | None = None,
                    key=None) -> jax.Array:
    """The book's loop: re-run the model on the last context_size tokens for each new token."""
    ids = jnp.asarray(ids)
    context_size = config.context_length if context_size is None else context_size
    done = jnp.zeros((ids.shape[0],), bool)
    for step in range(max_new_tokens):
        idx_cond = ids[:, -context_size:]  # crop to the supported context
        validate_ids(np.asarray(idx_cond), config)  # on the host: inside jit ids are unknown
        logits = _last_logits(params, idx_cond, config)  # [B, V]
        if top_k is not None:
            top_logits, _ = lax.top_k(logits, top_k)
            min_val = top_logits[:, -1:]
            logits = jnp.where(logits < min_val, -jnp.inf, logits)
        if temperature > 0.0:
            logits = logits / temperature
            idx_next = jax.random.categorical(jax.random.fold_in(key, step), logits)
        else:
            idx_next = jnp.argmax(logits, axis=-1)
        if eos_id is not None:
            # Unlike the book (batch 1, stop before eos), finished rows keep eos so rows align.
            stops = jnp.asarray(eos_ids(eos_id))  # [E]
            idx_next = jnp.where(done, stops[0], idx_next)
            done = done | jnp.isin(idx_next, stops)
        ids = jnp.concatenate([ids, idx_next[:, None].astype(ids.dtype)], axis=1)  # [B, T + 1]
        if eos_id is not None and bool(done.all()):
            break
    return ids
