"""Continuous batching: a fixed set of sequence slots over one on-device KV cache.

An `Engine` holds `slots` sequences at once in a cache {"k", "v"} [L, N, H, S, K] that never
leaves the device. Its loop (`run`, one background thread) repeats:

- admit waiting requests into every free slot;
- one prefill call for the prompts being read: those whose next piece has the same padded
  width go together (at most `prefill_rows`), B rows (padded to a power of two) x a
  power-of-two width, one compile per (B, width). A prompt longer than `prefill_chunk` is read a piece per call, each piece
  attending to what its row already holds, so a long prompt is read between decode steps
  instead of stalling them;
- a decode step for every slot together, each row at its own position (the model's per-row
  `cache_index`); `steps_per_dispatch` steps in one call (a scan) when nothing waits to be read
  and every running request has that many tokens left, else one;
- hand each new token to its request, and free the slots of requests that are done (a stop
  token, `max_tokens`, their `on_token` said stop, or they were cancelled).

Rows that are free or still reading their prompt run in the decode step too (the shape is
fixed) at position S, past the cache: their writes are dropped and their results ignored.
Tokens a request gets after it ends (a multi-step dispatch runs on) are dropped the same way.

Each slot's tokens sit at cache positions 0, 1, ... whatever the other slots hold, and every
row is computed on its own, so a request's output depends only on itself (how prompts were
grouped or cut, how many steps ran per dispatch): token n of a sampled request is drawn with
`fold_in(key(seed), n)`. The sampler is `generate`'s
(`jaxgpt.inference.sampling`, with options per row), so greedy decoding picks what `generate`
picks, and a sampled request draws what `generate` draws for its prompt alone with
key=jax.random.key(seed).

A request with `logprobs` set gets each new token's `Scored` (its log-probability under the
model and the `MAX_TOP` most likely tokens, `jaxgpt.inference.logprobs`) in `scores` before its
`on_token` sees the token; the steps compute them only while some running request asked.

The host-side checks (`jaxgpt.inference.requests.check_request`) refuse a request in one line
before it is queued.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxgpt.config import GPTConfig
from jaxgpt.inference.logprobs import MAX_TOP, Scored, scored_rows, token_scores
from jaxgpt.inference.requests import check_request, prompt_bucket
from jaxgpt.inference.sampling import Sampling, row_keys, sample
from jaxgpt.models.cache import init_cache
from jaxgpt.models.model import GPT, head_logits


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue holds max_queue requests."""


@dataclass(eq=False)
class Request:
    """One sequence to continue. `on_token(token, finish)` is called from the engine's thread
    for each new token (finish: None, "stop" or "length") and returns False to end it there."""

    prompt: list[int]
    max_tokens: int
    on_token: Callable[[int, str | None], bool]
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    on_done: Callable[[str], None] | None = None  # finish reason: stop, length or cancelled
    logprobs: bool = False  # record each new token's Scored in `scores`
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: int = 0
    scores: list[Scored] = field(default_factory=list)

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, self.top_p)


def _scored(logits, tokens, scores: bool):
    """token_scores of the drawn tokens, or None when nobody asked (nothing computed)."""
    return token_scores(logits, tokens, MAX_TOP) if scores else None


@functools.partial(jax.jit, static_argnames=("config", "scores"), donate_argnames=("cache",))
def _prefill(params, cache, ids, starts, lengths, rows, sampling: Sampling, draws, *, config,
             scores: bool = False):
    """Prompt pieces ids [B, C] (right-padded; lengths [B] real tokens) read into rows [B] of the
    cache [L, N, H, S, K] at positions starts [B].., each attending to what its row holds before
    them. Returns the cache, the token [B] each row draws after its piece with its options [B]
    and draw (seed [B], count [B]), whether its logits are finite [B], and with `scores` their
    token_scores. Rows repeated to pad B are exact copies: their writes agree."""
    C = ids.shape[1]
    held = {n: cache[n][:, rows] for n in cache}  # [L, B, H, S, K]
    hidden, held = GPT(config).apply(
        {"params": params}, ids, positions=starts[:, None] + jnp.arange(C)[None, :], cache=held,
        cache_index=starts, return_hidden=True)  # [B, C, D]
    cache = {n: cache[n].at[:, rows].set(held[n]) for n in cache}
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
    logits = head_logits(params, config, last)  # [B, V]
    first = sample(logits, row_keys(*draws), sampling)
    return cache, first, jnp.all(jnp.isfinite(logits), axis=-1), _scored(logits, first, scores)


@functools.partial(jax.jit, static_argnames=("config", "scores", "steps"),
                   donate_argnames=("cache",))
def _decode(params, cache, tokens, positions, sampling: Sampling, draws, *, config,
            scores: bool = False, steps: int = 1):
    """`steps` tokens for every slot: tokens [N] fed at positions [N], each row its own, each
    new token fed back; returns the cache with their keys and values written, the tokens
    [steps, N], drawn with each slot's options [N] and draw (seed [N], count [N] + step), and
    with `scores` their token_scores [steps, ...]. A row at position S (past the cache) stays
    there: its writes are dropped."""
    seed, count = draws
    S = cache["k"].shape[3]

    def step(carry, _):
        cache, tokens, positions, count = carry
        logits, cache = GPT(config).apply(
            {"params": params}, tokens[:, None], positions=positions[:, None], cache=cache,
            cache_index=positions)  # [N, 1, V]
        logits = logits[:, 0, :config.vocab_size]
        nxt = sample(logits, row_keys(seed, count), sampling)
        carry = (cache, nxt, jnp.minimum(positions + 1, S), count + 1)
        return carry, (nxt, _scored(logits, nxt, scores))

    (cache, *_), (out, scored) = lax.scan(step, (cache, tokens, positions, count), None,
                                          length=steps)
    return cache, out, scored


decode_step = _decode  # public: jaxgpt.plan compiles the engine's decode step for a target


class Engine:
    """`slots` sequences decoded together over a cache of `max_len` positions (the context by
    default). `submit` from any thread; `run` (or `start`) the loop in one thread."""

    def __init__(self, params, config: GPTConfig, *, slots: int = 8, max_len: int | None = None,
                 max_queue: int = 64, prefill_chunk: int = 256, prefill_rows: int | None = None,
                 steps_per_dispatch: int = 4):
        max_len = config.context_length if max_len is None else max_len
        if not 1 <= max_len <= config.context_length:
            raise ValueError(f"max_len must be in [1, {config.context_length}], got {max_len}")
        if slots < 1 or max_queue < 0:
            raise ValueError(f"slots must be >= 1 and max_queue >= 0, got {slots}, {max_queue}")
        prefill_rows = slots if prefill_rows is None else prefill_rows
        if min(prefill_chunk, prefill_rows, steps_per_dispatch) < 1:
            raise ValueError(f"prefill_chunk, prefill_rows and steps_per_dispatch must be >= 1, "
                             f"got {prefill_chunk}, {prefill_rows}, {steps_per_dispatch}")
        self.params, self.config = jax.device_put(params), config
        self.slots, self.max_len, self.max_queue = slots, max_len, max_queue
        self.prefill_chunk, self.prefill_rows = prefill_chunk, prefill_rows
        self.steps_per_dispatch = steps_per_dispatch
        self.cache = init_cache(config, slots, max_len)  # {"k", "v"} [L, N, H, S, K]
        self.active: list[Request | None] = [None] * slots
        self.reading: list[int] = []  # slots whose prompt is being read, oldest first
        self.read = np.zeros(slots, np.int32)  # how much of its prompt each slot has read
        self.tokens = np.zeros(slots, np.int32)  # the token each slot feeds next
        self.positions = np.full(slots, max_len, np.int32)  # where it goes (S: nowhere)
        self.opts = {"temperature": np.zeros(slots, np.float32),
                     "top_k": np.full(slots, config.vocab_size, np.int32),
                     "top_p": np.ones(slots, np.float32), "seed": np.zeros(slots, np.uint32),
                     "count": np.zeros(slots, np.int32)}
        self.waiting: queue.Queue[Request] = queue.Queue()
        self._pending = 0  # requests submitted, not yet admitted (waiting.qsize() is approximate)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = {"admitted": 0, "finished": 0, "cancelled": 0, "steps": 0, "tokens": 0,
                      "prefills": 0, "dispatches": 0}
        self.error: BaseException | None = None

    # --- the client side ---

    def submit(self, request: Request) -> None:
        """Queue a checked request; QueueFull when max_queue requests already wait."""
        check_request(request.max_tokens, request.sampling, vocab_size=self.config.vocab_size,
                      max_len=self.max_len, prompt=request.prompt)
        if self.error is not None:
            raise RuntimeError(f"the engine stopped: {self.error}")
        with self._lock:  # free slots take queued requests first; max_queue more may wait
            if self._waiting() >= self.max_queue:
                raise QueueFull(f"the server is at capacity: {self.slots} sequences running and "
                                f"{self._waiting()} waiting (max_queue={self.max_queue}); "
                                "retry later")
            self._pending += 1
        self.waiting.put(request)
        self._wake.set()

    def free_slots(self) -> int:
        return sum(r is None for r in self.active)

    def _waiting(self) -> int:
        """Queued requests beyond those the free slots will take: what max_queue bounds."""
        return max(self._pending - self.free_slots(), 0)

    def load(self) -> dict:
        """What the engine holds now: running sequences, requests waiting for a slot (beyond
        the free ones; max_queue bounds them), all queued (not yet admitted), the counters."""
        return {"running": self.slots - self.free_slots(), "waiting": self._waiting(),
                "queued": self._pending, "slots": self.slots, **self.stats}

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self.run, name="jaxgpt-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    # --- the loop ---

    def run(self) -> None:
        """Admit, decode, deliver until `stop`; an unexpected error ends every request."""
        try:
            while not self._stop.is_set():
                self._admit()
                self._drop_cancelled()
                if self.free_slots() == self.slots:
                    self._wake.wait(0.1)
                    self._wake.clear()
                    continue
                if self.reading:
                    self._prefill()
                self._step()
        except BaseException as err:  # noqa: BLE001 - reported to every request, then raised
            self.error = err
            for slot, r in enumerate(self.active):
                if r is not None:
                    self._finish(slot, "error")
            while (r := self._next_waiting()) is not None:
                self._report_done(r, "error")
            raise

    def _admit(self) -> None:
        for slot in range(self.slots):
            if self.active[slot] is not None:
                continue
            request = self._claim(slot)
            if request is None:
                return
            self._set_slot(slot, request)
            self.read[slot] = 0
            self.reading.append(slot)

    def _drop_cancelled(self) -> None:
        for slot, r in enumerate(self.active):
            if r is not None and r.cancelled.is_set():
                self._finish(slot, "cancelled")

    def _claim(self, slot: int) -> Request | None:
        """The next live queued request, put in `slot` in one step under the lock: `submit`
        never sees it neither queued nor in its slot (which would let one more in)."""
        while True:
            with self._lock:
                try:
                    request = self.waiting.get_nowait()
                except queue.Empty:
                    return None
                self._pending -= 1
                if not request.cancelled.is_set():
                    self.active[slot] = request
                    return request
            self._report_done(request, "cancelled")

    def _next_waiting(self) -> Request | None:
        while True:
            try:
                request = self.waiting.get_nowait()
            except queue.Empty:
                return None
            with self._lock:
                self._pending -= 1
            if not request.cancelled.is_set():
                return request
            self._report_done(request, "cancelled")

    def _set_slot(self, slot: int, r: Request) -> None:
        o = self.opts
        o["temperature"][slot] = r.temperature
        o["top_k"][slot] = self.config.vocab_size if r.top_k is None else r.top_k
        o["top_p"][slot] = 1.0 if r.top_p is None else r.top_p
        o["seed"][slot] = r.seed % (1 << 32)
        o["count"][slot] = 0

    def _options(self, rows: slice) -> tuple[Sampling, tuple]:
        """The sampling options and draws (seed, count) of these slots, one per row."""
        o = {k: v[rows] for k, v in self.opts.items()}
        return Sampling(o["temperature"], o["top_k"], o["top_p"]), (o["seed"], o["count"])

    def _piece(self, slot: int) -> tuple[int, int]:
        """(padded width, real tokens) of the next piece of `slot`'s prompt: at most
        prefill_chunk tokens, padded to a power-of-two bucket that stays inside the cache."""
        start, n = int(self.read[slot]), len(self.active[slot].prompt)
        piece = min(n - start, self.prefill_chunk)
        return min(prompt_bucket(piece, self.max_len), self.max_len - start), piece

    def _prefill(self) -> None:
        """Read the next piece of the oldest reading prompt, and of every other whose piece has
        its width, in one call; a prompt read to its end gets its first token."""
        width = self._piece(self.reading[0])[0]
        group = [slot for slot in self.reading if self._piece(slot)[0] == width]
        group = group[:self.prefill_rows]
        rows = group + group[:1] * ((1 << (len(group) - 1).bit_length()) - len(group))
        ids = np.zeros((len(rows), width), np.int32)
        starts, lengths = np.zeros(len(rows), np.int32), np.zeros(len(rows), np.int32)
        for b, slot in enumerate(rows):
            starts[b], lengths[b] = self.read[slot], self._piece(slot)[1]
            ids[b, :lengths[b]] = self.active[slot].prompt[starts[b]:starts[b] + lengths[b]]
        wanted = any(self.active[slot].logprobs for slot in group)
        sampling, draws = self._options(np.asarray(rows))
        self.cache, first, finite, scored = _prefill(
            self.params, self.cache, ids, starts, lengths, np.asarray(rows, np.int32), sampling,
            draws, config=self.config, scores=wanted)
        self.stats["prefills"] += 1
        first, finite = np.asarray(first), np.asarray(finite)
        picked = scored_rows(first, *scored) if wanted else [None] * len(rows)
        for b, slot in enumerate(group):
            r = self.active[slot]
            self.read[slot] += lengths[b]
            if self.read[slot] < len(r.prompt):
                continue
            self.reading.remove(slot)
            self.stats["admitted"] += 1
            if not finite[b]:
                self._finish(slot, "error")
                continue
            self.positions[slot] = len(r.prompt)
            self._deliver(slot, int(first[b]), picked[b])

    def _step(self) -> None:
        """Decode every slot that has read its prompt: several steps in one call when nothing
        waits to be read and each of them has that many tokens to go, else one."""
        decoding = [slot for slot, r in enumerate(self.active)
                    if r is not None and slot not in self.reading]
        if not decoding:
            return
        left = min(self.active[slot].max_tokens - self.active[slot].generated for slot in decoding)
        quiet = not self.reading and self._pending == 0
        steps = self.steps_per_dispatch if quiet and left >= self.steps_per_dispatch else 1
        wanted = any(self.active[slot].logprobs for slot in decoding)
        self.cache, out, scored = _decode(self.params, self.cache, self.tokens, self.positions,
                                          *self._options(slice(None)), config=self.config,
                                          scores=wanted, steps=steps)
        out = np.asarray(out)  # [steps, N]
        self.stats["dispatches"] += 1
        for i in range(steps):
            picked = scored_rows(out[i], *(a[i] for a in scored)) if wanted else None
            self.stats["steps"] += 1
            for slot in decoding:
                if self.active[slot] is None:  # it ended at an earlier step: the rest is dropped
                    continue
                self.positions[slot] += 1
                self._deliver(slot, int(out[i, slot]), picked and picked[slot])

    def _deliver(self, slot: int, token: int, scored: Scored | None = None) -> None:
        r = self.active[slot]
        if r.logprobs:
            r.scores.append(scored)
        r.generated += 1
        self.stats["tokens"] += 1
        self.tokens[slot] = token
        self.opts["count"][slot] = r.generated
        finish = "stop" if token in r.stop_ids else "length" if r.generated >= r.max_tokens else None
        if r.on_token(token, finish) is False:  # e.g. a stop string: it ends here
            finish = "stop"
        if finish is not None:
            self._finish(slot, finish)

    def _finish(self, slot: int, reason: str) -> None:
        r, self.active[slot] = self.active[slot], None
        if slot in self.reading:
            self.reading.remove(slot)
        self.tokens[slot], self.positions[slot] = 0, self.max_len
        self.opts["temperature"][slot] = 0.0  # a free row decodes greedily: no sort, no draw
        self.opts["top_k"][slot], self.opts["top_p"][slot] = self.config.vocab_size, 1.0
        self._report_done(r, reason)

    def _report_done(self, r: Request, reason: str) -> None:
        self.stats["cancelled" if reason == "cancelled" else "finished"] += 1
        if r.on_done is not None:
            r.on_done(reason)


def run_to_end(engine: Engine, requests: list[Request], timeout: float = 600.0) -> None:
    """Submit `requests` to a running engine and wait until each is done (tests, scripts)."""
    done = threading.Semaphore(0)
    for r in requests:
        inner = r.on_done
        r.on_done = (lambda reason, inner=inner: (inner and inner(reason), done.release()))
        engine.submit(r)
    deadline = time.monotonic() + timeout
    for _ in requests:
        if not done.acquire(timeout=max(deadline - time.monotonic(), 0)):
            raise TimeoutError(f"requests not done after {timeout} s")

