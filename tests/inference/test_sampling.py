"""The one sampler: its filtering rules, its per-row form equal to its batch form, and the three
callers (generate, the engine, the book's simple loop) drawing the same tokens from the same
model, key and options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import GPTConfig
from jaxgpt.inference.engine import Engine, Request, run_to_end
from jaxgpt.inference.generate import generate, generate_simple
from jaxgpt.inference.sampling import GREEDY, Sampling, filter_logits, row_keys, sample
from jaxgpt.models.model import init_params
from tests.conftest import TINY

CONFIG = GPTConfig(**{**TINY, "vocab_size": 29, "context_length": 19})
OPTIONS = {
    "greedy": GREEDY,
    "temperature": Sampling(temperature=1.7),
    "top_k": Sampling(temperature=1.3, top_k=5),
    "top_p": Sampling(temperature=1.5, top_p=0.6),
    "top_k_and_top_p": Sampling(temperature=0.9, top_k=7, top_p=0.8),
}


def test_filter_logits_semantics():
    logits = jnp.array([[1.0, 3.0, 3.0, 2.0, 0.5]])
    # The book's top-k keeps every logit >= the k-th largest (ties included).
    np.testing.assert_array_equal(filter_logits(logits, 1.0, 2, None)[0] > -jnp.inf,
                                  [False, True, True, False, False])
    probs = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
    for p, kept in [(0.3, 1), (0.5, 2), (0.7, 3), (0.9, 4), (1.0, 5)]:
        out = filter_logits(jnp.log(jnp.asarray(probs))[None], 1.0, None, p)
        assert int(jnp.sum(out > -jnp.inf)) == kept, p  # smallest prefix with mass >= p
    np.testing.assert_allclose(filter_logits(logits, 2.0, None, None), logits / 2.0)
    # Per row, as the engine gives them: the same rules row by row.
    rows = jnp.concatenate([logits, logits])
    out = filter_logits(rows, jnp.array([1.0, 2.0]), jnp.array([2, 5]), jnp.array([1.0, 0.3]))
    np.testing.assert_array_equal(out[0], filter_logits(logits, 1.0, 2, 1.0)[0])
    np.testing.assert_array_equal(out[1], filter_logits(logits, 2.0, 5, 0.3)[0])


def test_per_row_options_draw_as_each_row_alone():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(5, 29)) * 3, jnp.float32)  # [B, V]
    rows = [Sampling(1.1, 3, 0.9), Sampling(0.0), Sampling(2.0, 29, 0.5), Sampling(0.7, 1, 1.0),
            Sampling(1.4, 10, 1.0)]
    seeds, counts = np.arange(5, dtype=np.uint32) * 7, np.arange(5, dtype=np.int32) + 3
    keys = row_keys(seeds, counts)
    batch = Sampling(np.array([r.temperature for r in rows], np.float32),
                     np.array([r.top_k or 29 for r in rows], np.int32),
                     np.array([r.top_p or 1.0 for r in rows], np.float32))
    got = jax.jit(sample)(logits, keys, batch)
    for b, r in enumerate(rows):
        assert int(got[b]) == int(sample(logits[b:b + 1], keys[b], r)[0]), b


def test_greedy_ignores_the_key_and_the_filters():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(3, 29)), jnp.float32)
    want = jnp.argmax(logits, axis=-1)
    np.testing.assert_array_equal(sample(logits, None, Sampling(0.0, 2, 0.1)), want)
    assert jax.tree.leaves(Sampling(0.0, 2, 0.1)) == []  # nothing traced: greedy is static
    assert len(jax.tree.leaves(Sampling(0.5, 2, 0.1))) == 2  # temperature and top_p traced


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(4))


@pytest.fixture(scope="module")
def engine(params):
    eng = Engine(params, CONFIG, slots=2, max_queue=4).start()
    yield eng
    eng.stop()


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_generate_the_engine_and_the_simple_loop_draw_the_same(params, engine, name):
    sampling, seed, prompt, new = OPTIONS[name], 11, [3, 14, 1, 27, 8], 9
    key = jax.random.key(seed)
    cached = generate(params, CONFIG, [prompt], new, sampling=sampling, key=key)[0, len(prompt):]
    simple = generate_simple(params, CONFIG, np.array([prompt]), new, sampling=sampling, key=key)
    out = []
    r = Request(prompt, new, lambda t, finish: out.append(t) is None, seed=seed,
                temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    run_to_end(engine, [r])
    assert cached.tolist() == np.asarray(simple)[0, len(prompt):].tolist() == out
    if name != "greedy":  # the key matters: another draws another sequence
        other = generate(params, CONFIG, [prompt], new, sampling=sampling, key=jax.random.key(1))
        assert other[0, len(prompt):].tolist() != out


def test_keywords_equal_the_options_object(params):
    key = jax.random.key(2)
    kw = generate(params, CONFIG, [[1, 2, 3]], 6, temperature=1.3, top_k=5, key=key)
    np.testing.assert_array_equal(kw, generate(params, CONFIG, [[1, 2, 3]], 6, key=key,
                                               sampling=Sampling(1.3, 5)))
    with pytest.raises(ValueError, match="not both"):
        generate(params, CONFIG, [[1]], 2, temperature=0.5, sampling=Sampling(0.5), key=key)
