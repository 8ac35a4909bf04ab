"""Log-probabilities: of a prompt's tokens and of each generated one, against transformers' GPT-2
in float64 on the exported weights; through the engine (asking for them changes no token) and
the server's two endpoints (echo, several token-id prompts, max_tokens 0, streams); and
lm-evaluation-harness's `local-completions` model against the server, which must score as the
in-process `jaxgpt` model does."""

import json
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("uvicorn")

from test_server import post, web_app  # noqa: E402  (tests/inference is on sys.path)

from jaxgpt.config import GPTConfig  # noqa: E402
from jaxgpt.data.tokenizer import bpe_files, get_tokenizer  # noqa: E402
from jaxgpt.inference.engine import Engine, Request, run_to_end  # noqa: E402
from jaxgpt.inference.logprobs import MAX_TOP, prompt_scores  # noqa: E402
from jaxgpt.inference.server import build_app, make_server  # noqa: E402
from jaxgpt.models.model import init_params  # noqa: E402
from jaxgpt.weights.huggingface import save_pretrained  # noqa: E402

CONFIG = GPTConfig(vocab_size=50257, context_length=64, emb_dim=12, n_heads=3, n_layers=2,
                   drop_rate=0.0, dtype="float32")
TOK = get_tokenizer("gpt2")
TEXT = "The cat sat on the mat and looked at the door."


@pytest.fixture(scope="module")
def params():
    p = init_params(CONFIG, jax.random.key(5))
    p["wte"]["embedding"] = p["wte"]["embedding"] * 40.0  # spread logits: no near-ties
    return p


@pytest.fixture(scope="module")
def model_dir(params, tmp_path_factory):
    """The export with GPT-2's tokenizer files (the harness's tokenizer reads them)."""
    path = tmp_path_factory.mktemp("logprobs") / "tiny-gpt"
    save_pretrained(CONFIG, params, path)
    files = bpe_files()
    shutil.copy(files["encoder.json"], path / "vocab.json")
    shutil.copy(files["vocab.bpe"], path / "merges.txt")
    return path


@pytest.fixture(scope="module")
def reference(model_dir):
    """log-softmax [T, V] of transformers' GPT-2 in float64 over a list of ids."""
    model = transformers.GPT2LMHeadModel.from_pretrained(model_dir).double().eval()

    def logp(ids):
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0], -1).numpy()

    return logp


@pytest.fixture(scope="module")
def served(model_dir):
    server = make_server(str(model_dir), slots=4, max_queue=16)
    with web_app(build_app(server)) as base:
        yield server, base
    server.engine.stop()


def call(base, path, body) -> dict:
    status, text = post(base, path, body)
    assert status == 200, text
    return json.loads(text)


def assert_scores(scored, ids, start, logp):
    """Each Scored of ids[start:], against the reference's row before it: the token's
    log-probability and the most likely tokens, in order."""
    for i, s in enumerate(scored):
        row = logp[start + i - 1]
        assert s.token == ids[start + i]
        assert s.logprob == pytest.approx(row[s.token], abs=1e-4)
        assert list(s.top_ids) == list(np.argsort(-row)[:MAX_TOP])
        np.testing.assert_allclose(s.top_logprobs, np.sort(row)[::-1][:MAX_TOP], atol=1e-4)


def test_prompt_scores_equal_a_float64_forward_pass(params, reference):
    ids = TOK.encode(TEXT)
    got = prompt_scores(params, CONFIG, ids)
    assert len(got) == len(ids) - 1
    assert_scores(got, ids, 1, reference(ids))
    assert prompt_scores(params, CONFIG, ids[:1]) == []  # nothing before the first token


def test_the_engine_scores_each_generated_token_and_asking_changes_no_token(params, reference):
    prompt = TOK.encode("Once upon a time")
    engine = Engine(params, CONFIG, slots=3).start()
    try:
        asks = [Request(prompt, 6, lambda t, f: True, logprobs=True),  # greedy
                Request(prompt, 6, lambda t, f: True),  # the same, not asking
                Request(prompt, 6, lambda t, f: True, temperature=1.0, seed=4, logprobs=True)]
        tokens = {id(r): [] for r in asks}
        for r in asks:
            r.on_token = lambda t, f, r=r: tokens[id(r)].append(t) is None
        run_to_end(engine, asks)
    finally:
        engine.stop()
    greedy, plain, sampled = (tokens[id(r)] for r in asks)
    assert greedy == plain and asks[1].scores == []
    for r, out in ((asks[0], greedy), (asks[2], sampled)):
        full = prompt + out
        assert len(r.scores) == len(out)
        # the model's own distribution, whatever the temperature that drew the token
        assert_scores(r.scores, full, len(prompt), reference(full[:-1]))
    assert all(s.token == s.top_ids[0] for s in asks[0].scores)


def test_echo_scores_several_token_id_prompts_with_no_new_tokens(served, reference):
    _, base = served
    prompts = [TOK.encode(TEXT), TOK.encode("Numbers: 1, 2, 3, 4"), TOK.encode("Hi")[:1]]
    reply = call(base, "/v1/completions", {"model": "tiny-gpt", "prompt": prompts, "echo": True,
                                           "logprobs": 2, "max_tokens": 0})
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    assert reply["usage"] == {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": 0,
                              "total_tokens": sum(map(len, prompts))}
    for ids, choice in zip(prompts, reply["choices"]):
        lp, logp = choice["logprobs"], reference(ids)
        assert choice["text"] == TOK.decode(ids) and choice["finish_reason"] == "length"
        assert lp["tokens"] == [TOK.decode([t]) for t in ids]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        np.testing.assert_allclose(lp["token_logprobs"][1:],
                                   [logp[t, ids[t + 1]] for t in range(len(ids) - 1)], atol=1e-4)
        for t, top in enumerate(lp["top_logprobs"][1:]):
            best = np.argsort(-logp[t])[:2]  # two alternatives, and the chosen token
            assert set(top) == {TOK.decode([int(b)]) for b in best} | {lp["tokens"][t + 1]}
            assert max(top.values()) == pytest.approx(logp[t, best[0]], abs=1e-4)
        assert lp["text_offset"] == list(np.cumsum([0] + [len(s) for s in lp["tokens"][:-1]]))


def test_generated_tokens_come_with_their_logprobs_echoed_streamed_and_in_chat(served, reference):
    _, base = served
    ids = TOK.encode("Hello there, my")
    body = {"model": "tiny-gpt", "prompt": ids, "max_tokens": 5, "temperature": 0, "logprobs": 1}
    whole = call(base, "/v1/completions", {**body, "echo": True})["choices"][0]
    lp = whole["logprobs"]
    full = TOK.encode(whole["text"])
    assert full[:len(ids)] == ids and len(lp["tokens"]) == len(ids) + 5
    logp = reference(full[:-1])
    np.testing.assert_allclose(lp["token_logprobs"][1:],
                               [logp[t, full[t + 1]] for t in range(len(full) - 1)], atol=1e-4)
    plain = call(base, "/v1/completions", body)["choices"][0]
    assert whole["text"] == TOK.decode(ids) + plain["text"]
    assert plain["logprobs"]["token_logprobs"] == lp["token_logprobs"][len(ids):]
    assert plain["logprobs"]["text_offset"][0] == 0
    status, text = post(base, "/v1/completions", {**body, "stream": True})
    chunks = [json.loads(line[6:]) for line in text.splitlines()
              if line.startswith("data: {")]
    streamed = [v for c in chunks if c["choices"][0]["logprobs"]
                for v in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert status == 200 and streamed == plain["logprobs"]["token_logprobs"]
    chat = call(base, "/v1/chat/completions", {
        "model": "tiny-gpt", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
        "temperature": 0, "logprobs": True, "top_logprobs": 3})["choices"][0]
    content = chat["logprobs"]["content"]
    assert 1 <= len(content) <= 4
    for entry in content:
        assert entry["bytes"] == list(entry["token"].encode()) or "\ufffd" in entry["token"]
        assert len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["logprob"] == entry["logprob"]  # greedy: the best
    assert "".join(e["token"] for e in content).startswith(chat["message"]["content"])


PAIRS = [("The cat", " sat on the mat."), ("Numbers: 1, 2, 3,", " 4"),
         ("She opened the door and", " smiled at him"),
         (" ".join(["the long context goes on"] * 14), " and on")]  # cut from the left


def test_local_completions_against_the_server_scores_as_the_in_process_model(served, model_dir,
                                                                              tmp_path):
    lm_eval = pytest.importorskip("lm_eval")  # noqa: F841
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from jaxgpt.tasks.harness.lm import JaxgptLM
    from jaxgpt.tasks.harness.run import evaluate, metric_values

    server, base = served
    remote = LocalCompletionsAPI(model=server.name, base_url=base + "/v1/completions",
                                 tokenizer_backend="huggingface", tokenizer=str(model_dir),
                                 max_length=CONFIG.context_length, batch_size=2,
                                 max_gen_toks=6)
    local = JaxgptLM(str(model_dir), batch_size=4, max_gen_toks=6, progress=False)
    try:
        def ask(kind, args):
            return [Instance(request_type=kind, doc={}, arguments=a, idx=i)
                    for i, a in enumerate(args)]

        # The harness's API model keeps the last max_length - 1 ids (one position for the
        # token it asks for), the in-process one the whole window: equal where nothing is cut.
        short = [p for p in PAIRS if len(TOK.encode(p[0] + p[1])) < CONFIG.context_length - 1]
        theirs = remote.loglikelihood(ask("loglikelihood", short), disable_tqdm=True)
        ours = local.loglikelihood(ask("loglikelihood", short), disable_tqdm=True)
        for (a, ga), (b, gb) in zip(theirs, ours):
            assert a == pytest.approx(b, abs=1e-4) and ga == gb
        cut = remote.loglikelihood(ask("loglikelihood", PAIRS[-1:]), disable_tqdm=True)[0][0]
        assert np.isfinite(cut) and cut < 0
        doc = [("A short document of a few words.",)]
        assert remote.loglikelihood_rolling(ask("loglikelihood_rolling", doc), disable_tqdm=True) \
            == pytest.approx(local.loglikelihood_rolling(ask("loglikelihood_rolling", doc),
                                                         disable_tqdm=True), abs=1e-4)
        gen = [("Once upon a time", {"until": ["."], "max_gen_toks": 6}),
               ("The cat", {"until": ["\n"], "max_gen_toks": 4})]
        assert remote.generate_until(ask("generate_until", gen), disable_tqdm=True) == \
            local.generate_until(ask("generate_until", gen), disable_tqdm=True)
        examples = tmp_path / "hellaswag.jsonl"
        examples.write_text("".join(json.dumps(r) + "\n" for r in [
            {"ctx": "The cat", "label": 0, "endings": ["sat.", "flew over the moon", "ran"]},
            {"ctx": "She opened the door and", "label": 2, "endings": ["left", "smiled", "ran"]},
            {"ctx": "Numbers: 1, 2, 3,", "label": 1, "endings": ["4", "four, five", "5, 6"]}]))
        meta = {"hellaswag_file": str(examples)}
        assert metric_values(evaluate(remote, ["jaxgpt_hellaswag"], metadata=meta)) == \
            metric_values(evaluate(local, ["jaxgpt_hellaswag"], metadata=meta))
    finally:
        local.close()
