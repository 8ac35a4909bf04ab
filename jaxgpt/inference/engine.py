"""Continuous batching: a fixed set of sequence slots over one on-device KV cache.

An `Engine` holds `slots` sequences at once in a cache {"k", "v"} [L, N, H, S, K] that never
leaves the device. Its loop (`run`, one background thread) repeats: admit waiting requests into
free slots, one at a time, by a prefill of the prompt right-padded to a power-of-two bucket
(compiled once per bucket); then one decode step for every slot together (compiled once), each
row at its own position (the model's per-row `cache_index`); then hand each new token to its
request, and free the slots of requests that are done (a stop token, `max_tokens`, their
`on_token` said stop, or they were cancelled). Free slots still run in the decode step (the
shape is fixed); their results are ignored and their writes land in rows nobody reads.

Each slot's tokens sit at cache positions 0, 1, ... whatever the other slots hold, and every
row is computed on its own, so a request's output depends only on itself: token n of a sampled
request is drawn with `fold_in(key(seed), n)`. The sampler is `generate`'s
(`jaxgpt.inference.sampling`, with options per row), so greedy decoding picks what `generate`
picks, and a sampled request draws what `generate` draws for its prompt alone with
key=jax.random.key(seed).

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
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: int = 0

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, self.top_p)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def _prefill(params, cache, prompt, length, slot, sampling: Sampling, draws, *, config):
    """Run the prompt [1, P] (right-padded; `length` real tokens) into row `slot` of the cache
    [L, N, H, S, K] at positions 0..P-1, and pick its first new token [1] with the slot's
    sampling options [1] and draw (seed [1], count [1])."""
    P = prompt.shape[1]
    hidden, fresh = GPT(config).apply(
        {"params": params}, prompt, positions=jnp.arange(P)[None, :],
        cache=init_cache(config, 1, P, cache["k"].dtype), cache_index=0, return_hidden=True,
    )  # [1, P, D]; fresh {"k", "v"} [L, 1, H, P, K]
    cache = {n: lax.dynamic_update_slice(cache[n], fresh[n], (0, slot, 0, 0, 0)) for n in cache}
    last = lax.dynamic_slice_in_dim(hidden, length - 1, 1, axis=1)[:, 0]  # [1, D]
    logits = head_logits(params, config, last)  # [1, V]
    return cache, sample(logits, row_keys(*draws), sampling), jnp.all(jnp.isfinite(logits))


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def _decode(params, cache, tokens, positions, sampling: Sampling, draws, *, config):
    """One token for every slot: tokens [N] fed at positions [N], each row its own; returns the
    cache with their keys and values written and the next tokens [N], drawn with each slot's
    options [N] and draw (seed [N], count [N])."""
    logits, cache = GPT(config).apply(
        {"params": params}, tokens[:, None], positions=positions[:, None], cache=cache,
        cache_index=positions)  # [N, 1, V]
    return cache, sample(logits[:, 0], row_keys(*draws), sampling)


decode_step = _decode  # public: jaxgpt.plan compiles the engine's decode step for a target


class Engine:
    """`slots` sequences decoded together over a cache of `max_len` positions (the context by
    default). `submit` from any thread; `run` (or `start`) the loop in one thread."""

    def __init__(self, params, config: GPTConfig, *, slots: int = 8, max_len: int | None = None,
                 max_queue: int = 64):
        max_len = config.context_length if max_len is None else max_len
        if not 1 <= max_len <= config.context_length:
            raise ValueError(f"max_len must be in [1, {config.context_length}], got {max_len}")
        if slots < 1 or max_queue < 0:
            raise ValueError(f"slots must be >= 1 and max_queue >= 0, got {slots}, {max_queue}")
        self.params, self.config = jax.device_put(params), config
        self.slots, self.max_len, self.max_queue = slots, max_len, max_queue
        self.cache = init_cache(config, slots, max_len)  # {"k", "v"} [L, N, H, S, K]
        self.active: list[Request | None] = [None] * slots
        self.tokens = np.zeros(slots, np.int32)  # the token each slot feeds next
        self.positions = np.zeros(slots, np.int32)  # where that token goes
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
        self.stats = {"admitted": 0, "finished": 0, "cancelled": 0, "steps": 0, "tokens": 0}
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
                if self.free_slots() == self.slots:
                    self._wake.wait(0.1)
                    self._wake.clear()
                    continue
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
            self._prefill(slot, request)

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

    def _prefill(self, slot: int, r: Request) -> None:
        """Run `r`'s prompt into `slot`, which it already holds (`_claim`: should the prefill
        fail, `run` reports the error to it as to every other running request)."""
        n = len(r.prompt)
        P = prompt_bucket(n, self.max_len)
        prompt = np.zeros((1, P), np.int32)
        prompt[0, :n] = r.prompt
        self._set_slot(slot, r)
        sampling, draws = self._options(slice(slot, slot + 1))
        self.cache, first, finite = _prefill(self.params, self.cache, prompt, np.int32(n),
                                             np.int32(slot), sampling, draws, config=self.config)
        self.stats["admitted"] += 1
        if not bool(finite):
            self._finish(slot, "error")
            return
        self.positions[slot] = n
        self._deliver(slot, int(first[0]))

    def _step(self) -> None:
        for slot, r in enumerate(self.active):
            if r is not None and r.cancelled.is_set():
                self._finish(slot, "cancelled")
        if self.free_slots() == self.slots:
            return
        self.cache, nxt = _decode(self.params, self.cache, self.tokens, self.positions,
                                  *self._options(slice(None)), config=self.config)
        nxt = np.asarray(nxt)
        self.stats["steps"] += 1
        for slot, r in enumerate(self.active):
            if r is not None:
                self.positions[slot] += 1
                self._deliver(slot, int(nxt[slot]))

    def _deliver(self, slot: int, token: int) -> None:
        r = self.active[slot]
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
        self.tokens[slot], self.positions[slot] = 0, 0
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

