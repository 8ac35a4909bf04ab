"""An OpenAI-compatible HTTP server over the continuous-batching engine (jaxgpt/inference/server.py).

  python -m jaxgpt.cli.serve --model SOURCE [--host 127.0.0.1 --port 8000 --slots 8]

SOURCE is anything `jaxgpt.load_model` takes (a GPT-2 name, an exported or Hugging Face
directory, a run directory, finetuned or LoRA); a Llama 3 / Qwen3 directory brings its own
tokenizer.json, chat template and end-of-turn ids (`jaxgpt.data.tokenizer.model_tokenizer`).
Routes: POST /v1/completions and /v1/chat/completions (both with "stream": true as server-sent
events), GET /v1/models, GET /health, and GET / (a chat page). The engine loop runs in one
background thread; each request waits on its own asyncio queue, which the engine's thread
feeds. A full queue answers 429; a bad request 400 with an OpenAI-style error body (a field
the server does not know or implement is named); a body over --max-body-bytes 413; a client
that disconnects frees its slot.
"""

from __future__ import annotations

import argparse
import sys

from jaxgpt.entrypoint import USER_ERRORS, fail, setup_process


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
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest request body; more is answered 413 before it is read "
                   "(default: 32 bytes per position of --max-len, at least 1 MiB)")
    p.add_argument("--template", default=None, help="chat prompt format (default: a Llama/Qwen3 "
                   "directory's own chat template, else the run's, else alpaca)")
    p.add_argument("--name", default=None, help="the model's id in the API (default: the "
                   "source's last path part)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    setup_process()
    args = parse_args(argv)
    try:  # the serve extra, imported only here: the rest of jaxgpt runs without it
        import uvicorn

        from jaxgpt.inference.server import build_app, make_server
    except ImportError as err:
        if (err.name or "").split(".")[0] not in ("uvicorn", "starlette"):
            raise
        return fail(ImportError("serving needs uvicorn and starlette: pip install 'jaxgpt[serve]'"), 1)
    try:
        if not 0 <= args.port < 65536:
            raise ValueError(f"--port must be in [0, 65535], got {args.port}")
        if args.max_body_bytes is not None and args.max_body_bytes < 1:
            raise ValueError(f"--max-body-bytes must be at least 1, got {args.max_body_bytes}")
        server = make_server(args.model, slots=args.slots, max_queue=args.max_queue,
                             max_len=args.max_len, template=args.template, name=args.name)
        app = build_app(server, max_body_bytes=args.max_body_bytes)
    except USER_ERRORS as err:
        return fail(err, 1)
    print(f"serving {server.name} at http://{args.host}:{args.port}/ (OpenAI API under /v1)",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    server.engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
