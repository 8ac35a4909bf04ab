"""The server's request side without a server: streamed text at stop strings and split UTF-8,
chat rendering with the prompt template, and option checks."""

import pytest

from jaxgpt.inference.api import (
    ApiError,
    TextStream,
    chat_renderer,
    parse_chat,
    parse_completion,
)
from jaxgpt.data.prompts import get_template
from jaxgpt.data.tokenizer import get_tokenizer


class BytesTokenizer:
    """Token i is PIECES[i]'s bytes: a stand-in whose pieces split text where a test wants."""

    PIECES = [b"ab", b"c<", b"/s", b">x", b"\xc3", b"\xa9", b"<", b"/t"]
    n_vocab = len(PIECES)

    def decode_single_token_bytes(self, token):
        return self.PIECES[token]


def run(tokens, stops):
    stream = TextStream(BytesTokenizer(), stops)
    deltas = [stream.feed(t) for t in tokens] + [stream.feed(None)]
    return deltas, stream


def test_text_stops_before_a_stop_string_split_over_tokens():
    deltas, stream = run([0, 1, 2, 3], ["</s>"])
    assert "".join(deltas) == "abc" and stream.stopped
    assert deltas[:2] == ["ab", "c"]  # "<" is held back: it may begin the stop string


def test_held_text_is_released_when_the_stop_string_does_not_follow():
    deltas, stream = run([0, 6, 7, 0], ["</s>"])
    assert deltas == ["ab", "", "</t", "ab", ""] and not stream.stopped


def test_a_character_split_over_tokens_comes_whole():
    deltas, _ = run([4, 5, 0], [])
    assert deltas == ["", "é", "ab", ""]
    deltas, _ = run([0, 4], [])  # the reply ended mid-character
    assert deltas == ["ab", "", "\ufffd"]


def test_chat_rendering_follows_the_template_turn_by_turn():
    alpaca = get_template("alpaca")
    render = chat_renderer("alpaca")
    text, stops = render([{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."},
                          {"role": "user", "content": "Name a color."}])
    want = (alpaca.query({"instruction": "Be brief.\n\nHi", "input": ""}) + "Hello.\n\n"
            + alpaca.query({"instruction": "Name a color.", "input": ""}))
    assert text == want and stops == list(alpaca.turn_starts)


def test_chat_stops_join_the_templates_turn_starts():
    tok = get_tokenizer("gpt2")
    job = parse_chat({"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                      "stop": "END", "max_tokens": 5}, tok, ["m"], 100, 50257,
                     chat_renderer("phi3"))
    assert job.stops == ["END", *get_template("phi3").turn_starts]
    assert tok.decode(job.prompt_ids) == "<|user|>\nHi\n<|assistant|>:\n"


@pytest.mark.parametrize("change, message", [
    ({"prompt": [1, 50257]}, "token id 50257 in 'prompt' is outside the vocabulary"),
    ({"prompt": []}, "'prompt' must be a string"),
    ({"top_k": 0}, r"'top_k' must be an integer in \[1, 50257\]"),
    ({"seed": 1.5}, "'seed' must be an integer"),
    ({"max_tokens": True}, "'max_tokens' must be an integer"),
    ({"stop": ["a"] * 5}, "up to 4"),
    ({"stream_options": {"include_usage": 1}}, "include_usage"),
])
def test_completion_options_are_checked(change, message):
    body = {"model": "m", "prompt": "Hello", **change}
    with pytest.raises(ApiError, match=message):
        parse_completion(body, get_tokenizer("gpt2"), ["m"], 100, 50257)


def test_completion_defaults_as_openai():
    job = parse_completion({"model": "m", "prompt": "Hello"}, get_tokenizer("gpt2"), ["m"], 100,
                           50257)
    assert (job.max_tokens, job.temperature, job.top_p, job.stream) == (16, 1.0, None, False)
    job = parse_completion({"model": "m", "prompt": [5] * 95}, get_tokenizer("gpt2"), ["m"], 100,
                           50257)
    assert job.max_tokens == 5  # the default never passes the context


CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


def parse(body, chat: bool):
    tok = get_tokenizer("gpt2")
    if chat:
        return parse_chat(body, tok, ["m"], 100, 50257, chat_renderer("alpaca"))
    return parse_completion(body, tok, ["m"], 100, 50257)


@pytest.mark.parametrize("chat, change, param, message", [
    (False, {"logprobs": 2}, "logprobs", "'logprobs' is not supported by this server, got 2"),
    (False, {"echo": True}, "echo", "'echo' is not supported"),
    (False, {"suffix": "end"}, "suffix", "'suffix' is not supported"),
    (False, {"best_of": 3}, "best_of", "'best_of' is not supported"),
    (False, {"presence_penalty": 0.5}, "presence_penalty", "'presence_penalty' is not"),
    (True, {"logprobs": True}, "logprobs", "'logprobs' is not supported"),
    (True, {"top_logprobs": 3}, "top_logprobs", "'top_logprobs' is not supported"),
    (True, {"tools": [{"type": "function"}]}, "tools", "'tools' is not supported"),
    (True, {"response_format": {"type": "json_object"}}, "response_format", "not supported"),
    (False, {"messages": []}, "messages", "'messages' is not a field of /v1/completions"),
    (True, {"prompt": "x"}, "prompt", "'prompt' is not a field of /v1/chat/completions"),
    (True, {"max_token": 5}, "max_token", "'max_token' is not a field of /v1/chat"),
    (False, {"n": 1, "functions": []}, "functions", "'functions' is not a field"),
])
def test_fields_not_implemented_or_unknown_are_refused_by_name(chat, change, param, message):
    body = {**(CHAT if chat else {"model": "m", "prompt": "Hello"}), **change}
    with pytest.raises(ApiError, match=message) as caught:
        parse(body, chat)
    assert caught.value.param == param and caught.value.status == 400
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("chat, change", [
    (False, {"logprobs": None, "echo": False, "suffix": None, "best_of": 1, "n": 1,
             "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "user": "u"}),
    (False, {"logprobs": 0, "echo": None}),
    (True, {"logprobs": False, "top_logprobs": 0, "presence_penalty": None, "tools": [],
            "response_format": {"type": "text"}, "user": "u", "max_completion_tokens": 3,
            "stream": True, "stream_options": {"include_usage": True}}),
])
def test_fields_that_say_off_are_accepted(chat, change):
    body = {**(CHAT if chat else {"model": "m", "prompt": "Hello"}), **change}
    assert parse(body, chat).max_tokens >= 1
