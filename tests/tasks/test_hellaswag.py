"""HellaSwag scoring: the batched, padded scorer equals one forward pass per ending; the
command and the evaluation hook report what the scorer computes."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgpt.config import GPTConfig
from jaxgpt.models.model import GPT, init_params
from jaxgpt.tasks.hellaswag import read_examples, score
from jaxgpt.data.tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e" / "workers"))
from train_run import TINY_RUN  # noqa: E402

# GPT-2's vocabulary (the scorer tokenizes text), everything else tiny and odd; a context of
# 19 tokens so the long example is cut to its last tokens.
CONFIG = GPTConfig(vocab_size=50257, context_length=19, emb_dim=12, n_heads=3, n_layers=2,
                   drop_rate=0.0, dtype="float32")

ROWS = [
    {"ctx": "A man is sitting on a roof. He", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"ctx_a": "A woman walks into the kitchen.", "ctx_b": "she", "label": "1",
     "endings": ["opens the fridge", "sits", "sings a long song about the weather and the sea", "x"]},
    {"ctx": "The cat", "label": 0, "endings": ["sat.", "flew over the moon again", "ran", "meowed loudly"]},
    {"ctx": " ".join(["the long context goes on"] * 8), "label": 2,  # longer than the context
     "endings": ["and on", "and then stops here", "forever", "no"]},
    {"ctx": "Numbers: 1, 2, 3,", "label": 1, "endings": ["4", "four, five", "5, 6", "seven"]},
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hs") / "hellaswag.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.fixture(scope="module")
def params():
    p = init_params(CONFIG, jax.random.key(3))
    # Larger token embeddings spread the (tied) logits, so the endings' losses differ by far
    # more than float32 rounding and the choices are not near-ties.
    p["wte"]["embedding"] = p["wte"]["embedding"] * 40.0
    return p


def direct_losses(params, context: str, ending: str) -> tuple[float, float]:
    """One unpadded forward pass of context + ending; (summed, mean) loss of the ending tokens,
    log-softmax in float64 numpy."""
    tok = get_tokenizer("gpt2")
    ctx, end = tok.encode_ordinary(context), tok.encode_ordinary(" " + ending)
    ids = (ctx + end)[-CONFIG.context_length:]
    n_end = min(len(end), len(ids) - 1)
    logits = np.asarray(GPT(CONFIG).apply({"params": params}, np.asarray([ids], np.int32))[0], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = [-logp[t - 1, ids[t]] for t in range(len(ids) - n_end, len(ids))]
    return float(np.sum(nll)), float(np.mean(nll))


def test_reader_accepts_both_context_layouts(data_file, tmp_path):
    examples = read_examples(data_file)
    assert examples[1].context == "A woman walks into the kitchen. she" and examples[1].label == 1
    assert [len(e.endings) for e in examples] == [4] * len(ROWS)
    assert len(read_examples(data_file, limit=2)) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"ctx": "a", "endings": ["b", "c"], "label": 2}) + "\n")
    with pytest.raises(ValueError, match="line 1: label 2 is not an index"):
        read_examples(bad)


@pytest.mark.parametrize("rows_per_call", [32, 3])  # all rows in one call; calls mixing examples
def test_scorer_equals_one_forward_pass_per_ending(data_file, params, rows_per_call):
    examples = read_examples(data_file)
    result = score(params, CONFIG, examples, rows_per_call=rows_per_call)
    for i, ex in enumerate(examples):
        ref = np.array([direct_losses(params, ex.context, e) for e in ex.endings])  # [E, 2]
        np.testing.assert_allclose(result["sum_loss"][i], ref[:, 0], rtol=2e-5)
        np.testing.assert_allclose(result["mean_loss"][i], ref[:, 1], rtol=2e-5)
        assert result["pred"][i] == int(np.argmin(ref[:, 0]))
        assert result["pred_norm"][i] == int(np.argmin(ref[:, 1]))
        gaps = np.diff(np.sort(ref, axis=0), axis=0)[0]  # best vs second best: no near-tie
        assert (gaps > 1e-3).all()
    labels = np.array([ex.label for ex in examples])
    assert result["acc"] == np.mean(result["pred"] == labels)
    assert result["acc_norm"] == np.mean(result["pred_norm"] == labels)


def test_command_scores_an_exported_model(data_file, params, tmp_path, capsys):
    from jaxgpt.cli.hellaswag import main
    from jaxgpt.weights.huggingface import save_pretrained

    save_pretrained(CONFIG, params, tmp_path / "model")
    assert main(["--model", str(tmp_path / "model"), "--data", str(data_file), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = score(params, CONFIG, read_examples(data_file))
    assert printed == {"acc": expected["acc"], "acc_norm": expected["acc_norm"], "examples": len(ROWS)}
    assert main(["--model", str(tmp_path / "model"), "--data", str(tmp_path / "none.jsonl")]) == 1
    assert "none.jsonl does not exist" in capsys.readouterr().err


def test_evaluations_log_the_score_of_the_checkpointed_model(data_file, corpus, tmp_path):
    from jaxgpt.weights.loader import load_model
    from jaxgpt.tasks.pretraining import pretrain
    from jaxgpt.training.metrics import read_metrics
    from jaxgpt.training.runconfig import load_config

    cfg = load_config(None, TINY_RUN + [f"runs_dir={tmp_path}", f"data.source={corpus}",
                                        f"data.hellaswag={data_file}", "train.max_steps=3",
                                        "train.eval_freq=2", "train.checkpoint_every=3",
                                        "train.report=false"])
    pretrain(cfg)
    evals = [r for r in read_metrics(tmp_path / "default" / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [1, 3]
    config, trained = load_model(tmp_path / "default")  # the step-3 checkpoint
    expected = score(trained, config, read_examples(data_file))
    assert evals[-1]["hellaswag_acc"] == expected["acc"]
    assert evals[-1]["hellaswag_acc_norm"] == expected["acc_norm"]
