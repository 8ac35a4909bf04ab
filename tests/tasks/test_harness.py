"""The `jaxgpt` model of lm-evaluation-harness: its log-likelihoods against a float64 forward pass
(transformers' GPT-2 in double precision on the exported weights), rolling windows that predict
each token once, generate_until against greedy `generate`, the harness's own `hf` model on the
same weights, jaxgpt's HellaSwag task against `jaxgpt.tasks.hellaswag`, the command, and the
training loop's harness scores."""

import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402

from jaxgpt.config import GPTConfig  # noqa: E402
from jaxgpt.data.tokenizer import bpe_files, get_tokenizer  # noqa: E402
from jaxgpt.inference.generate import generate  # noqa: E402
from jaxgpt.models.model import init_params  # noqa: E402
from jaxgpt.tasks.harness.lm import JaxgptLM  # noqa: E402
from jaxgpt.tasks.harness.run import evaluate, metric_values  # noqa: E402
from jaxgpt.tasks.harness.scoring import rolling_windows  # noqa: E402
from jaxgpt.tasks.hellaswag import read_examples, score  # noqa: E402
from jaxgpt.weights.huggingface import save_pretrained  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e" / "workers"))
from train_run import TINY_RUN  # noqa: E402

# GPT-2's vocabulary (text is tokenized), the rest tiny and odd; a context of 19 tokens so long
# contexts and documents are cut.
CONFIG = GPTConfig(vocab_size=50257, context_length=19, emb_dim=12, n_heads=3, n_layers=2,
                   drop_rate=0.0, dtype="float32")
TOK = get_tokenizer("gpt2")

HELLASWAG = [
    {"ctx": "A man is sitting on a roof. He", "label": 3,
     "endings": ["is using wrap to wrap skis.", "is ripping tiles off.", "is holding a cube.",
                 "starts pulling up roofing."]},
    {"ctx_a": "A woman walks into the kitchen.", "ctx_b": "she", "label": "1",
     "endings": ["opens the fridge", "sits", "sings a song about the sea", "x"]},
    {"ctx": "The cat", "label": 0, "endings": ["sat.", "flew over the moon", "ran", "meowed loudly"]},
    {"ctx": "Numbers: 1, 2, 3,", "label": 1, "endings": ["4", "four, five", "5, 6", "seven"]},
    {"ctx": "She opened the door and", "label": 2, "endings": ["left", "smiled at him", "ran out", "x y"]},
]


@pytest.fixture(scope="module")
def params():
    p = init_params(CONFIG, jax.random.key(3))
    p["wte"]["embedding"] = p["wte"]["embedding"] * 40.0  # spread logits: no near-ties
    return p


@pytest.fixture(scope="module")
def model_dir(params, tmp_path_factory):
    """The export, with GPT-2's tokenizer files (the harness's hf model reads them)."""
    path = tmp_path_factory.mktemp("harness") / "model"
    save_pretrained(CONFIG, params, path)
    files = bpe_files()
    shutil.copy(files["encoder.json"], path / "vocab.json")
    shutil.copy(files["vocab.bpe"], path / "merges.txt")
    return path


@pytest.fixture(scope="module")
def lm(model_dir):
    model = JaxgptLM(str(model_dir), batch_size=4, progress=False)
    yield model
    model.close()


@pytest.fixture(scope="module")
def reference(model_dir):
    """log-softmax of transformers' GPT-2 in float64 over a list of ids."""
    model = transformers.GPT2LMHeadModel.from_pretrained(model_dir).double().eval()

    def logp(ids):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        return torch.log_softmax(logits, -1).numpy()

    return logp


@pytest.fixture(scope="module")
def hellaswag_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hs") / "hellaswag.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in HELLASWAG))
    return path


def direct_loglikelihood(logp, context, continuation):
    """The harness's rule computed by hand: the model reads the last 19 + 1 ids but the final
    one; the continuation's tokens are scored at the last positions."""
    whole = context + continuation
    ids = whole[-(CONFIG.context_length + 1):][:-1]
    n = min(len(continuation), len(ids))
    lp = logp(ids)
    targets = continuation[-n:]
    rows = range(len(ids) - n, len(ids))
    total = sum(lp[t, y] for t, y in zip(rows, targets))
    greedy = all(int(np.argmax(lp[t])) == y for t, y in zip(rows, targets))
    return total, greedy


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


PAIRS = [("The cat", " sat on the mat."),  # short
         ("Numbers: 1, 2, 3,", " 4"),
         (" ".join(["the long context goes on"] * 6), " and on and on"),  # context cut from the left
         ("Short.", " " + " ".join(["a continuation longer than the whole window"] * 3)),
         ("", "Nothing before this text.")]  # the prefix token (<|endoftext|>) as context


def test_loglikelihood_equals_a_float64_forward_pass(lm, reference):
    got = lm.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    for (context, continuation), (logp, greedy) in zip(PAIRS, got):
        if context:
            ctx = TOK.encode(context)
            cont = TOK.encode(context + continuation)[len(ctx):]
        else:
            ctx, cont = [TOK.eot_token], TOK.encode(continuation)
        want, want_greedy = direct_loglikelihood(reference, ctx, cont)
        assert logp == pytest.approx(want, abs=1e-4, rel=1e-6), (context, continuation)
        assert greedy == want_greedy
    assert len({round(x, 3) for x, _ in got}) == len(PAIRS)  # distinct: no row answered for another


def test_the_greedy_flag_is_true_for_the_models_own_continuation(lm, params):
    ids = TOK.encode("Once upon a time")
    out = generate(params, CONFIG, [ids], 6)[0].tolist()
    text = TOK.decode(out[len(ids):])
    if TOK.encode("Once upon a time" + text) != out:  # the harness re-tokenizes context + text
        pytest.skip("the greedy continuation does not round-trip through the tokenizer")
    (_, greedy), = lm.loglikelihood(requests("loglikelihood", [("Once upon a time", text)]),
                                    disable_tqdm=True)
    assert greedy


def test_rolling_windows_predict_every_token_once():
    tokens = list(range(100, 147))  # 47 tokens, windows of 19: 19 + 19 + 9
    windows = rolling_windows(tokens, prefix_id=7, max_length=19)
    assert [len(c) for _, c in windows] == [19, 19, 9]
    assert sum((list(c) for _, c in windows), []) == tokens
    assert list(windows[0][0]) == [7]


def test_loglikelihood_rolling_equals_the_documents_summed_token_loss(lm, reference):
    short = "A short document."
    long = " ".join(["the document runs on past the window"] * 6)
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(short,), (long,)]),
                                   disable_tqdm=True)
    # short: one pass over <|endoftext|> + the document, every token scored
    ids = [TOK.eot_token] + TOK.encode(short)
    lp = reference(ids)
    assert got[0] == pytest.approx(sum(lp[t, ids[t + 1]] for t in range(len(ids) - 1)), abs=1e-4)
    # long: each token scored once, after the (at most) 19 ids before it, window by window
    tokens = TOK.encode(long)
    L = CONFIG.context_length
    assert len(tokens) > 2 * L
    want, padded = 0.0, [TOK.eot_token] + tokens
    for start in range(0, len(tokens), L):
        end = min(start + L, len(tokens))
        ids = padded[max(end - L, 0) : end]  # the window's input: the L ids before each target
        lp = reference(ids)
        offset = max(end - L, 0)
        want += sum(lp[t - offset, padded[t + 1]] for t in range(start, end))
    assert got[1] == pytest.approx(want, abs=1e-3, rel=1e-6)


def test_generate_until_equals_greedy_generate_with_the_same_stops(lm, params):
    prompts = ["The cat sat", "Numbers: 1, 2,", "She opened the door and"]
    stops = [".", "\n", "the"]
    got = lm.generate_until(requests("generate_until", [
        (p, {"until": [s], "max_gen_toks": 12, "do_sample": False}) for p, s in zip(prompts, stops)]),
        disable_tqdm=True)
    for prompt, stop, text in zip(prompts, stops, got):
        ids = TOK.encode(prompt)
        out = generate(params, CONFIG, [ids], 12, eos_id=TOK.eot_token)[0].tolist()[len(ids):]
        out = out[: out.index(TOK.eot_token)] if TOK.eot_token in out else out
        full = TOK.decode(out)
        assert text == full.split(stop)[0]


def test_the_harness_hf_model_gives_the_same_numbers(lm, model_dir, hellaswag_file):
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(model_dir), batch_size=4, dtype="float32", device="cpu")
    pairs = [p for p in PAIRS if len(TOK.encode(p[1])) <= CONFIG.context_length]  # hf refuses longer
    ours = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    theirs = hf.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    for (a, ga), (b, gb) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    doc = " ".join(["the document runs on past the window"] * 6)
    r_ours = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(doc,)]), disable_tqdm=True)
    r_theirs = hf.loglikelihood_rolling(requests("loglikelihood_rolling", [(doc,)]), disable_tqdm=True)
    assert r_ours[0] == pytest.approx(r_theirs[0], abs=1e-3)
    meta = {"hellaswag_file": str(hellaswag_file)}
    m_ours = metric_values(evaluate(lm, ["jaxgpt_hellaswag"], metadata=meta))
    m_theirs = metric_values(evaluate(hf, ["jaxgpt_hellaswag"], metadata=meta))
    assert m_ours == m_theirs


def test_hellaswag_task_acc_equals_jaxgpts_scorer(lm, params, hellaswag_file):
    results = evaluate(lm, ["jaxgpt_hellaswag"], metadata={"hellaswag_file": str(hellaswag_file)},
                       log_samples=True)
    expected = score(params, CONFIG, read_examples(hellaswag_file))
    assert results["results"]["jaxgpt_hellaswag"]["acc,none"] == expected["acc"]
    samples = sorted(results["samples"]["jaxgpt_hellaswag"], key=lambda s: s["doc_id"])
    for s, sums in zip(samples, expected["sum_loss"]):  # per ending: the same summed log-likelihood
        got = [float(r[0]) for r in s["filtered_resps"]]
        np.testing.assert_allclose(got, -np.asarray(sums), atol=1e-4)


def test_book_instruction_tasks_read_the_test_split(lm, data_dir):
    results = evaluate(lm, ["book_instruct", "book_instruct_gen"], limit=2, log_samples=True)
    got = results["results"]
    assert got["book_instruct"]["perplexity,none"] > 1 and 0 <= got["book_instruct"]["acc,none"] <= 1
    assert "exact_match,strip" in got["book_instruct_gen"]
    from jaxgpt.data.corpus import dataset_path
    from jaxgpt.tasks.instruct.data import load_records, split_records

    test = split_records(load_records(dataset_path("instruction-data"))).test
    docs = [s["doc"] for s in results["samples"]["book_instruct"]]
    assert [d["output"] for d in docs] == [r["output"] for r in test[:2]]
    assert all(d["query"].endswith("### Response:\n") for d in docs)


def test_eval_command(model_dir, params, hellaswag_file, tmp_path, capsys):
    from jaxgpt.cli.eval import main

    out = tmp_path / "results.json"
    meta = json.dumps({"hellaswag_file": str(hellaswag_file)})
    assert main(["--model", str(model_dir), "--tasks", "jaxgpt_hellaswag", "--metadata", meta,
                 "--output", str(out), "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "jaxgpt_hellaswag" in printed and "acc_norm" in printed
    written = metric_values(json.loads(out.read_text()))
    assert written["jaxgpt_hellaswag/acc"] == score(params, CONFIG, read_examples(hellaswag_file))["acc"]


@pytest.mark.parametrize("args, message", [
    (["--tasks", "jaxgpt_helaswag"], "unknown task 'jaxgpt_helaswag'; did you mean jaxgpt_hellaswag"),
    (["--tasks", "jaxgpt_hellaswag", "--metadata", '{"hellaswag_file": "/nowhere.jsonl"}'],
     "task jaxgpt_hellaswag: HellaSwag file /nowhere.jsonl does not exist"),
    (["--tasks", "jaxgpt_hellaswag", "--metadata", "[1]"], "--metadata must be a JSON object"),
    (["--tasks", "jaxgpt_hellaswag", "--limit", "0"], "--limit must be positive"),
    (["--tasks", "arc_easy"], "task arc_easy reads the data set allenai/ai2_arc from the Hugging Face hub"),
])
def test_eval_command_refuses_in_one_line(model_dir, args, message, capsys, monkeypatch):
    from jaxgpt.cli.eval import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert main(["--model", str(model_dir), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_training_logs_the_harness_scores_of_the_checkpointed_model(hellaswag_file, corpus, tmp_path):
    from jaxgpt.tasks.pretraining import pretrain
    from jaxgpt.training.metrics import read_metrics
    from jaxgpt.training.runconfig import load_config
    from jaxgpt.weights.loader import load_model

    cfg = load_config(None, TINY_RUN + [f"runs_dir={tmp_path}", f"data.source={corpus}",
                                        f"data.hellaswag={hellaswag_file}",
                                        "data.harness_tasks=jaxgpt_hellaswag", "train.max_steps=3",
                                        "train.eval_freq=2", "train.checkpoint_every=3",
                                        "train.report=false"])
    pretrain(cfg)
    evals = [r for r in read_metrics(tmp_path / "default" / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [1, 3]
    config, trained = load_model(tmp_path / "default")  # the step-3 checkpoint
    expected = score(trained, config, read_examples(hellaswag_file))
    assert evals[-1]["harness/jaxgpt_hellaswag/acc"] == expected["acc"]
    assert evals[-1]["hellaswag_acc"] == expected["acc"]
    assert (tmp_path / "default" / "tensorboard").is_dir()


def test_a_qwen3_directory_scores_as_the_hf_model_scores_it(qwen_like_dir):
    from lm_eval.models.huggingface import HFLM

    pairs = [("red green", " blue cat"), ("", "dog sun moon"), ("tree river stone", " Repeat.")]
    ours = JaxgptLM(str(qwen_like_dir), batch_size=2, progress=False)
    hf = HFLM(pretrained=str(qwen_like_dir), batch_size=2, dtype="float32", device="cpu")
    assert ours.prefix_token_id == hf.prefix_token_id and ours.eot_token_id == hf.eot_token_id
    for context, continuation in pairs:
        assert ours.tok_encode(context + continuation) == hf.tok_encode(context + continuation)
    a = ours.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    b = hf.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    np.testing.assert_allclose([x for x, _ in a], [x for x, _ in b], atol=1e-4)
    assert [g for _, g in a] == [g for _, g in b]


MESH_WORKER = """
import json, sys
from jaxgpt.tasks.harness.lm import JaxgptLM
from lm_eval.api.instance import Instance
pairs = [("The cat", " sat on the mat."), ("Numbers: 1, 2, 3,", " 4"), ("A", " b c d e")]
reqs = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
out = {}
for name, mesh in (("one", {}), ("fsdp", {"fsdp": "2"}), ("tensor", {"tensor": "2"})):
    lm = JaxgptLM(sys.argv[1], batch_size=4, progress=False, **mesh)
    out[name] = [x for x, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
print(json.dumps(out))
"""


def test_the_weights_split_over_a_mesh_score_the_same(model_dir):
    import os
    import subprocess

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", MESH_WORKER, str(model_dir)], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(out["fsdp"], out["one"], atol=1e-4)
    np.testing.assert_allclose(out["tensor"], out["one"], atol=1e-4)
