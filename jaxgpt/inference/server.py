"""An OpenAI-compatible HTTP server over the continuous-batching engine (`Engine`).

`make_server(source)` loads a model (anything `jaxgpt.load_model` takes), starts its engine
thread and wraps it with the tokenizer and chat renderer in a `Server`; `build_app(server)` is
the Starlette application (the serve extra: starlette, uvicorn). Routes: POST /v1/completions
and /v1/chat/completions (both with "stream": true as server-sent events), GET /v1/models,
GET /health, and GET / (the chat page, this package's chat.html). Each request waits on its own
asyncio queue, which the engine's thread feeds. A full queue answers 429; a bad request 400
with an OpenAI-style error body; a body over the limit (`build_app(max_body_bytes=)`) 413
before it is read; a client that disconnects frees its slot. Bodies are parsed and tokenized
in a worker thread, so a long one does not stall the other requests.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from importlib import resources
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from jaxgpt.data.tokenizer import FamilyTokenizer, model_tokenizer
from jaxgpt.inference.api import (
    ApiError,
    Job,
    TextStream,
    chat_renderer,
    family_chat_renderer,
    parse_chat,
    parse_completion,
)
from jaxgpt.inference.engine import Engine, QueueFull, Request
from jaxgpt.inference.loading import load_chat_model


class Server:
    """The engine, the tokenizer and the chat template behind the routes."""

    def __init__(self, engine, tokenizer, name: str, render, stop_ids: tuple[int, ...],
                 aliases: tuple[str, ...] = ()):
        self.engine, self.tokenizer, self.name, self.render = engine, tokenizer, name, render
        self.names = [name, *[a for a in aliases if a != name]]
        self.stop_ids = tuple(stop_ids)  # any one ends a reply (a family's end of text or turn)
        self.created = int(time.time())

    def submit(self, job: Job, loop: asyncio.AbstractEventLoop):
        """Queue `job`; returns (request, asyncio.Queue of ("text", delta) and ("done", reason))."""
        events: asyncio.Queue = asyncio.Queue()
        put = lambda *event: loop.call_soon_threadsafe(events.put_nowait, event)  # noqa: E731
        text = TextStream(self.tokenizer, job.stops)

        def on_token(token: int, finish: str | None) -> bool:
            delta = text.feed(None if token in self.stop_ids else token)
            if finish is not None and not text.stopped:
                delta += text.feed(None)
            if delta:
                put("text", delta)
            return not text.stopped

        seed = job.seed if job.seed is not None else secrets.randbits(32)
        request = Request(job.prompt_ids, job.max_tokens, on_token, temperature=job.temperature,
                          top_k=job.top_k, top_p=job.top_p, seed=seed, stop_ids=self.stop_ids,
                          on_done=lambda reason: put("done", reason))
        try:
            self.engine.submit(request)
        except QueueFull as err:
            raise ApiError(str(err), status=429, type="rate_limit_error",
                           code="rate_limit_exceeded") from None
        except ValueError as err:
            raise ApiError(str(err)) from None
        except RuntimeError as err:  # the engine stopped
            raise ApiError(str(err), status=503, type="server_error") from None
        return request, events


def make_server(source: str, *, slots: int = 8, max_queue: int = 64, max_len: int | None = None,
                template: str | None = None, name: str | None = None) -> Server:
    """Load `source`, start its engine thread and wrap both for the routes."""
    config, params, chosen = load_chat_model(source, template)
    tokenizer, stop_ids = model_tokenizer(source, config)
    # A family's own chat template, unless --template names an instruction format (rendered as
    # text, then read by the model's tokenizer all the same).
    own = isinstance(tokenizer, FamilyTokenizer) and template is None
    render = family_chat_renderer(tokenizer) if own else chat_renderer(chosen)
    engine = Engine(params, config, slots=slots, max_len=max_len, max_queue=max_queue).start()
    shown = name or Path(str(source)).name or str(source)
    return Server(engine, tokenizer, shown, render, stop_ids, aliases=(str(source),))


def default_max_body_bytes(max_len: int) -> int:
    """The request-body limit for a context of `max_len` positions: 32 bytes a position (a
    token id list takes at most 7 bytes a token, text ~4 bytes a token, escaped several times
    that), and never under 1 MiB (chat histories, system prompts): far past any prompt the
    context holds, far below a body that would stall the server to read and tokenize."""
    return max(1 << 20, 32 * max_len)


def build_app(server: Server, *, max_body_bytes: int | None = None) -> Starlette:
    """The Starlette application; a request body over `max_body_bytes` (default:
    `default_max_body_bytes` of the engine's max_len) is refused 413 before it is read."""
    limit = default_max_body_bytes(server.engine.max_len) if max_body_bytes is None \
        else max_body_bytes
    if limit < 1:
        raise ValueError(f"max_body_bytes must be at least 1, got {limit}")

    async def models(_):
        return JSONResponse({"object": "list", "data": [
            {"id": server.name, "object": "model", "created": server.created,
             "owned_by": "jaxgpt"}]})

    async def health(_):
        load = server.engine.load()
        if server.engine.error is not None:
            return JSONResponse({"status": "error", "error": str(server.engine.error), **load},
                                status_code=503)
        return JSONResponse({"status": "ok", "model": server.name, **load})

    async def page(_):
        return HTMLResponse(resources.files("jaxgpt.inference").joinpath("chat.html").read_text())

    async def not_found(http: HttpRequest, exc):
        status = getattr(exc, "status_code", 404)
        return _error(ApiError(f"{http.method} {http.url.path}: {getattr(exc, 'detail', '')}",
                               status=status, type="invalid_request_error"))

    return Starlette(routes=[
        Route("/", page), Route("/health", health), Route("/v1/models", models),
        Route("/v1/completions", _endpoint(server, False, limit), methods=["POST"]),
        Route("/v1/chat/completions", _endpoint(server, True, limit), methods=["POST"]),
    ], exception_handlers={404: not_found, 405: not_found})


def _endpoint(server: Server, chat: bool, max_body_bytes: int):
    """The handler of /v1/chat/completions (chat) or /v1/completions."""
    engine = server.engine

    def parse(raw: bytes) -> tuple[dict, Job]:
        body = _json(raw)
        if chat:
            return body, parse_chat(body, server.tokenizer, server.names, engine.max_len,
                                    engine.config.vocab_size, server.render)
        return body, parse_completion(body, server.tokenizer, server.names, engine.max_len,
                                      engine.config.vocab_size)

    async def handle(http: HttpRequest):
        try:
            raw = await _read_body(http, max_body_bytes)
            # JSON and tokenizing take a while for a long body: in a thread, not the loop.
            body, job = await asyncio.to_thread(parse, raw)
            request, events = server.submit(job, asyncio.get_running_loop())
        except ApiError as err:
            return _error(err)
        reply = _Reply(chat, job, request, {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}",
            "created": int(time.time()), "model": body["model"]})
        if job.stream:
            return StreamingResponse(reply.stream(events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await reply.whole(http, events)

    return handle


class _Reply:
    """One request's answer, streamed as server-sent events or whole, from its engine events."""

    def __init__(self, chat: bool, job: Job, request, head: dict):
        self.chat, self.job, self.request, self.head = chat, job, request, head
        self.kind = "chat.completion" if chat else "text_completion"

    def choice(self, text: str | None, finish: str | None, first: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta = {"role": "assistant", "content": text or ""} if first else \
            ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def usage(self) -> dict:
        n, generated = len(self.job.prompt_ids), self.request.generated
        return {"prompt_tokens": n, "completion_tokens": generated,
                "total_tokens": n + generated}

    async def stream(self, events: asyncio.Queue):
        obj = f"{self.kind}.chunk" if self.chat else self.kind
        chunk = lambda choices, **more: _sse(  # noqa: E731
            {**self.head, "object": obj, "choices": choices, **more})
        try:
            if self.chat:
                yield chunk([self.choice("", None, first=True)])
            while True:
                what, value = await events.get()
                if what == "text":
                    yield chunk([self.choice(value, None)])
                    continue
                if value in ("error", "cancelled"):
                    yield _sse(_failed().body())
                else:
                    yield chunk([self.choice(None, value)])
                    if self.job.include_usage:
                        yield chunk([], usage=self.usage())
                yield "data: [DONE]\n\n"
                return
        finally:  # the client went away (or the reply ended): free the slot either way
            self.request.cancelled.set()

    async def whole(self, http: HttpRequest, events: asyncio.Queue):
        parts = []
        try:
            while True:
                try:
                    what, value = await asyncio.wait_for(events.get(), 0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                if what == "text":
                    parts.append(value)
                    continue
                if value in ("error", "cancelled"):
                    return _error(_failed())
                text = "".join(parts)
                out = {"index": 0, "logprobs": None, "finish_reason": value}
                out.update({"message": {"role": "assistant", "content": text}} if self.chat
                           else {"text": text})
                return JSONResponse({**self.head, "object": self.kind, "system_fingerprint": None,
                                     "choices": [out], "usage": self.usage()})
        finally:
            self.request.cancelled.set()


async def _read_body(http: HttpRequest, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to pass `limit` bytes: by its
    Content-Length before reading any, else (chunked) when what has come passes it."""
    length = http.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _too_large(limit, f"{int(length)} bytes")
    parts, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit, f"more than {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def _too_large(limit: int, got: str) -> ApiError:
    return ApiError(f"the request body must be at most {limit} bytes (the server's "
                    f"--max-body-bytes), got {got}", status=413, code="request_too_large")


def _json(raw: bytes):
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(f"the request body is not valid JSON: {err}") from None


def _error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _failed() -> ApiError:
    return ApiError("the engine failed on this request", status=500, type="server_error")


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"
