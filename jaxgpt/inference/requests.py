"""What a generation request may ask, checked once on the host before anything compiles or is
allocated: the number of new tokens, the sampling options, the prompts, the stop ids, and the
size of the buffers they need. `generate`, the engine, the HTTP API and the command lines all
call these checks; every refusal is a `RequestError`, one ValueError line naming the field.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxgpt.inference.sampling import GREEDY, Sampling

MIN_BUCKET = 16
# generate keeps every row's tokens and a real-token mask as [B, prompt bucket + max_new_tokens]
# buffers (an int32 id and a bool per cell, on the device and again on the host), which grow
# with max_new_tokens; the KV cache stops growing at the context. A request whose buffers pass
# this bound is refused on the host, before anything is allocated, rather than run out of memory.
MAX_BUFFER_BYTES = 256 << 20
_CELL_BYTES = 4 + 1  # int32 token id + bool mask
_DISPLAY = {"prompt": "the prompt"}  # how a message names a field when a caller doesn't


class RequestError(ValueError):
    """A refused request. `field` names what was refused (max_tokens, temperature, top_k, top_p,
    prompt, ...) and `code` says more where a protocol wants it (context_length_exceeded);
    `describe(name)` is the message with the field named as a caller spells it."""

    def __init__(self, field: str, template: str, *, code: str | None = None,
                 name: str | None = None):
        self.field, self.template, self.code = field, template, code
        super().__init__(self.describe(name or _DISPLAY.get(field, field)))

    def describe(self, name: str) -> str:
        return self.template.replace("{name}", name)


def prompt_bucket(length: int, context_length: int) -> int:
    """The padded prompt length: the next power of two, at least MIN_BUCKET, at most the context."""
    return min(context_length, max(MIN_BUCKET, 1 << (length - 1).bit_length()))


def check_request(max_tokens, sampling: Sampling = GREEDY, *, vocab_size: int | None = None,
                  max_len: int | None = None, prompt=None, eos_id=None, least: int = 1,
                  name: str = "max_tokens") -> None:
    """Refuse what no model, or (given its vocab_size and max_len) this model, can run: at least
    `least` new tokens (None: not given, to be filled in later), the sampling options, one
    prompt (a list of ids) that leaves room for them, and stop ids inside the vocabulary.
    `name` is the caller's name for the count of new tokens."""
    if max_tokens is not None:
        check_max_tokens(max_tokens, least, name)
    check_sampling(sampling, vocab_size)
    if eos_id is not None and vocab_size is not None:
        check_eos(eos_id, vocab_size)
    if prompt is not None:
        ids = np.asarray(list(prompt)).reshape(1, -1) if len(prompt) else np.zeros((1, 0), int)
        check_prompts(ids, np.ones(ids.shape, bool), vocab_size, one=True)
        if max_len is not None:
            check_length(len(prompt), max_tokens, max_len, name)


def check_max_tokens(value, least: int = 1, name: str = "max_tokens") -> None:
    """A count of new tokens: an integer >= least (0 or 1)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= least:
        return
    if least == 0:
        rule = "must be a non-negative integer"
    else:
        is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        rule = f"must be at least {least}" if is_int else "must be an integer"
    raise RequestError("max_tokens", f"{{name}} {rule}, got {value!r}", name=name)


def check_sampling(sampling: Sampling, vocab_size: int | None = None) -> None:
    """Options any model can take: temperature >= 0, top_k in [1, vocab_size], top_p in (0, 1]."""
    t, k, p = sampling.temperature, sampling.top_k, sampling.top_p
    if not (_is_real(t) and np.isfinite(t) and t >= 0):
        raise RequestError("temperature", f"{{name}} must be a finite number >= 0, got {t!r}")
    is_int = isinstance(k, (int, np.integer)) and not isinstance(k, bool)
    if k is not None and not (is_int and 1 <= k and (vocab_size is None or k <= vocab_size)):
        bound = "must be >= 1" if is_int and vocab_size is None else \
            "must be an integer >= 1" if vocab_size is None else \
            f"must be an integer in [1, {vocab_size}]"
        raise RequestError("top_k", f"{{name}} {bound}, got {k!r}")
    if p is not None and not (_is_real(p) and 0 < p <= 1):
        raise RequestError("top_p", f"{{name}} must be in (0, 1], got {p!r}")


def _is_real(x) -> bool:
    """A real number (a 0-d array included), not a bool."""
    return np.ndim(x) == 0 and not isinstance(x, (bool, np.bool_)) and \
        np.issubdtype(np.asarray(x).dtype, np.number) and np.isreal(x)


def check_length(prompt_len: int, max_tokens, max_len: int, name: str = "max_tokens") -> None:
    """The prompt plus its new tokens (at least one) fit in max_len positions."""
    code = "context_length_exceeded"
    if prompt_len >= max_len:
        raise RequestError("prompt", f"the prompt is {prompt_len} tokens, but this model's maximum "
                           f"context length is {max_len} tokens (the prompt plus at least one new "
                           "token)", code=code)
    room = max_len - prompt_len
    if max_tokens is not None and max_tokens > room:
        raise RequestError("max_tokens", f"this model's maximum context length is {max_len} "
                           f"tokens; the prompt is {prompt_len} tokens and {{name}} asks for "
                           f"{max_tokens} more (at most {room})", code=code, name=name)


def eos_ids(eos_id) -> tuple[int, ...] | None:
    """eos_id (an id or several) as a tuple of ids (None: no stop token)."""
    if eos_id is None:
        return None
    ids = (eos_id,) if isinstance(eos_id, (int, np.integer)) else tuple(eos_id)
    if not ids:
        raise RequestError("eos_id", "{name} is an empty collection; give None for no stop token")
    return tuple(int(i) for i in ids)


def check_eos(eos_id, vocab_size: int) -> None:
    """Every stop id inside the vocabulary."""
    for eos in eos_ids(eos_id) or ():
        if not 0 <= eos < vocab_size:
            raise RequestError("eos_id", f"{{name}} {eos} is outside the vocabulary [0, {vocab_size})")


def check_key(sampling: Sampling, key) -> None:
    """A sampled request needs a PRNG key."""
    if not sampling.greedy and key is None:
        raise RequestError("key", "sampling (temperature > 0) needs a PRNG key, e.g. "
                           "key=jax.random.key(0)")


def check_size(batch: int, prompt_len: int, max_new_tokens: int,
               context_length: int | None = None) -> None:
    """Refuse a request whose token buffers would pass MAX_BUFFER_BYTES. Without the model's
    context_length the prompt counts unpadded: a lower bound that callers can check early."""
    width = max(prompt_len, 1)
    if context_length is not None:
        width = prompt_bucket(min(width, context_length), context_length)
    need = batch * (width + int(max_new_tokens)) * _CELL_BYTES
    if need > MAX_BUFFER_BYTES:
        raise RequestError("max_tokens",
            f"max_new_tokens={max_new_tokens} is too many: {batch} row(s) of {width} prompt + "
            f"{max_new_tokens} new tokens need {need / 2**20:,.0f} MiB of token buffers, over the "
            f"{MAX_BUFFER_BYTES >> 20} MiB bound (jaxgpt.inference.requests.MAX_BUFFER_BYTES)")


def as_prompts(prompt_ids, prompt_mask, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, T0], mask [B, T0]) from a list of id lists (left-padded here) or an array."""
    ragged = isinstance(prompt_ids, (list, tuple)) and len(prompt_ids) > 0 and all(
        isinstance(r, (list, tuple, np.ndarray, jax.Array)) for r in prompt_ids)
    if ragged and prompt_mask is None:
        rows = [np.asarray(r).reshape(-1) for r in prompt_ids]
        for b, r in enumerate(rows):
            if r.size and not np.issubdtype(r.dtype, np.integer):
                raise RequestError("prompt_ids", f"token ids must be integers, got dtype {r.dtype} "
                                   f"in prompt {b}")
        ids = np.full((len(rows), max(len(r) for r in rows)), pad_id, np.int64)
        mask = np.zeros(ids.shape, bool)
        for b, r in enumerate(rows):
            if len(r):
                ids[b, -len(r):], mask[b, -len(r):] = r, True
        return ids, mask
    ids = np.asarray(prompt_ids)
    if ids.ndim != 2:
        raise RequestError("prompt_ids", "{name} must be [batch, time] or a list of id lists, "
                           f"got shape {ids.shape}")
    mask = np.ones(ids.shape, bool) if prompt_mask is None else np.asarray(prompt_mask).astype(bool)
    if mask.shape != ids.shape:
        raise RequestError("prompt_mask", f"{{name}} shape {mask.shape} differs from prompt_ids "
                           f"shape {ids.shape}")
    for b in np.flatnonzero(np.any(mask[:, :-1] & ~mask[:, 1:], axis=1)):
        raise RequestError("prompt_mask", f"{{name}} row {b} is not left padding: a 0 follows a 1")
    return ids, mask


def check_prompts(ids: np.ndarray, mask: np.ndarray, vocab_size: int | None,
                  one: bool = False) -> None:
    """Prompts [B, T0] (real tokens where mask): none empty, integer ids inside the vocabulary.
    `one`: a single prompt, named "the prompt" rather than "prompt 0"."""
    if ids.shape[0] == 0:
        raise RequestError("prompt_ids", "{name} holds no prompt")
    where = (lambda b: "{name}") if one else (lambda b: f"prompt {b}")  # noqa: E731
    for b in np.flatnonzero(~mask.any(axis=1)):
        raise RequestError("prompt", f"{where(b)} is empty")
    if not np.issubdtype(ids.dtype, np.integer):
        raise RequestError("prompt", f"token ids must be integers, got dtype {ids.dtype}")
    if vocab_size is None:
        return
    bad = mask & ((ids < 0) | (ids >= vocab_size))
    if bad.any():
        b, t = np.argwhere(bad)[0]
        raise RequestError("prompt", f"token id {int(ids[b, t])} in {where(b)} is outside the "
                           f"vocabulary [0, {vocab_size})")
