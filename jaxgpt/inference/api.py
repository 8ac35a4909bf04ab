"""The OpenAI API's side of the server (`jaxgpt.inference.server`): request bodies parsed into
engine jobs, chat messages rendered with the model's prompt template, and generated tokens
turned into text that stops at stop strings. Nothing here touches the network or the device.

Parsing here checks the JSON's shape (types, presence, the protocol's own fields: model, n,
stop, stream) and refuses by name a field the endpoint does not know, or one of the OpenAI
API it does not implement (logprobs, echo...) unless its value turns it off; the values
(token counts, sampling options, the prompt and its length) are checked by
`jaxgpt.inference.requests.check_request`, as for every other caller. A bad request
raises `ApiError` with the status and the OpenAI error body {"error": {"message", "type",
"param", "code"}}, naming the field and the value.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from jaxgpt.data.prompts import get_template
from jaxgpt.data.tokenizer import TextDecoder
from jaxgpt.inference.requests import RequestError, check_request
from jaxgpt.inference.sampling import Sampling

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # as OpenAI's /v1/completions
MAX_STOPS = 4


class ApiError(Exception):
    """An error answered as {"error": {...}} with an HTTP status."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.type, self.code = status, param, type, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass
class Job:
    """One checked request: what the engine needs, and what the reply needs."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None
    stops: list[str]
    stream: bool
    include_usage: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, self.top_p)


# --- chat templates ---

def chat_renderer(template_name: str) -> Callable[[list[dict]], tuple[str, list[str]]]:
    """The function that renders a conversation for this model: messages -> (prompt text, stop
    strings that mean the model began a new turn). GPT-2 models use their instruction template
    (jaxgpt/data/prompts.py: alpaca, phi3); a Llama 3 / Qwen3 model renders with its
    own chat template (`family_chat_renderer`)."""
    template = get_template(template_name)

    def render(messages: list[dict]) -> tuple[str, list[str]]:
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        turns = [m for m in messages if m["role"] != "system"]
        if not turns or turns[-1]["role"] != "user":
            raise ApiError("messages must end with a user message", "messages")
        text, first = "", True
        for m in turns:
            if m["role"] == "user":
                instruction = f"{system}\n\n{m['content']}" if first and system else m["content"]
                text += template.query({"instruction": instruction, "input": ""})
                first = False
            else:  # an assistant's earlier reply closes its turn
                text += m["content"] + "\n\n"
        return text, list(template.turn_starts)

    return render


def family_chat_renderer(tokenizer) -> Callable[[list[dict]], tuple[str, list[str]]]:
    """The renderer of a model with its own chat template (a FamilyTokenizer's): the messages
    as transformers' apply_chat_template(add_generation_prompt=True) writes them. No stop
    strings: the end-of-turn ids stop a reply. A model without a template (a base model) still
    serves completions; its chat requests are refused in one line."""

    def render(messages: list[dict]) -> tuple[str, list[str]]:
        try:
            return tokenizer.render_chat(messages, add_generation_prompt=True), []
        except ValueError as err:  # no template, or it refused the conversation (role order)
            raise ApiError(str(err), "messages") from None

    return render


# --- checking request bodies ---

def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _get(body: dict, name: str, check: Callable[[Any], bool], what: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise ApiError(f"'{name}' must be {what}, got {value!r}", name)
    return value


# The fields each endpoint reads (`user` only names the caller: nothing to do with it).
OPTION_FIELDS = frozenset({"model", "n", "temperature", "top_p", "top_k", "seed", "stop",
                           "stream", "stream_options", "max_tokens", "max_completion_tokens",
                           "user"})
ENDPOINT_FIELDS = {"/v1/completions": OPTION_FIELDS | {"prompt"},
                   "/v1/chat/completions": OPTION_FIELDS | {"messages"}}
# Fields of the OpenAI API this server does not implement: accepted only at a value that
# turns them off (null always does), refused by name otherwise rather than silently dropped.
NOT_IMPLEMENTED = {
    "/v1/completions": {"logprobs": (False, 0), "echo": (False,), "suffix": ("",),
                        "best_of": (1,), "presence_penalty": (0,), "frequency_penalty": (0,),
                        "logit_bias": ({},)},
    "/v1/chat/completions": {"logprobs": (False,), "top_logprobs": (0,),
                             "presence_penalty": (0,), "frequency_penalty": (0,),
                             "logit_bias": ({},), "tools": ([],), "tool_choice": ("none",),
                             "response_format": ({"type": "text"},)},
}


def check_fields(body: dict, endpoint: str) -> None:
    """Refuse, naming it, a field `endpoint` does not know or implements only as off."""
    off = NOT_IMPLEMENTED[endpoint]
    for name, value in body.items():
        if name in ENDPOINT_FIELDS[endpoint] or (name in off and _is_off(value, off[name])):
            continue
        if name in off:
            raise ApiError(f"'{name}' is not supported by this server, got {_short(value)} "
                           f"(only null or {' or '.join(map(json.dumps, off[name]))})", name)
        raise ApiError(f"'{name}' is not a field of {endpoint} on this server", name)


def _is_off(value, offs: tuple) -> bool:
    """null, or one of `offs` (a boolean only matching a boolean: true is not 1)."""
    return value is None or any(value == o and isinstance(value, bool) == isinstance(o, bool)
                                for o in offs)


def parse_options(body: Any, model_names: list[str], vocab_size: int,
                  endpoint: str = "/v1/completions") -> dict:
    """The options every endpoint shares, their JSON shape checked (values: `_fit`), and no
    field `endpoint` does not know."""
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(body).__name__}")
    check_fields(body, endpoint)
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError("'model' must be a string naming the model (see GET /v1/models)", "model")
    if model not in model_names:
        raise ApiError(f"the model '{model}' does not exist; this server serves "
                       f"'{model_names[0]}'", "model", code="model_not_found")
    n = _get(body, "n", _is_int, "an integer", 1)
    if n != 1:
        raise ApiError(f"'n' must be 1 (one choice per request), got {n}", "n")
    temperature = _get(body, "temperature", _is_number, "a number", 1.0)
    top_p = _get(body, "top_p", _is_number, "a number", 1.0)
    top_k = _get(body, "top_k", _is_int, "an integer", None)
    seed = _get(body, "seed", _is_int, "an integer", None)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not (isinstance(stops, list) and all(isinstance(s, str) and s for s in stops)) \
            or len(stops) > MAX_STOPS:
        raise ApiError(f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of "
                       f"them, got {stop!r}", "stop")
    stream = _get(body, "stream", lambda x: isinstance(x, bool), "a boolean", False)
    stream_options = _get(body, "stream_options", lambda x: isinstance(x, dict), "an object", {})
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError("'stream_options.include_usage' must be a boolean", "stream_options")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get(body, name, _is_int, "an integer", None)
    # A top_k past the vocabulary keeps every token: it is cut to the vocabulary.
    return dict(temperature=temperature, top_p=top_p,
                top_k=None if top_k is None else min(top_k, vocab_size), seed=seed, stops=stops,
                stream=stream, include_usage=include_usage and stream, max_tokens=max_tokens,
                max_tokens_name=name)


def _fit(opts: dict, prompt_ids: list[int], max_len: int, vocab_size: int, default: int | None,
         param: str) -> Job:
    """The job, its values checked: max_tokens when not given fills what the context leaves
    (at most `default`)."""
    max_tokens, name = opts.pop("max_tokens"), opts.pop("max_tokens_name")
    sampling = Sampling(opts["temperature"], opts["top_k"], opts["top_p"])
    try:
        check_request(max_tokens, sampling, vocab_size=vocab_size, max_len=max_len,
                      prompt=prompt_ids, name=name)
    except RequestError as err:
        where = {"max_tokens": name, "prompt": param}.get(err.field, err.field)
        shown = "the prompt" if where == "messages" else f"'{where}'"  # a rendered chat
        raise ApiError(err.describe(shown), where, code=err.code) from None
    room = max_len - len(prompt_ids)
    if max_tokens is None:
        max_tokens = room if default is None else min(default, room)
    top_p = opts.pop("top_p")
    return Job(prompt_ids=prompt_ids, max_tokens=max_tokens,
               temperature=float(opts.pop("temperature")),
               top_p=None if top_p == 1 else float(top_p), **opts)


def parse_completion(body: Any, tokenizer, model_names: list[str], max_len: int,
                     vocab_size: int) -> Job:
    """A /v1/completions body: `prompt` is a string, a list of one, or a list of token ids."""
    opts = parse_options(body, model_names, vocab_size, "/v1/completions")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):  # a family's tokenizer adds its BOS, as transformers does
        ids = tokenizer.encode_text(prompt) if hasattr(tokenizer, "encode_text") \
            else tokenizer.encode(prompt, disallowed_special=())
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        ids = list(prompt)
    else:
        raise ApiError("'prompt' must be a string, a list of one string or a list of token ids, "
                       f"got {_short(prompt)}", "prompt")
    return _fit(opts, ids, max_len, vocab_size, COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt")


def parse_chat(body: Any, tokenizer, model_names: list[str], max_len: int, vocab_size: int,
               render: Callable[[list[dict]], tuple[str, list[str]]]) -> Job:
    """A /v1/chat/completions body: `messages` rendered by the model's chat template."""
    opts = parse_options(body, model_names, vocab_size, "/v1/chat/completions")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(f"'messages' must be a non-empty list, got {_short(messages)}", "messages")
    plain = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise ApiError(f"messages[{i}].content may hold only text parts",
                               f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(content, str):
            raise ApiError(f"messages[{i}] must be an object with a role (system, user or "
                           f"assistant) and text content, got {_short(m)}", f"messages[{i}]")
        plain.append({"role": m["role"], "content": content})
    text, turn_stops = render(plain)
    opts["stops"] = opts["stops"] + [s for s in turn_stops if s not in opts["stops"]]
    return _fit(opts, tokenizer.encode(text, disallowed_special=()), max_len, vocab_size, None,
                "messages")


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --- tokens to text ---

class TextStream:
    """Text of generated tokens, released as it becomes safe: an incomplete UTF-8 character or
    a possible start of a stop string is held back; at a stop string the text ends before it."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.decoder = TextDecoder(tokenizer)
        self.text, self.sent, self.stopped = "", 0, False

    def feed(self, token: int | None) -> str:
        """The new text to send after `token` (None: the end, flush everything)."""
        if self.stopped:
            return ""
        self.text += self.decoder.flush() if token is None else self.decoder.feed(token)
        hits = [i for s in self.stops if (i := self.text.find(s)) >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            end = len(self.text)
        elif token is None:
            end = len(self.text)
        else:
            end = len(self.text) - self._held()
        delta, self.sent = self.text[self.sent:end], max(self.sent, end)
        return delta

    def _held(self) -> int:
        """The longest end of the text that begins some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
