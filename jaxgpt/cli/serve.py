"""An OpenAI-compatible HTTP server over the continuous-batching engine (jaxgpt/inference/engine.py).

  python -m jaxgpt.cli.serve --model SOURCE [--host 127.0.0.1 --port 8000 --slots 8]

SOURCE is anything `jaxgpt.load_model` takes (a GPT-2 name, an exported or Hugging Face
directory, a run directory, finetuned or LoRA); a Llama 3 / Qwen3 directory brings its own
tokenizer.json, chat template and end-of-turn ids (`jaxgpt.data.tokenizer.model_tokenizer`).
Routes: POST /v1/completions and /v1/chat/completions (both with "stream": true as server-sent
events), GET /v1/models, GET /health, and GET / (a chat page). The engine loop runs in one
background thread; each request waits on its own asyncio queue, which the engine's thread
feeds. A full queue answers 429; a bad request 400 with an OpenAI-style error body; a client
that disconnects frees its slot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
from importlib import resources
from pathlib import Path

from jaxgpt.entrypoint import USER_ERRORS, fail, setup_process
from jaxgpt.inference.api import (
    ApiError,
    Job,
    TextStream,
    chat_renderer,
    family_chat_renderer,
    parse_chat,
    parse_completion,
)


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
        from jaxgpt.inference.engine import QueueFull, Request

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


def _usage(job: Job, request) -> dict:
    return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": request.generated,
            "total_tokens": len(job.prompt_ids) + request.generated}


def build_app(server: Server):
    """The Starlette application."""
    from starlette.applications import Starlette
    from starlette.requests import Request as HttpRequest
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route

    def error(err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    async def read_json(http: HttpRequest):
        raw = await http.body()
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ApiError(f"the request body is not valid JSON: {err}") from None

    def endpoint(chat: bool):
        kind = "chat.completion" if chat else "text_completion"

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            delta = {"role": "assistant", "content": text or ""} if first else \
                ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        async def handle(http: HttpRequest):
            cfg, engine = server.engine.config, server.engine
            try:
                body = await read_json(http)
                parse = parse_chat if chat else parse_completion
                extra = (server.render,) if chat else ()
                job = parse(body, server.tokenizer, server.names, engine.max_len,
                            cfg.vocab_size, *extra)
                request, events = server.submit(job, asyncio.get_running_loop())
            except ApiError as err:
                return error(err)
            head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}",
                    "created": int(time.time()), "model": body["model"]}
            if job.stream:
                return StreamingResponse(_stream(job, request, events, head, kind, choice),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            return await _whole(http, job, request, events, head, kind)

        async def _stream(job, request, events, head, kind, choice):
            obj = f"{kind}.chunk" if chat else kind
            sse = lambda d: f"data: {json.dumps(d)}\n\n"  # noqa: E731
            try:
                if chat:
                    yield sse({**head, "object": obj, "choices": [choice("", None, first=True)]})
                while True:
                    what, value = await events.get()
                    if what == "text":
                        yield sse({**head, "object": obj, "choices": [choice(value, None)]})
                        continue
                    if value in ("error", "cancelled"):
                        yield sse(ApiError("the engine failed on this request", status=500,
                                           type="server_error").body())
                    else:
                        yield sse({**head, "object": obj, "choices": [choice(None, value)]})
                        if job.include_usage:
                            yield sse({**head, "object": obj, "choices": [],
                                       "usage": _usage(job, request)})
                    yield "data: [DONE]\n\n"
                    return
            finally:  # the client went away (or the reply ended): free the slot either way
                request.cancelled.set()

        async def _whole(http, job, request, events, head, kind):
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
                        return error(ApiError("the engine failed on this request", status=500,
                                              type="server_error"))
                    text = "".join(parts)
                    out = {"index": 0, "logprobs": None, "finish_reason": value}
                    out.update({"message": {"role": "assistant", "content": text}} if chat
                               else {"text": text})
                    return JSONResponse({**head, "object": kind, "system_fingerprint": None,
                                         "choices": [out], "usage": _usage(job, request)})
            finally:
                request.cancelled.set()

        return handle

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
        return error(ApiError(f"{http.method} {http.url.path}: {getattr(exc, 'detail', '')}",
                              status=status, type="invalid_request_error"))

    return Starlette(routes=[
        Route("/", page), Route("/health", health), Route("/v1/models", models),
        Route("/v1/completions", endpoint(False), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(True), methods=["POST"]),
    ], exception_handlers={404: not_found, 405: not_found})


def make_server(source: str, *, slots: int = 8, max_queue: int = 64, max_len: int | None = None,
                template: str | None = None, name: str | None = None) -> Server:
    """Load `source`, start its engine thread and wrap both for the routes."""
    from jaxgpt.cli.chat import load_chat_model
    from jaxgpt.inference.engine import Engine
    from jaxgpt.data.tokenizer import FamilyTokenizer, model_tokenizer

    config, params, chosen = load_chat_model(source, template)
    tokenizer, stop_ids = model_tokenizer(source, config)
    # A family's own chat template, unless --template names an instruction format (rendered as
    # text, then read by the model's tokenizer all the same).
    own = isinstance(tokenizer, FamilyTokenizer) and template is None
    render = family_chat_renderer(tokenizer) if own else chat_renderer(chosen)
    engine = Engine(params, config, slots=slots, max_len=max_len, max_queue=max_queue).start()
    shown = name or Path(str(source)).name or str(source)
    return Server(engine, tokenizer, shown, render, stop_ids, aliases=(str(source),))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxgpt.cli.serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="gpt2[-medium...], a model or run directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; more are answered 429")
    p.add_argument("--max-len", type=int, default=None,
                   help="cache positions per slot, prompt plus reply (default: the context)")
    p.add_argument("--template", default=None, help="chat prompt format (default: a Llama/Qwen3 "
                   "directory's own chat template, else the run's, else alpaca)")
    p.add_argument("--name", default=None, help="the model's id in the API (default: the "
                   "source's last path part)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    setup_process()
    args = parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        return fail(ImportError("serving needs uvicorn and starlette: pip install 'jaxgpt[serve]'"), 1)
    try:
        if not 0 <= args.port < 65536:
            raise ValueError(f"--port must be in [0, 65535], got {args.port}")
        server = make_server(args.model, slots=args.slots, max_queue=args.max_queue,
                             max_len=args.max_len, template=args.template, name=args.name)
    except USER_ERRORS as err:
        return fail(err, 1)
    print(f"serving {server.name} at http://{args.host}:{args.port}/ (OpenAI API under /v1)",
          file=sys.stderr, flush=True)
    uvicorn.run(build_app(server), host=args.host, port=args.port, log_level="warning")
    server.engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
