"""The continuous-batching engine: greedy output equals `generate`, a seeded sample is the same
alone or among others, rows write the cache at their own positions, slots free and refill."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.models.cache import write_cache
from jaxgpt.config import GPTConfig
from jaxgpt.inference.engine import Engine, QueueFull, Request, run_to_end
from jaxgpt.inference.generate import generate
from jaxgpt.models.model import init_params
from tests.conftest import TINY

CONFIG = GPTConfig(**{**TINY, "context_length": 23})
PROMPTS = [[3, 16, 0, 9, 5], [7], [2, 11, 4, 15, 8, 1, 6, 13, 10, 12, 3, 3, 14, 5, 0, 9, 2],
           [1, 2], [16, 15, 14, 13, 12, 11, 10]]


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(5))


@pytest.fixture(scope="module")
def engine(params):
    eng = Engine(params, CONFIG, slots=3, max_queue=8).start()
    yield eng
    eng.stop()


def collect(prompt, max_tokens, **kw):
    out = []
    r = Request(list(prompt), max_tokens, lambda t, finish: out.append(t) is None, **kw)
    return r, out


def test_write_cache_per_row_matches_numpy():
    rng = np.random.default_rng(0)
    buf = rng.normal(size=(2, 3, 5, 7, 4)).astype(np.float32)  # [L, B, H, S, K]
    new = rng.normal(size=(3, 2, 5, 4)).astype(np.float32)  # [B, T, H, K]
    at = np.array([0, 4, 5])
    want = buf.copy()
    for b in range(3):
        for t in range(2):
            want[1, b, :, at[b] + t] = new[b, t]
    np.testing.assert_array_equal(np.asarray(write_cache(jnp.asarray(buf), new, (1,), jnp.asarray(at))), want)
    # 16-bit caches take another path (their bits are scattered): the same values land.
    half = write_cache(jnp.asarray(buf, jnp.bfloat16), jnp.asarray(new, jnp.bfloat16), (1,),
                       jnp.asarray(at))
    assert half.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(half, np.float32),
                                  np.asarray(jnp.asarray(want, jnp.bfloat16), np.float32))
    # A scalar index writes every row at the same slot, as before.
    want = buf.copy()
    want[0, :, :, 2:4] = new.transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(np.asarray(write_cache(jnp.asarray(buf), new, (0,), 2)), want)


def test_greedy_equals_generate_with_more_requests_than_slots(engine, params):
    runs = [collect(p, CONFIG.context_length - len(p)) for p in PROMPTS]
    run_to_end(engine, [r for r, _ in runs])
    for p, (r, out) in zip(PROMPTS, runs):
        want = generate(params, CONFIG, [p], CONFIG.context_length - len(p))[0, len(p):]
        assert out == want.tolist(), p


def test_seeded_sample_is_the_same_alone_or_among_others(engine):
    opts = dict(temperature=0.9, top_k=11, top_p=0.8, seed=1234)
    alone, out_alone = collect(PROMPTS[0], 15, **opts)
    run_to_end(engine, [alone])
    crowd = [collect(p, 6, temperature=1.3, seed=i, top_p=0.5 if i % 2 else None)
             for i, p in enumerate(PROMPTS[1:] * 2)]
    again, out_again = collect(PROMPTS[0], 15, **opts)
    run_to_end(engine, [r for r, _ in crowd[:3]] + [again] + [r for r, _ in crowd[3:]])
    assert out_again == out_alone and len(out_alone) == 15
    other, out_other = collect(PROMPTS[0], 15, **{**opts, "seed": 99})
    run_to_end(engine, [other])
    assert out_other != out_alone  # the seed matters (17^15 outcomes: equal by chance ~never)


def test_stop_ids_and_on_token_end_a_request(engine, params):
    want = generate(params, CONFIG, [PROMPTS[1]], 10)[0, 1:].tolist()
    r, out = collect(PROMPTS[1], 10, stop_ids=(want[3],))
    reasons = []
    r.on_done = reasons.append
    run_to_end(engine, [r])
    assert out == want[:want.index(want[3]) + 1] and reasons == ["stop"]
    seen = []
    r = Request(PROMPTS[1], 10, lambda t, f: (seen.append(t), len(seen) < 2)[1],
                on_done=reasons.append)
    run_to_end(engine, [r])
    assert seen == want[:2] and reasons[-1] == "stop"


def test_cancel_frees_the_slot_and_queue_bound(params):
    eng = Engine(params, CONFIG, slots=1, max_queue=1)  # not started: nothing is admitted
    reasons = []
    a, _ = collect(PROMPTS[0], 5, on_done=reasons.append)
    b, _ = collect(PROMPTS[0], 5, on_done=reasons.append)
    eng.submit(a)
    eng.submit(b)  # one free slot + max_queue 1
    with pytest.raises(QueueFull, match="at capacity"):
        eng.submit(collect(PROMPTS[0], 5)[0])
    a.cancelled.set()
    t = threading.Thread(target=eng.run)
    t.start()
    try:
        run_to_end(eng, [collect(PROMPTS[1], 3)[0]])
    finally:
        eng.stop()
        t.join()
    assert reasons == ["cancelled", "length"] and eng.load()["running"] == 0


def test_queue_full_reports_exactly_max_queue_waiting(params):
    eng = Engine(params, CONFIG, slots=1, max_queue=2)  # not started: one takes the free slot
    for _ in range(3):
        eng.submit(collect(PROMPTS[1], 2)[0])
    with pytest.raises(QueueFull, match=r" 2 waiting \(max_queue=2\)"):
        eng.submit(collect(PROMPTS[1], 2)[0])
    assert eng.load()["waiting"] == 2 and eng.load()["queued"] == 3


def test_a_request_being_admitted_is_not_counted_twice(params, monkeypatch):
    """While a request's prefill runs its slot is taken: the bound stays max_queue waiting."""
    from jaxgpt.inference import engine as engine_module

    entered, gate = threading.Event(), threading.Event()
    real = engine_module._prefill

    def prefill(*args, **kwargs):
        entered.set()
        assert gate.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "_prefill", prefill)
    eng = Engine(params, CONFIG, slots=1, max_queue=2).start()
    try:
        eng.submit(collect(PROMPTS[1], 2)[0])
        assert entered.wait(60)  # the first request is being admitted into the only slot
        eng.submit(collect(PROMPTS[1], 2)[0])
        eng.submit(collect(PROMPTS[1], 2)[0])
        with pytest.raises(QueueFull, match=r" 2 waiting \(max_queue=2\)"):
            eng.submit(collect(PROMPTS[1], 2)[0])
        assert eng.load()["waiting"] == 2
    finally:
        gate.set()
        eng.stop()
