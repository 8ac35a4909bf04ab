"""Log-probabilities the OpenAI API returns: of each generated token with its most likely
alternatives (the engine's steps, `token_scores`), and of a prompt's own tokens (`echo`,
`prompt_scores`), which is how lm-evaluation-harness's `local-completions` model scores
continuations over HTTP.

Every log-probability is of the model's own distribution, log-softmax of its logits, whatever
the request's temperature, top-k or top-p (which only change which token is drawn). The top
alternatives are computed `MAX_TOP` at a time, so one compiled program serves every request;
a reply keeps as many as it asked for.

`completion_logprobs` and `chat_logprobs` put them in the two endpoints' JSON shapes:
/v1/completions {"tokens", "token_logprobs", "top_logprobs", "text_offset"} (the prompt's first
token has null, nothing before it to predict it), /v1/chat/completions {"content": [{"token",
"logprob", "bytes", "top_logprobs": [...]}]}.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxgpt.config import GPTConfig
from jaxgpt.inference.requests import prompt_bucket
from jaxgpt.models.model import GPT

MAX_TOP = 20  # the chat API's top_logprobs limit; /v1/completions allows up to 5


@dataclass(frozen=True)
class Scored:
    """One token's log-probability and the `MAX_TOP` most likely tokens with theirs."""

    token: int
    logprob: float
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


def token_scores(logits, tokens, top: int = MAX_TOP):
    """log p(tokens) [N] under logits [N, V], and the `top` most likely ids [N, top] with their
    log-probabilities [N, top], most likely first."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [N, V]
    chosen = jnp.take_along_axis(logp, tokens[:, None].astype(jnp.int32), axis=-1)[:, 0]
    top_lp, top_ids = lax.top_k(logp, top)
    return chosen, top_ids, top_lp


def scored_rows(tokens, chosen, top_ids, top_lp) -> list[Scored]:
    """`token_scores`' arrays as one `Scored` per row (on the host)."""
    tokens, chosen, top_ids, top_lp = map(np.asarray, (tokens, chosen, top_ids, top_lp))
    return [Scored(int(t), float(c), tuple(map(int, i)), tuple(map(float, p)))
            for t, c, i, p in zip(tokens, chosen, top_ids, top_lp)]


@functools.partial(jax.jit, static_argnames=("config",))
def _prompt_scores(params, ids, *, config: GPTConfig):
    """Scores of ids[1:] each given the ids before it: ids [P] (right-padded)."""
    logits = GPT(config).apply({"params": params}, ids[None, :-1])[0, :, :config.vocab_size]
    return token_scores(logits, ids[1:])


def prompt_scores(params, config: GPTConfig, ids: list[int]) -> list[Scored]:
    """The `Scored` of every token of `ids` but the first, each given all the tokens before it:
    one forward pass of the prompt right-padded to a power-of-two bucket (one compile each)."""
    if len(ids) < 2:
        return []
    P = prompt_bucket(len(ids) - 1, config.context_length) + 1
    padded = np.zeros(P, np.int32)
    padded[:len(ids)] = ids
    chosen, top_ids, top_lp = _prompt_scores(params, padded, config=config)
    n = len(ids) - 1
    return scored_rows(padded[1:][:n], chosen[:n], top_ids[:n], top_lp[:n])


# --- the API's shapes ---

def token_bytes(tokenizer, token: int) -> bytes:
    """The bytes one token stands for (a piece of a UTF-8 character, possibly)."""
    single = getattr(tokenizer, "decode_single_token_bytes", None)
    if single is not None:
        return single(token)
    return tokenizer.decode([token]).encode("utf-8")


def _text(tokenizer, token: int) -> str:
    return token_bytes(tokenizer, token).decode("utf-8", errors="replace")


def completion_logprobs(tokenizer, prompt: list[int] | None, prompt_scored: list[Scored],
                        generated: list[Scored], n: int, offset: int = 0) -> dict:
    """/v1/completions' `logprobs` object: the prompt's tokens first when echoed (`prompt`
    given; its first token null), then the generated ones; `n` alternatives per token, the
    chosen token among them as OpenAI lists it; text offsets from `offset`."""
    tokens, lps, tops = [], [], []
    if prompt is not None:
        tokens.append(prompt[0])
        lps.append(None)
        tops.append(None)
    for s in [*prompt_scored, *generated]:
        tokens.append(s.token)
        lps.append(s.logprob)
        top = {_text(tokenizer, i): p for i, p in zip(s.top_ids[:n], s.top_logprobs[:n])}
        top.setdefault(_text(tokenizer, s.token), s.logprob)
        tops.append(top)
    texts = [_text(tokenizer, t) for t in tokens]
    offsets = list(np.cumsum([offset] + [len(t) for t in texts[:-1]])) if texts else []
    return {"tokens": texts, "token_logprobs": lps, "top_logprobs": tops,
            "text_offset": [int(o) for o in offsets]}


def _entry(tokenizer, token: int, logprob: float) -> dict:
    raw = token_bytes(tokenizer, token)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob,
            "bytes": list(raw)}


def chat_logprobs(tokenizer, generated: list[Scored], n: int) -> dict:
    """/v1/chat/completions' `logprobs` object for the generated tokens, `n` alternatives each."""
    return {"content": [{**_entry(tokenizer, s.token, s.logprob),
                         "top_logprobs": [_entry(tokenizer, i, p) for i, p in
                                          zip(s.top_ids[:n], s.top_logprobs[:n])]}
                        for s in generated], "refusal": None}
