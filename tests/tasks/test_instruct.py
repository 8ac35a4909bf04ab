"""Instruction tuning: records, splits, templates, collation, the loss mask, and a tiny run."""

import importlib.util
import io
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import GPTConfig, init_params
from jaxgpt.data.corpus import dataset_path
from jaxgpt.data.windows import IGNORE as STEP_IGNORE
from jaxgpt.tasks.instruct.data import (
    IGNORE,
    InstructDataset,
    collate,
    load_records,
    split_records,
)
from jaxgpt.tasks.instruct.finetune import InstructRunConfig, mean_loss
from jaxgpt.data.prompts import extract_response, get_template
from jaxgpt.tasks.instruct.responses import generate_responses
from jaxgpt.data.tokenizer import EOT_ID, get_tokenizer
from jaxgpt.training.losses import cross_entropy_sum, lm_loss_fn
from jaxgpt.training.runconfig import load_config
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]
PAD = 50256


def book_collate(batch, prompt_lengths=None, *, pad=PAD, allowed=None, length=None,
                 mask_prompt=False):
    """The book's custom_collate_fn, one example at a time in plain Python (plus fixed length)."""
    width = (max(len(x) for x in batch) if length is None else length) + 1
    inputs, targets = [], []
    for b, item in enumerate(batch):
        new = list(item) + [pad]
        padded = (new + [pad] * (width - len(new)))[:max(width, len(new))]
        x, y = padded[:width - 1], padded[1:width]
        pads = [i for i, t in enumerate(y) if t == pad]
        for i in pads[1:]:
            y[i] = IGNORE
        if mask_prompt:
            y[:prompt_lengths[b] - 1] = [IGNORE] * (prompt_lengths[b] - 1)
        if allowed is not None:
            x, y = x[:allowed], y[:allowed]
        inputs.append(x)
        targets.append(y)
    return np.array(inputs), np.array(targets)


def _records(n, *, seed=0):
    rng = np.random.default_rng(seed)
    words = "red green blue cat dog sun moon tree river stone".split()
    out = []
    for i in range(n):
        w = rng.choice(words, 3)
        out.append({"instruction": f"Repeat {w[0]} {w[1]}.",
                    "input": f"{w[2]}" if i % 3 == 0 else "",
                    "output": f"{w[0]} {w[1]}"})
    return out


# ---- collation ---------------------------------------------------------------------------------


BATCH = [[5, 11, 7, 3, 9], [2], [8, 4, 6, 1, 12, 13, 14, 10, 15], [3, 3, 7]]
PROMPTS = [3, 1, 4, 2]


@pytest.mark.parametrize("mask_prompt", [False, True])
@pytest.mark.parametrize("allowed, length", [(None, None), (7, None), (None, 13), (6, 11),
                                             (1024, 5)])
def test_collate_matches_the_books_algorithm(mask_prompt, allowed, length):
    inputs, targets = book_collate(BATCH, PROMPTS, allowed=allowed, length=length,
                                   mask_prompt=mask_prompt)
    out = collate(BATCH, PROMPTS, allowed_max_length=allowed, length=length, mask_prompt=mask_prompt)
    assert out["inputs"].dtype == np.int32 and out["targets"].dtype == np.int32
    np.testing.assert_array_equal(out["inputs"], inputs)
    np.testing.assert_array_equal(out["targets"], targets)


def test_collate_on_random_batches_of_different_lengths():
    rng = np.random.default_rng(3)
    for _ in range(20):
        lengths = rng.integers(1, 19, rng.integers(1, 6))
        batch = [rng.integers(0, PAD, n).tolist() for n in lengths]
        prompts = [int(rng.integers(1, n + 1)) for n in lengths]
        mask, allowed = bool(rng.integers(2)), int(rng.integers(3, 21))
        inputs, targets = book_collate(batch, prompts, allowed=allowed, mask_prompt=mask)
        out = collate(batch, prompts, allowed_max_length=allowed, mask_prompt=mask)
        np.testing.assert_array_equal(out["inputs"], inputs)
        np.testing.assert_array_equal(out["targets"], targets)


def test_collate_invariants():
    out = collate(BATCH, allowed_max_length=None)
    inputs, targets = out["inputs"], out["targets"]
    lengths = np.array([len(x) for x in BATCH])
    assert inputs.shape == targets.shape == (4, 9)
    counted = targets != IGNORE
    np.testing.assert_array_equal(counted.sum(1), lengths)  # every token after the first + EOT
    np.testing.assert_array_equal(targets[np.arange(4), lengths - 1], PAD)  # the one kept EOT
    # Wherever a target counts, it is the next input token (the shift), or the appended EOT.
    shifted = np.concatenate([inputs[:, 1:], np.full((4, 1), PAD)], axis=1)
    np.testing.assert_array_equal(targets[counted], shifted[counted])


def test_ignore_index_is_the_losss():
    assert IGNORE == STEP_IGNORE == -100


def test_masked_prompt_leaves_exactly_the_response_and_eot():
    tok = get_tokenizer("gpt2")
    records = _records(6)
    for name in ("alpaca", "phi3"):
        data = InstructDataset(records, name, mask_prompt=True, allowed_max_length=1024)
        rows = data.rows(np.arange(6))
        for b, r in enumerate(records):
            kept = rows["targets"][b][rows["targets"][b] != IGNORE].tolist()
            assert kept[-1] == EOT_ID
            assert tok.decode(kept[:-1]) == r["output"]
        unmasked = InstructDataset(records, name, mask_prompt=False).rows(np.arange(6))
        np.testing.assert_array_equal(rows["inputs"], unmasked["inputs"])


def test_dataset_rows_have_one_shape_or_bucketed_shapes():
    records = _records(9)
    fixed = InstructDataset(records, "phi3")
    shapes = {fixed.rows(np.array([i, (i + 4) % 9]))["inputs"].shape for i in range(9)}
    assert shapes == {(2, max(len(t) for t in fixed.tokens))}
    bucketed = InstructDataset(records, "alpaca", bucket=16)
    assert all(bucketed.rows(np.array([i]))["inputs"].shape[1] % 16 == 0 for i in range(9))
    capped = InstructDataset(records, "alpaca", allowed_max_length=23)
    assert capped.rows(np.arange(3))["inputs"].shape == (3, 23)


# ---- the loss sees only counted targets ---------------------------------------------------------


def test_loss_ignores_masked_targets_exactly():
    out = collate(BATCH, PROMPTS, mask_prompt=True, pad_id=16, allowed_max_length=None)
    targets = jnp.asarray(out["targets"])
    logits = jax.random.normal(jax.random.key(0), targets.shape + (17,))
    noise = 50.0 * jax.random.normal(jax.random.key(1), logits.shape)
    masked = (targets == IGNORE)[..., None]
    base = cross_entropy_sum(logits, targets)
    np.testing.assert_array_equal(cross_entropy_sum(jnp.where(masked, logits + noise, logits), targets), base)
    assert cross_entropy_sum(jnp.where(masked, logits, logits + noise), targets) != base


def test_model_loss_ignores_tokens_after_each_example():
    # Causal attention: inputs after an example's end only change logits at ignored positions.
    cfg = GPTConfig(**TINY)
    batch = [x[:9] for x in BATCH]
    batch = [[t % 16 for t in x] for x in batch]
    out = collate(batch, pad_id=16, allowed_max_length=None)
    lengths = np.array([len(x) for x in batch])
    changed = out["inputs"].copy()
    after = np.arange(changed.shape[1])[None, :] >= lengths[:, None]
    changed[after] = np.random.default_rng(0).integers(0, 16, after.sum())
    params = init_params(cfg, jax.random.key(0))
    loss = lambda x: lm_loss_fn(cfg)(params, None, {"inputs": x, "targets": out["targets"]},  # noqa: E731
                                     jax.random.key(0), True)[0]
    np.testing.assert_allclose(loss(changed), loss(out["inputs"]), rtol=1e-6)


# ---- records and splits -----------------------------------------------------------------------


def test_book_split_sizes_and_order():
    records = [{"instruction": str(i), "input": "", "output": str(i)} for i in range(1100)]
    train, test, val = split_records(records)
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert train + test + val == records  # file order, nothing lost


def test_shuffled_split_is_a_seeded_permutation():
    records = [{"instruction": str(i), "input": "", "output": ""} for i in range(1100)]
    a, b = split_records(records, shuffle=True, seed=7), split_records(records, shuffle=True, seed=7)
    assert a == b and tuple(map(len, a)) == (935, 110, 55)
    assert sorted(r["instruction"] for part in a for r in part) == sorted(r["instruction"] for r in records)
    assert a.train != records[:935] and split_records(records, shuffle=True, seed=8) != a


def test_split_on_the_real_data(data_dir, monkeypatch):
    monkeypatch.setenv("JAXGPT_DATA_DIR", data_dir)
    records = load_records("instruction-data")
    assert len(records) == 1100 and sum(bool(r["input"]) for r in records) == 325
    assert tuple(map(len, split_records(records))) == (935, 110, 55)
    assert load_records(dataset_path("instruction-data")) == records


def test_json_and_jsonl_files_load_the_same(tmp_path):
    records = _records(5)
    (tmp_path / "d.json").write_text(json.dumps(records))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert load_records(tmp_path / "d.json") == load_records(str(tmp_path / "d.jsonl")) == records


def test_missing_fields_are_reported_by_index(tmp_path):
    records = _records(12)
    del records[3]["output"]
    del records[7]["input"]
    records[9]["instruction"] = None
    (tmp_path / "d.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"3 \(output\), 7 \(input\), 9 \(instruction\)$"):
        load_records(tmp_path / "d.json")
    for i in range(12):
        records[i].pop("output", None)
    with pytest.raises(ValueError, match=r"0 \(output\), 1 \(output\), .* and 7 more"):
        load_records(records)


def test_hugging_face_rows_with_a_column_mapping():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"prompt": ["Say hi.", "Add 2 and 3."], "answer": ["hi", "5"]})
    records = load_records(ds, {"instruction": "prompt", "input": None, "output": "answer"})
    assert records == [{"instruction": "Say hi.", "input": "", "output": "hi"},
                       {"instruction": "Add 2 and 3.", "input": "", "output": "5"}]
    with pytest.raises(ValueError, match="only input may be None"):
        load_records(ds, {"output": None})


def test_unknown_source_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        load_records(str(tmp_path / "nothing.json"))
    (tmp_path / "d.json").write_text('{"instruction": "x"}')
    with pytest.raises(ValueError, match="not a list of records"):
        load_records(tmp_path / "d.json")


# ---- templates and responses ------------------------------------------------------------------

PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.")


def test_alpaca_template_with_and_without_input():
    t = get_template("alpaca")
    with_input = {"instruction": "Fix the spelling.", "input": "Ocassion", "output": "Occasion"}
    assert t.full(with_input) == (PREAMBLE + "\n\n### Instruction:\nFix the spelling."
                                  "\n\n### Input:\nOcassion\n\n### Response:\nOccasion")
    assert t.prompt({**with_input, "input": ""}) == PREAMBLE + "\n\n### Instruction:\nFix the spelling."


def test_phi3_template_with_and_without_input():
    t = get_template("phi3")
    r = {"instruction": "Fix the spelling.", "input": "Ocassion", "output": "Occasion"}
    assert t.full(r) == "<|user|>\nFix the spelling.\nOcassion\n<|assistant|>:\nOccasion"
    assert t.query({**r, "input": ""}) == "<|user|>\nFix the spelling.\n<|assistant|>:\n"
    with pytest.raises(ValueError, match="unknown prompt template 'chatml'"):
        get_template("chatml")


def test_response_extraction():
    r = {"instruction": "Name a colour.", "input": "", "output": "Red"}
    for name in ("alpaca", "phi3"):
        t = get_template(name)
        assert extract_response(t.full(r), t) == "Red"
        assert extract_response(t.query(r) + " Blue.\n", name, query=t.query(r)) == "Blue."
    alpaca = get_template("alpaca")
    repeated = alpaca.query(r) + "### Response:\nBlue"  # a header the model wrote again
    assert extract_response(repeated, alpaca, query=alpaca.query(r)) == "Blue"
    rambling = alpaca.query(r) + "Green\n\n### Instruction:\nName another."
    assert extract_response(rambling, alpaca) == "Green"
    assert extract_response("<|user|>\nhi\n<|assistant|>:\nhello\n<|user|>\nbye", "phi3") == "hello"
    # A marker inside the instruction does not fool extraction given the query.
    tricky = {"instruction": "Explain '### Response:' markers.", "input": "", "output": ""}
    assert extract_response(alpaca.query(tricky) + "They open answers.", alpaca,
                            query=alpaca.query(tricky)) == "They open answers."


# ---- generation and the finetuning script -----------------------------------------------------

SMALL = GPTConfig(vocab_size=50257, context_length=29, emb_dim=12, n_heads=3, n_layers=2,
                  drop_rate=0.0, dtype="float32")


def test_batched_responses_equal_one_at_a_time():
    params = init_params(SMALL, jax.random.key(2))
    records = _records(5, seed=1)
    batched = generate_responses(params, SMALL, records, "phi3", max_new_tokens=4, batch_size=3)
    single = generate_responses(params, SMALL, records, "phi3", max_new_tokens=4, batch_size=1)
    assert batched == single
    assert [r["instruction"] for r in batched] == [r["instruction"] for r in records]
    assert all(isinstance(r["model_response"], str) and isinstance(r["ended"], bool) for r in batched)


def test_mean_loss_does_not_count_the_rows_that_fill_a_batch():
    params = init_params(SMALL, jax.random.key(2))
    data = InstructDataset(_records(5), "phi3", allowed_max_length=SMALL.context_length)
    np.testing.assert_allclose(mean_loss(params, SMALL, data, 3), mean_loss(params, SMALL, data, 1),
                               rtol=1e-6)


def _script():
    path = ROOT / "train" / "finetune_instruct.py"
    spec = importlib.util.spec_from_file_location("finetune_instruct", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=["full", "lora"])
def tiny_run(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    data = tmp / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _records(100)))
    args = [f"runs_dir={tmp}", f"name={request.param}", f"instruct.data={data}",
            "instruct.init_from=scratch", "instruct.template=phi3", "instruct.max_new_tokens=5",
            "instruct.response_batch_size=3", "instruct.max_test_records=4", "instruct.mask_prompt=true",
            "model.vocab_size=50257", "model.context_length=29", "model.emb_dim=12",
            "model.n_heads=3", "model.n_layers=2", "model.drop_rate=0.0",
            "optim.learning_rate=1e-2", "train.batch_size=4", "train.max_steps=3",
            "train.eval_freq=2", "train.eval_iter=1", "train.sample_tokens=3",
            "train.progress=false", "train.report=false"]
    if request.param == "lora":
        args += ["lora.rank=2", "lora.alpha=4.0"]
    assert _script().main(["--config", str(ROOT / "configs" / "instruct_book.yaml"), *args]) == 0
    return tmp / request.param


def test_finetune_script_writes_responses_summary_and_model(tiny_run):
    responses = json.loads((tiny_run / "test_responses.json").read_text())
    assert len(responses) == 4  # 100 records: 85 train, 10 test (4 answered), 5 validation
    assert all(set(r) == {"instruction", "input", "output", "model_response", "ended"} for r in responses)
    summary = json.loads((tiny_run / "instruct_summary.json").read_text())
    assert summary["steps"] == 3 and summary["test_records"] == 4
    assert np.isfinite(summary["val_loss_before"]) and np.isfinite(summary["val_loss_after"])
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [1, 3]
    assert all("sample" in r for r in records if r["kind"] == "eval")
    assert (tiny_run / "model" / "model.safetensors").is_file()
    saved = load_config(tiny_run / "config.yaml", schema=InstructRunConfig)
    assert saved.instruct.template == "phi3" and (saved.lora is None) == (tiny_run.name == "full")


def test_chat_answers_each_line_until_exit(tiny_run, monkeypatch, capsys):
    from jaxgpt.cli import chat
    from jaxgpt.tasks.instruct import responses

    calls = []
    real = responses.generate_responses
    monkeypatch.setattr(responses, "generate_responses",
                        lambda *a, **k: calls.append(a[2][0]["instruction"]) or real(*a, **k))
    monkeypatch.setattr("sys.stdin", io.StringIO("Repeat red cat.\n\nRepeat sun tree.\nexit\nnever\n"))
    assert chat.main(["--model", str(tiny_run), "--max-new-tokens", "3"]) == 0
    assert calls == ["Repeat red cat.", "Repeat sun tree."]
    monkeypatch.setattr("sys.stdin", io.StringIO("one\n"))  # end of input also ends the session
    assert chat.main(["--model", str(tiny_run), "--max-new-tokens", "3"]) == 0
    assert chat.main(["--model", str(tiny_run / "nowhere")]) == 1
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("instruct_*.yaml")), ids=lambda p: p.name)
def test_instruct_configs_load(path):
    cfg = load_config(path, schema=InstructRunConfig)
    assert cfg.instruct.template in ("alpaca", "phi3", "chat") and cfg.train.batch_size == 8


def test_book_recipe():
    cfg = load_config(ROOT / "configs" / "instruct_book.yaml", schema=InstructRunConfig)
    o, t, i = cfg.optim, cfg.train, cfg.instruct
    assert (i.init_from, i.data, i.template, i.max_new_tokens) == \
        ("gpt2-medium", "instruction-data", "alpaca", 256)
    assert (o.learning_rate, o.weight_decay, t.epochs, t.batch_size, cfg.model.drop_rate) == \
        (5e-5, 0.1, 2, 8, 0.0)
    assert cfg.lora is None
    assert load_config(ROOT / "configs" / "instruct_lora.yaml", schema=InstructRunConfig).lora.rank == 16
