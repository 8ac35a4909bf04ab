"""The request checks, once for every caller: each rule refuses in one line naming the field,
and what passes passes."""

import numpy as np
import pytest

from jaxgpt.inference import requests
from jaxgpt.inference.requests import (
    RequestError,
    as_prompts,
    check_key,
    check_prompts,
    check_request,
    check_size,
    eos_ids,
    prompt_bucket,
)
from jaxgpt.inference.sampling import Sampling

V, MAX_LEN = 17, 23


def refused(match: str, fn, *args, **kwargs) -> RequestError:
    with pytest.raises(RequestError, match=match) as caught:
        fn(*args, **kwargs)
    assert "\n" not in str(caught.value)
    return caught.value


@pytest.mark.parametrize("max_tokens, least, message", [
    (-1, 0, "max_new_tokens must be a non-negative integer, got -1"),
    (2.5, 0, "max_new_tokens must be a non-negative integer, got 2.5"),
    (True, 0, "max_new_tokens must be a non-negative integer, got True"),
    (0, 1, "max_new_tokens must be at least 1, got 0"),
    ("3", 1, "max_new_tokens must be an integer, got '3'"),
])
def test_the_count_of_new_tokens(max_tokens, least, message):
    err = refused(message, check_request, max_tokens, least=least, name="max_new_tokens")
    assert err.field == "max_tokens" and err.describe("'n_new'").startswith("'n_new' must be")
    check_request(least, least=least)  # the least passes


@pytest.mark.parametrize("sampling, vocab, message, field", [
    (Sampling(-1.0), None, r"temperature must be a finite number >= 0, got -1.0", "temperature"),
    (Sampling(float("nan")), None, "temperature must be a finite number >= 0", "temperature"),
    (Sampling("hot"), None, "temperature must be a finite number >= 0", "temperature"),
    (Sampling(True), None, "temperature must be a finite number >= 0", "temperature"),
    (Sampling(1.0, 0), V, r"top_k must be an integer in \[1, 17\], got 0", "top_k"),
    (Sampling(1.0, 18), V, r"top_k must be an integer in \[1, 17\], got 18", "top_k"),
    (Sampling(1.0, 2.0), V, r"top_k must be an integer in \[1, 17\], got 2.0", "top_k"),
    (Sampling(1.0, 0), None, "top_k must be >= 1, got 0", "top_k"),
    (Sampling(1.0, 2.5), None, "top_k must be an integer >= 1, got 2.5", "top_k"),
    (Sampling(1.0, None, 0.0), None, r"top_p must be in \(0, 1\], got 0.0", "top_p"),
    (Sampling(1.0, None, 1.5), V, r"top_p must be in \(0, 1\], got 1.5", "top_p"),
    (Sampling(1.0, None, float("nan")), V, r"top_p must be in \(0, 1\]", "top_p"),
])
def test_the_sampling_options(sampling, vocab, message, field):
    assert refused(message, check_request, 3, sampling, vocab_size=vocab).field == field


def test_good_sampling_options_pass():
    for sampling in (Sampling(), Sampling(0.0, 1, 1.0), Sampling(2.0, V, 1e-6),
                     Sampling(np.float32(0.5), np.int64(3), np.float64(0.5))):
        check_request(3, sampling, vocab_size=V)
    check_request(3, Sampling(1.0, 10**6))  # without the model a large k is not known to be too large


def test_the_prompt_and_its_length():
    refused("^the prompt is empty$", check_request, 3, prompt=[], vocab_size=V)
    err = refused(r"token id 17 in the prompt is outside the vocabulary \[0, 17\)", check_request,
                  3, prompt=[1, 17], vocab_size=V)
    assert err.field == "prompt" and err.describe("'prompt'").startswith("token id 17 in 'prompt'")
    refused("token ids must be integers", check_request, 3, prompt=[1.5], vocab_size=V)
    err = refused(r"the prompt is 23 tokens, but this model's maximum context length is 23",
                  check_request, None, prompt=[1] * 23, vocab_size=V, max_len=MAX_LEN)
    assert (err.field, err.code) == ("prompt", "context_length_exceeded")
    err = refused(r"maximum context length is 23 tokens; the prompt is 20 tokens and max_tokens "
                  r"asks for 4 more \(at most 3\)", check_request, 4, prompt=[1] * 20,
                  vocab_size=V, max_len=MAX_LEN)
    assert (err.field, err.code) == ("max_tokens", "context_length_exceeded")
    check_request(3, prompt=[1] * 20, vocab_size=V, max_len=MAX_LEN)  # exactly fits
    check_request(None, prompt=[1] * 22, vocab_size=V, max_len=MAX_LEN)  # room for one


def test_batched_prompts():
    ids, mask = as_prompts([[1, 2], [3]], None, pad_id=0)
    np.testing.assert_array_equal(ids, [[1, 2], [0, 3]])
    np.testing.assert_array_equal(mask, [[1, 1], [0, 1]])
    check_prompts(ids, mask, V)
    refused("prompt 1 is empty", check_prompts, *as_prompts([[1], []], None, 0), V)
    refused(r"token id 17 in prompt 0 is outside the vocabulary \[0, 17\)", check_prompts,
            *as_prompts([[1, 17]], None, 0), V)
    refused("prompt_ids holds no prompt", check_prompts, np.zeros((0, 3), int),
            np.zeros((0, 3), bool), V)
    refused(r"prompt_ids must be \[batch, time\]", as_prompts, np.array([1, 2]), None, 0)
    refused("token ids must be integers, got dtype float64 in prompt 0", as_prompts, [[1.5]], None, 0)
    refused("prompt_mask shape", as_prompts, np.ones((1, 3), int), np.ones((1, 2)), 0)
    refused("prompt_mask row 0 is not left padding", as_prompts, np.ones((1, 3), int),
            np.array([[1, 0, 1]]), 0)
    # Padding may hold anything, even ids outside the vocabulary: only real tokens are checked.
    check_prompts(np.array([[99, 1]]), np.array([[False, True]]), V)


def test_stop_ids_and_the_key():
    assert eos_ids(None) is None and eos_ids(5) == (5,) and eos_ids([5, 6]) == (5, 6)
    refused("eos_id is an empty collection", eos_ids, ())
    refused(r"eos_id 17 is outside the vocabulary \[0, 17\)", check_request, 3, eos_id=[1, 17],
            vocab_size=V)
    check_request(3, eos_id=(0, 16), vocab_size=V)
    refused("sampling .temperature > 0. needs a PRNG key", check_key, Sampling(0.5), None)
    check_key(Sampling(0.0), None)


def test_the_buffer_bound(monkeypatch):
    refused(r"max_new_tokens=1000000000 is too many: 1 row\(s\) of 1 prompt", check_size, 1, 1,
            10**9)
    B, new = 2, 3
    bucket = prompt_bucket(5, MAX_LEN)
    assert bucket == 16 and prompt_bucket(17, MAX_LEN) == 23
    monkeypatch.setattr(requests, "MAX_BUFFER_BYTES", B * (bucket + new) * 5)
    check_size(B, 5, new, MAX_LEN)
    refused("too many", check_size, B, 5, new + 1, MAX_LEN)
