"""Serving and the generate CLI on Llama 3 / Qwen3 model directories, against transformers.

Random tiny LlamaForCausalLM (3 query heads per kv head) and Qwen3ForCausalLM (2 per kv head)
beside a byte-level BPE tokenizer.json built offline with a Llama-3-style or Qwen3-style chat
template. The engine's greedy rows, prompts of different lengths sharing the batch, equal
`jaxgpt.generate` one prompt at a time; the server's chat and completion replies equal
transformers' greedy `generate` on what AutoTokenizer gives (apply_chat_template, or the
tokenizer with its BOS), decoded by the same tokenizer. In each model two rows of lm_head are
swapped so that greedy decoding of the chat meets the end-of-turn token (checked on the
transformers side), and the reply must end there with finish_reason "stop".
"""

import dataclasses
import json
import socket
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from jaxgpt.inference.engine import Engine, Request, run_to_end  # noqa: E402
from jaxgpt.inference.generate import generate  # noqa: E402
from jaxgpt.weights.loader import load_model  # noqa: E402
from jaxgpt.data.tokenizer import FamilyTokenizer, TextDecoder  # noqa: E402
from tests.data.test_chat_template import LLAMA3, QWEN3, SPECIALS  # noqa: E402

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world, how are you?"}]
REPLY_TOKENS = 12
END = {"llama": "<|eot_id|>", "qwen3": "<|im_end|>"}


def _tokenizer(family: str):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world, how are you today? Say hi, be brief. ünïcode ☃"] * 10,
                            trainers.BpeTrainer(vocab_size=301, special_tokens=SPECIALS,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if family == "llama":  # Llama 3's tokenizer puts <|begin_of_text|> before a plain text
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    template = LLAMA3 if family == "llama" else QWEN3
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                                eos_token=END[family], chat_template=template)


def _config(family: str, vocab: int):
    if family == "llama":
        return transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=24, intermediate_size=26, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=96,
            tie_word_embeddings=False)
    return transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=16, intermediate_size=22, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=6, max_position_embeddings=96,
        tie_word_embeddings=False, rope_theta=500.0)


def _chat_ids(ref_tok, messages):
    ids = ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def hf_greedy(model, ids, max_new, stops):
    """transformers' greedy new tokens after `ids`, up to and including a stop id."""
    x = torch.tensor([ids])  # every position attended (BOS is id 0, which could pass for padding)
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                             do_sample=False, eos_token_id=list(stops) or None,
                             pad_token_id=0)[0, len(ids):].tolist()
    ends = [i for i, t in enumerate(out) if t in stops]
    return out[:ends[0] + 1] if ends else out


def _build(family: str, path):
    """A model directory of the family whose greedy chat reply to CHAT ends at its end-of-turn
    token: the lm_head rows of that token and of the reply's third token are swapped."""
    fast = _tokenizer(family)
    fast.save_pretrained(path)
    end, eot = fast.convert_tokens_to_ids("<|end_of_text|>"), fast.convert_tokens_to_ids(END[family])
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(_config(family, len(fast))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        reply = hf_greedy(model, _chat_ids(fast, CHAT), 3, ())
        w = model.lm_head.weight
        w[[reply[2], eot]] = w[[eot, reply[2]]]
    model.save_pretrained(path)  # (writes a generation_config.json of its own: replaced here)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [end, eot]}))
    return model


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def family_dir(request, tmp_path_factory):
    """(family, directory, transformers model, AutoTokenizer, stop ids)."""
    path = tmp_path_factory.mktemp(request.param)
    model = _build(request.param, path)
    ref_tok = transformers.AutoTokenizer.from_pretrained(path)
    return request.param, path, model, ref_tok, FamilyTokenizer(path).stop_ids


# --- the engine: per-row cache_index with a GQA cache and rotary positions ---

def test_engine_greedy_equals_generate_for_prompts_sharing_the_batch(family_dir):
    _, path, _, _, _ = family_dir
    config, params = load_model(str(path))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (5, 1, 17, 2, 9, 30)]
    eng = Engine(params, config, slots=3, max_len=48).start()
    try:
        outs = [[] for _ in prompts]
        requests = [Request(p, 7, lambda t, f, out=out: out.append(t) is None)
                    for p, out in zip(prompts, outs)]
        run_to_end(eng, requests)
    finally:
        eng.stop()
    assert eng.stats["steps"] < sum(len(o) for o in outs)  # rows did share decode steps
    for p, out in zip(prompts, outs):
        assert out == generate(params, config, [p], 7)[0, len(p):].tolist()


# --- the server ---

@pytest.fixture(scope="module")
def served(family_dir):
    from jaxgpt.inference.server import build_app, make_server

    family, path = family_dir[:2]
    server = make_server(str(path), slots=4, max_queue=4, name=family)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    web = uvicorn.Server(uvicorn.Config(build_app(server), log_level="warning"))
    thread = threading.Thread(target=web.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1",
                           api_key="unused", max_retries=0, timeout=120)
    for _ in range(200):
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            time.sleep(0.05)
    yield server, client
    web.should_exit = True
    thread.join(10)
    server.engine.stop()
    sock.close()


def test_server_takes_the_family_tokenizer_and_every_stop_id(family_dir, served):
    _, _, _, ref_tok, stops = family_dir
    server = served[0]
    assert isinstance(server.tokenizer, FamilyTokenizer)
    ends = {ref_tok.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", END[family_dir[0]])}
    assert set(server.stop_ids) == set(stops) == ends


def test_chat_equals_transformers_on_apply_chat_template(family_dir, served):
    family, _, model, ref_tok, stops = family_dir
    client = served[1]
    ids = _chat_ids(ref_tok, CHAT)
    new = hf_greedy(model, ids, REPLY_TOKENS, stops)
    assert new[-1] in stops and len(new) > 2  # the model built to end its turn does (else void)
    want = ref_tok.decode(new[:-1], skip_special_tokens=True)
    got = client.chat.completions.create(model=family, messages=CHAT, max_tokens=REPLY_TOKENS,
                                         temperature=0)
    assert got.choices[0].message.content == want
    assert got.choices[0].finish_reason == "stop"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), len(new))
    chunks = list(client.chat.completions.create(model=family, messages=CHAT, temperature=0,
                                                 max_tokens=REPLY_TOKENS, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"
    # Cut short before the end of turn: the same prefix, finish_reason "length".
    short = client.chat.completions.create(model=family, messages=CHAT, max_tokens=2,
                                           temperature=0)
    assert short.choices[0].message.content == ref_tok.decode(new[:2], skip_special_tokens=True)
    assert short.choices[0].finish_reason == "length"


def test_completion_equals_transformers_on_the_tokenized_prompt(family_dir, served):
    family, _, model, ref_tok, stops = family_dir
    prompt = "Say hi, how are"
    ids = ref_tok(prompt)["input_ids"]
    if family == "llama":
        assert ids[0] == ref_tok.convert_tokens_to_ids("<|begin_of_text|>")
    new = hf_greedy(model, ids, 9, stops)
    got = served[1].completions.create(model=family, prompt=prompt, max_tokens=9, temperature=0)
    text = ref_tok.decode([t for t in new if t not in stops], skip_special_tokens=True)
    assert got.choices[0].text == text
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == len(new)
    assert got.choices[0].finish_reason == ("stop" if new[-1] in stops else "length")


def test_template_refusal_is_a_400(family_dir, served):
    if family_dir[0] != "llama":
        pytest.skip("only the Llama-style template checks the role order")
    with pytest.raises(openai.BadRequestError, match="roles must alternate"):
        served[1].chat.completions.create(model="llama", max_tokens=2, messages=[
            {"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


# --- the generate CLI, and the text decoder behind it ---

def test_generate_cli_prints_transformers_greedy_text(family_dir, capsys):
    from jaxgpt.cli import generate as cli

    family, path, model, ref_tok, stops = family_dir
    prompt = "hello world, how"
    new = hf_greedy(model, ref_tok(prompt)["input_ids"], 10, stops)
    want = ref_tok.decode([t for t in new if t not in stops], skip_special_tokens=True)
    assert cli.main(["--model", str(path), "--prompt", prompt, "--temperature", "0",
                     "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == prompt + want + "\n"


def test_text_decoder_pieces_join_to_the_whole_decode(family_dir):
    tok = FamilyTokenizer(family_dir[1])
    ids = tok.encode("be brief ünïcode ☃ ☃ <|im_start|>hi") + [tok.n_vocab + 2]
    dec = TextDecoder(tok)
    pieces = [dec.feed(t) for t in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids[:-1], skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)  # a character split over tokens waits


def test_model_tokenizer_picks_by_family(family_dir):
    """A family directory gets its own tokenizer and stop ids; a GPT-2 model keeps GPT-2's
    tokenizer even beside a tokenizer.json, and its <|endoftext|> only while the vocabulary
    holds it."""
    from jaxgpt.config import GPTConfig
    from jaxgpt.data.tokenizer import EOT_ID, model_tokenizer

    family, path, _, _, stops = family_dir
    config, _ = load_model(str(path))
    tok, got = model_tokenizer(str(path), config)
    assert isinstance(tok, FamilyTokenizer) and got == stops
    gpt2 = GPTConfig(vocab_size=50257, context_length=8, emb_dim=12, n_heads=3, n_layers=1)
    tok, got = model_tokenizer(str(path), gpt2)
    assert not isinstance(tok, FamilyTokenizer) and got == (EOT_ID,)
    tok, got = model_tokenizer(str(path), dataclasses.replace(gpt2, vocab_size=50000))
    assert got == ()


def test_chat_cli_with_a_named_template_reads_with_the_family_tokenizer(family_dir, monkeypatch,
                                                                         capsys):
    """--template alpaca on a family directory: the Alpaca text, tokenized by the model's own
    tokenizer, continued as transformers continues it, stopping at the family's ids."""
    import io

    from jaxgpt.cli import chat
    from jaxgpt.data.prompts import get_template

    _, path, model, ref_tok, stops = family_dir
    monkeypatch.setattr("sys.stdin", io.StringIO("Say hi\nexit\n"))
    assert chat.main(["--model", str(path), "--template", "alpaca", "--max-new-tokens", "6"]) == 0
    query = get_template("alpaca").query({"instruction": "Say hi", "input": ""})
    new = hf_greedy(model, ref_tok(query, add_special_tokens=False)["input_ids"], 6, stops)
    want = ref_tok.decode([t for t in new if t not in stops]).strip()
    assert capsys.readouterr().out == want + "\n"


def test_a_base_model_without_a_chat_template_refuses_chat_only(family_dir):
    from jaxgpt.inference.api import ApiError, family_chat_renderer

    tok = FamilyTokenizer(family_dir[1])
    text, stops = family_chat_renderer(tok)(CHAT)
    assert text == family_dir[3].apply_chat_template(CHAT, add_generation_prompt=True,
                                                     tokenize=False) and stops == []
    tok.chat_template = None
    with pytest.raises(ApiError, match="no chat template") as err:
        family_chat_renderer(tok)(CHAT)
    assert err.value.status == 400 and err.value.param == "messages"
