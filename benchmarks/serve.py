"""Serving load: concurrent streaming clients of `jaxgpt.cli.serve` vs the same requests run one
after another through `jaxgpt.generate`, in one invocation.

  python benchmarks/serve.py [--clients 1 8 32] [--requests-per-client 2] [--max-tokens 64]

GPT-2 small's shape with random weights (the default compute dtype), greedy. The server (the
library's Starlette app and continuous-batching engine, `--slots` sequences over a cache of
`--max-len` positions) runs in a thread of this process on a loopback port; the clients are
asyncio connections speaking HTTP/1.1 with "stream": true, each sending its requests one
after another. Every request is a prompt of 16-32 random token ids and `--max-tokens` new
tokens; a request that fails, or ends without `data: [DONE]`, is counted. Reported per level:
aggregate new tokens/s over the wall time, time to first token (send -> first text event)
p50/p99, inter-token latency (gaps between text events) p50/p99. The peer: the same requests'
prompts through `generate` (batch 1, the same max_new_tokens), one after another, after a
warm-up per prompt bucket; its tokens/s is the ratio's denominator. Bounded: every level has a
deadline (`--timeout`), and the run stops there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import best_time, hardware, matmul_floor  # noqa: E402  (benchmarks/common.py)

from jaxgpt.hostmem import retain_freed_memory  # noqa: E402

retain_freed_memory()  # before the first JAX computation (jaxgpt/hostmem.py)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxgpt import GPTConfig, init_params  # noqa: E402
from jaxgpt.inference.server import Server, build_app  # noqa: E402
from jaxgpt.inference.api import chat_renderer  # noqa: E402
from jaxgpt.inference.engine import Engine  # noqa: E402
from jaxgpt.inference.generate import generate  # noqa: E402
from jaxgpt.data.tokenizer import EOT_ID, get_tokenizer  # noqa: E402


async def stream_one(port: int, body: dict) -> dict:
    """One streaming request over a raw HTTP/1.1 connection: event times and the outcome."""
    sent = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json"
                 b"\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    while (await reader.readline()) not in (b"\r\n", b""):
        pass  # headers
    times, done, usage, buffer = [], False, None, b""
    try:
        while status == 200:
            size = int((await reader.readline()).strip() or b"0", 16)  # chunked encoding
            if size == 0:
                break
            buffer += (await reader.readexactly(size + 2))[:-2]  # the chunk, less its CRLF
            *events, buffer = buffer.split(b"\n\n")
            now = time.perf_counter()
            for event in events:
                payload = event.removeprefix(b"data: ")
                if payload == b"[DONE]":
                    done = True
                    continue
                chunk = json.loads(payload)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                elif chunk["choices"] and chunk["choices"][0]["text"]:
                    times.append(now)
    finally:
        writer.close()
    ok = status == 200 and done and usage is not None
    return {"ok": ok, "sent": sent, "times": times,
            "tokens": usage["completion_tokens"] if ok else 0}


async def run_level(port: int, prompts: list[list[int]], clients: int, per_client: int,
                    max_tokens: int, timeout: float) -> tuple[list[dict], float]:
    async def client(c: int) -> list[dict]:
        out = []
        for r in range(per_client):
            body = {"model": "bench", "prompt": prompts[(c * per_client + r) % len(prompts)],
                    "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            try:
                out.append(await stream_one(port, body))
            except (OSError, ValueError, asyncio.IncompleteReadError):
                out.append({"ok": False, "times": [], "tokens": 0})
        return out

    start = time.perf_counter()
    results = await asyncio.wait_for(asyncio.gather(*(client(c) for c in range(clients))), timeout)
    return [r for rs in results for r in rs], time.perf_counter() - start


def sequential_rate(params, config, prompts, max_tokens) -> float:
    """New tokens/s of `generate` over `prompts`, one after another (compiled beforehand)."""
    t0, tokens = time.perf_counter(), 0
    for ids in prompts:
        new = generate(params, config, [ids], max_tokens, eos_id=EOT_ID)[0, len(ids):]
        tokens += int(np.argmax(new == EOT_ID)) + 1 if EOT_ID in new else len(new)
    return tokens / (time.perf_counter() - t0)


def pct(values, q) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--max-len", type=int, default=96)
    p.add_argument("--sequential", type=int, default=16,
                   help="how many of the requests the generate peer runs (its rate is per token)")
    p.add_argument("--timeout", type=float, default=600.0, help="deadline per level, seconds")
    p.add_argument("--preset", default="gpt2-small")
    args = p.parse_args(argv)
    print(hardware())
    config = GPTConfig.preset(args.preset)
    params = jax.device_put(init_params(config, jax.random.key(0)))
    print(f"model: {args.preset} shape, random weights, dtype {config.dtype}; server: "
          f"{args.slots} slots x {args.max_len} positions; {args.max_tokens} new tokens/request")
    rng = np.random.default_rng(0)
    n_req = max(args.clients) * args.requests_per_client
    # Ids below EOT: a random model could still pick EOT and stop early; tokens are counted.
    prompts = [rng.integers(0, EOT_ID, rng.integers(16, 33)).tolist() for _ in range(n_req)]

    engine = Engine(params, config, slots=args.slots, max_len=args.max_len,
                    max_queue=n_req).start()
    server = Server(engine, get_tokenizer("gpt2"), "bench", chat_renderer("alpaca"), (EOT_ID,))
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    web = uvicorn.Server(uvicorn.Config(build_app(server), log_level="warning"))
    threading.Thread(target=web.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not web.started:
        time.sleep(0.05)

    # Warm-up: compile the prefill buckets (16, 32) and the decode step.
    t0 = time.perf_counter()
    asyncio.run(run_level(port, [prompts[0][:16], prompts[0]], 2, 1, 2, args.timeout))
    print(f"server warm-up (compiles): {time.perf_counter() - t0:.1f} s")

    # The peer: the same prompts through generate, one after another, before the levels and
    # again after them (the machine's load drifts; each level is compared with their mean).
    seq = prompts[:args.sequential]
    for length in (16, 32):
        generate(params, config, [seq[0][:length]], args.max_tokens, eos_id=EOT_ID)
    half = max(len(seq) // 2, 1)
    before = sequential_rate(params, config, seq[:half], args.max_tokens)
    print(f"sequential jaxgpt.generate, before: {half} requests, {before:.1f} tokens/s")

    rows = []
    for clients in args.clients:
        results, wall = asyncio.run(run_level(port, prompts, clients, args.requests_per_client,
                                              args.max_tokens, args.timeout))
        good = [r for r in results if r["ok"]]
        tokens = sum(r["tokens"] for r in good)
        ttft = [r["times"][0] - r["sent"] for r in good if r["times"]]
        itl = [b - a for r in good for a, b in zip(r["times"], r["times"][1:])]
        rows.append((clients, len(results), len(results) - len(good), tokens, tokens / wall,
                     ttft, itl))
        print(f"level {clients}: {tokens / wall:.1f} tokens/s", flush=True)
    after = sequential_rate(params, config, seq[half:] or seq, args.max_tokens)
    seq_rate = (before + after) / 2
    print(f"sequential jaxgpt.generate, after: {len(seq[half:] or seq)} requests, {after:.1f} "
          f"tokens/s; peer rate used: {seq_rate:.1f} tokens/s")
    one, full = (best_time(matmul_floor(config, rows), 5) for rows in (1, args.slots))
    print(f"matmul floor of a decode step (XLA, the matmuls alone): 1 row {one * 1e3:.0f} ms, "
          f"{args.slots} rows {full * 1e3:.0f} ms, i.e. {args.slots * one / full:.1f}x the tokens/s "
          f"of 1 row")
    print("\n| clients | requests | failed | tokens | tokens/s | vs sequential | TTFT p50 | "
          "TTFT p99 | ITL p50 | ITL p99 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for clients, n, failed, tokens, rate, ttft, itl in rows:
        print(f"| {clients} | {n} | {failed} | {tokens} | {rate:.1f} | {rate / seq_rate:.2f}x | "
              f"{pct(ttft, 50) * 1e3:.0f} ms | {pct(ttft, 99) * 1e3:.0f} ms | "
              f"{pct(itl, 50) * 1e3:.0f} ms | {pct(itl, 99) * 1e3:.0f} ms |")
    print(f"engine: {engine.load()}")
    web.should_exit = True
    engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
