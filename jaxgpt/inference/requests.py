"""What `generate` is asked, checked on the host before anything compiles or is allocated:
the sampling options, the size of the buffers a request needs, and the prompts (a list of id
lists is left-padded here; an array comes with its mask). Every refusal is one ValueError line
that names the option or the prompt.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxgpt.config import GPTConfig

MIN_BUCKET = 16
# generate keeps every row's tokens and a real-token mask as [B, prompt bucket + max_new_tokens]
# buffers (an int32 id and a bool per cell, on the device and again on the host), which grow
# with max_new_tokens; the KV cache stops growing at the context. A request whose buffers pass
# this bound is refused on the host, before anything is allocated, rather than run out of memory.
MAX_BUFFER_BYTES = 256 << 20
_CELL_BYTES = 4 + 1  # int32 token id + bool mask


def prompt_bucket(length: int, context_length: int) -> int:
    """The padded prompt length: the next power of two, at least MIN_BUCKET, at most the context."""
    return min(context_length, max(MIN_BUCKET, 1 << (length - 1).bit_length()))


def _as_prompts(prompt_ids, prompt_mask, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, T0], mask [B, T0]) from a list of id lists (left-padded here) or an array."""
    ragged = isinstance(prompt_ids, (list, tuple)) and len(prompt_ids) > 0 and all(
        isinstance(r, (list, tuple, np.ndarray, jax.Array)) for r in prompt_ids)
    if ragged and prompt_mask is None:
        rows = [np.asarray(r).reshape(-1) for r in prompt_ids]
        for b, r in enumerate(rows):
            if r.size and not np.issubdtype(r.dtype, np.integer):
                raise ValueError(f"token ids must be integers, got dtype {r.dtype} in prompt {b}")
        ids = np.full((len(rows), max(len(r) for r in rows)), pad_id, np.int64)
        mask = np.zeros(ids.shape, bool)
        for b, r in enumerate(rows):
            if len(r):
                ids[b, -len(r):], mask[b, -len(r):] = r, True
        return ids, mask
    ids = np.asarray(prompt_ids)
    if ids.ndim != 2:
        raise ValueError(f"prompt_ids must be [batch, time] or a list of id lists, got shape {ids.shape}")
    mask = np.ones(ids.shape, bool) if prompt_mask is None else np.asarray(prompt_mask).astype(bool)
    if mask.shape != ids.shape:
        raise ValueError(f"prompt_mask shape {mask.shape} differs from prompt_ids shape {ids.shape}")
    for b in np.flatnonzero(np.any(mask[:, :-1] & ~mask[:, 1:], axis=1)):
        raise ValueError(f"prompt_mask row {b} is not left padding: a 0 follows a 1")
    return ids, mask


def check_sampling(max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                   vocab_size: int | None = None) -> None:
    """Refuse generation options no model could take (ValueError, one line naming the option)."""
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    top = "" if vocab_size is None else f", {vocab_size}"
    if top_k is not None and not (isinstance(top_k, (int, np.integer)) and top_k >= 1
                                  and (vocab_size is None or top_k <= vocab_size)):
        raise ValueError(f"top_k must be an integer in [1{top}], got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def check_size(batch: int, prompt_len: int, max_new_tokens: int,
               context_length: int | None = None) -> None:
    """Refuse a request whose token buffers would pass MAX_BUFFER_BYTES. Without the model's
    context_length the prompt counts unpadded: a lower bound that callers can check early."""
    width = max(prompt_len, 1)
    if context_length is not None:
        width = prompt_bucket(min(width, context_length), context_length)
    need = batch * (width + int(max_new_tokens)) * _CELL_BYTES
    if need > MAX_BUFFER_BYTES:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} is too many: {batch} row(s) of {width} prompt + "
            f"{max_new_tokens} new tokens need {need / 2**20:,.0f} MiB of token buffers, over the "
            f"{MAX_BUFFER_BYTES >> 20} MiB bound (jaxgpt.inference.requests.MAX_BUFFER_BYTES)")


def _check_options(config, max_new_tokens, temperature, top_k, top_p, eos_id, key):
    V = config.vocab_size
    check_sampling(max_new_tokens, temperature, top_k, top_p, V)
    for eos in () if eos_id is None else (eos_id,) if np.ndim(eos_id) == 0 else eos_id:
        if not 0 <= eos < V:
            raise ValueError(f"eos_id {eos} is outside the vocabulary [0, {V})")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key, e.g. key=jax.random.key(0)")


def _check_prompts(ids: np.ndarray, mask: np.ndarray, config: GPTConfig) -> None:
    if ids.shape[0] == 0:
        raise ValueError("prompt_ids holds no prompt")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
    for b in np.flatnonzero(~mask.any(axis=1)):
        raise ValueError(f"prompt {b} is empty")
    bad = mask & ((ids < 0) | (ids >= config.vocab_size))
    if bad.any():
        b, t = np.argwhere(bad)[0]
        raise ValueError(f"token id {int(ids[b, t])} in prompt {b} is outside the vocabulary "
                         f"[0, {config.vocab_size})")
