"""Classification (chapter 6): data splits, padding, pooling, what trains, metrics, saved runs."""

import csv
import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from jaxgpt.lora import transform as lora
from jaxgpt.config import GPTConfig
from jaxgpt.models.model import init_params
from jaxgpt.tasks.classification.data import (
    ClassifierDataConfig,
    balance,
    build_datasets,
    encode_labels,
    label_list,
    load_labels,
    load_splits,
    pad_batch,
    random_split,
    save_labels,
    split_sizes,
)
from jaxgpt.tasks.classification.finetune import evaluate, finetune, init_backbone
from jaxgpt.tasks.classification.model import (
    ClassifierConfig,
    ClassifierRunConfig,
    accuracy,
    classification_loss_fn,
    classifier_logits,
    classify,
    init_head,
    load_classifier,
    merge_trainable,
    pool,
    split_trainable,
    with_head,
)
from jaxgpt.tasks.classification.readers import read_sms_spam, read_source, read_table
from jaxgpt.data.tokenizer import EOT_ID
from jaxgpt.training.checkpoint import Checkpointer
from jaxgpt.training.runconfig import ConfigError, RunConfig, load_config, save_config
from jaxgpt.training.state import init_state
from jaxgpt.training.step import eval_step, train_step

ROOT = Path(__file__).resolve().parents[2]
# GPT-2's vocabulary (the tokenizer's ids), otherwise tiny, odd and distinct sizes.
TINY = dict(vocab_size=50257, context_length=19, emb_dim=12, n_heads=3, n_layers=2, drop_rate=0.0,
            dtype="float32")  # float32 on every backend (see tests/conftest.py)
QUIET = ["train.progress=false", "train.report=false"]

SPAM = "win cash prize now claim free call txt urgent reward".split()
HAM = "see you later at home tonight ok lunch mum sorry".split()


def _sms_lines(n_spam=13, n_ham=28, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(["spam"] * n_spam + ["ham"] * n_ham)
    lines = [f"{lab}\t" + " ".join(rng.choice(SPAM if lab == "spam" else HAM, rng.integers(2, 12)))
             for lab in labels]
    # A stray quote opens a "field" that a CSV reader closes only at the next quote, lines later.
    lines[4] = lines[4].split("\t")[0] + '\t"Hey there how are you'
    lines[9] = lines[9] + ' she said "ok'
    return lines


@pytest.fixture(scope="module")
def sms_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sms") / "SMSSpamCollection"
    path.write_text("\n".join(_sms_lines()) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny GPT-2 checkpoint in Hugging Face's layout (the pretrained-weights path)."""
    from jaxgpt.weights.huggingface import save_pretrained

    config = GPTConfig(**TINY, qkv_bias=True, tie_embeddings=True)
    return save_pretrained(config, init_params(config, jax.random.key(3)),
                           tmp_path_factory.mktemp("hf") / "tiny-gpt2")


# ---- data ----------------------------------------------------------------------------------


def test_sms_reader_reads_line_by_line(sms_file):
    texts, labels = read_sms_spam(sms_file)
    assert len(texts) == 41 and labels.count("spam") == 13 and labels.count("ham") == 28
    assert texts[4] == '"Hey there how are you'
    merged = list(csv.reader(io.StringIO(sms_file.read_text()), delimiter="\t"))
    assert len(merged) < 41  # the pitfall the line-by-line reading avoids
    assert read_table(sms_file) == (texts, labels)  # a suffix-less file has the same format


def test_real_sms_collection_counts_and_book_split(data_dir):
    texts, labels = read_source("sms-spam")["train"]
    assert (len(texts), labels.count("spam"), labels.count("ham")) == (5574, 747, 4827)
    splits = load_splits(ClassifierDataConfig(balance=True))
    sizes = [len(splits[s][0]) for s in ("train", "validation", "test")]
    assert sizes == [1045, 149, 300]  # int(0.7 * 1494), int(0.1 * 1494), the rest
    all_labels = sum((splits[s][1] for s in splits), [])
    assert all_labels.count("spam") == all_labels.count("ham") == 747


def test_balance_keeps_every_rarest_example(sms_file):
    texts, labels = read_sms_spam(sms_file)
    bt, bl = balance((texts, labels), seed=5)
    assert bl.count("spam") == bl.count("ham") == 13
    spam = [t for t, lab in zip(texts, labels) if lab == "spam"]
    assert sorted(t for t, lab in zip(bt, bl) if lab == "spam") == sorted(spam)
    assert balance((texts, labels), seed=5) == (bt, bl)
    assert balance((texts, labels), seed=6) != (bt, bl)


def test_split_sizes_follow_the_book():
    assert split_sizes(1494, [0.7, 0.1, 0.2]) == [1045, 149, 300]
    assert split_sizes(26, [0.7, 0.1, 0.2]) == [18, 2, 6]


def test_random_split_is_a_seeded_partition():
    rows = ([f"t{i}" for i in range(37)], [str(i % 3) for i in range(37)])
    parts = random_split(rows, [0.7, 0.1, 0.2], seed=1)
    assert [len(p[0]) for p in parts] == split_sizes(37, [0.7, 0.1, 0.2])
    assert sorted(sum((p[0] for p in parts), [])) == sorted(rows[0])
    pairs = {(t, lab) for p in parts for t, lab in zip(*p)}
    assert pairs == set(zip(*rows))  # texts keep their labels
    assert random_split(rows, [0.7, 0.1, 0.2], seed=1) == parts


def test_table_formats_agree_and_take_any_number_of_classes(tmp_path):
    rows = [{"msg": f'say "{w}" twice', "cls": c} for w, c in zip("abcdefg", "xyzxyzy")]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["cls", "msg"])
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "d.tsv").write_text("cls\tmsg\n" + "".join(f"{r['cls']}\t{r['msg']}\n" for r in rows))
    want = ([r["msg"] for r in rows], [r["cls"] for r in rows])
    for ext in ("json", "jsonl", "csv", "tsv"):
        assert read_table(tmp_path / f"d.{ext}", "msg", "cls") == want, ext
    assert label_list(want[1]) == ["x", "y", "z"]
    assert label_list(want[1], ["z", "x", "y"]) == ["z", "x", "y"]


def test_hugging_face_directory_keeps_its_splits(tmp_path):
    pytest.importorskip("datasets")
    lines = _sms_lines()
    for split, part in (("train", lines[:30]), ("test", lines[30:])):
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["label", "text"])
            w.writerows(line.split("\t", 1) for line in part)
    splits = load_splits(ClassifierDataConfig(source=f"hf:{tmp_path}"))
    assert len(splits["test"][0]) == 11  # given, untouched
    # validation is carved from train in the ratio validation : (train + validation)
    assert [len(splits[s][0]) for s in ("train", "validation")] == [26, 4]


def test_pad_batch_masks_real_tokens_and_truncates():
    ids = [[5, EOT_ID, 7], [9], [1, 2, 3, 4, 5, 6]]  # the pad id inside a real text
    with pytest.warns(UserWarning, match="1 test text"):
        out, mask = pad_batch(ids, 5, EOT_ID, "test")
    assert out.tolist() == [[5, EOT_ID, 7, EOT_ID, EOT_ID], [9] + [EOT_ID] * 4, [1, 2, 3, 4, 5]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1] * 5]


def test_max_length_is_the_longest_training_text(tmp_path):
    train = "label\ttext\n" + "".join(f"{lab}\t{' '.join('x' * n)}\n" for lab, n in
                                      [("a", 3), ("b", 7), ("a", 5), ("b", 2)] * 3)
    (tmp_path / "train.tsv").write_text(train)
    (tmp_path / "val.tsv").write_text("label\ttext\na\t" + " ".join("y" * 20) + "\nb\tz\n")
    cfg = ClassifierDataConfig(source=str(tmp_path / "train.tsv"), validation=str(tmp_path / "val.tsv"),
                               test=str(tmp_path / "val.tsv"))
    with pytest.warns(UserWarning, match="validation text"):
        data = build_datasets(cfg, context_length=19)
    assert data.max_length == 7 and data.train.ids.shape[1] == 7
    assert data.validation.mask.sum(1).tolist() == [7, 1]
    with pytest.warns(UserWarning, match="train text"):
        assert build_datasets(cfg, context_length=5).max_length == 5  # capped by the context
    rows = data.train.rows(np.array([2, 0]))
    assert rows["targets"].shape == (2, 1) and rows["inputs"].shape == rows["mask"].shape == (2, 7)


# ---- model ---------------------------------------------------------------------------------


def test_pooling_picks_the_right_positions():
    hidden = jax.random.normal(jax.random.key(0), (3, 7, 5))
    lengths = np.array([7, 2, 4])
    mask = (np.arange(7)[None] < lengths[:, None]).astype(np.int32)
    got = pool(hidden, mask, "last_real")
    np.testing.assert_array_equal(got, hidden[np.arange(3), lengths - 1])
    np.testing.assert_array_equal(pool(hidden, mask, "last_position"), hidden[:, -1])
    mean = np.stack([np.asarray(hidden)[i, :n].mean(0) for i, n in enumerate(lengths)])
    np.testing.assert_allclose(pool(hidden, mask, "mean"), mean, rtol=1e-6)


@pytest.mark.parametrize("pooling", ["last_real", "mean"])
def test_padded_rows_classify_like_unpadded_ones(pooling):
    config = GPTConfig(**TINY)
    params = with_head(init_params(config, jax.random.key(1)), init_head(jax.random.key(2), 12, 3))
    apply = jax.jit(classifier_logits(config, pooling))
    texts = [[11, 22, 33, 44, 55], [EOT_ID, 66], [77, 88, 99]]
    ids, mask = pad_batch(texts, 9, EOT_ID)
    batch = apply(params, ids, mask)
    for i, row in enumerate(texts):
        alone = apply(params, np.array([row]), np.ones((1, len(row)), np.int32))
        np.testing.assert_allclose(batch[i], alone[0], rtol=1e-5, atol=1e-6)


def _diff_leaves(a, b):
    flat_a, flat_b = lora._flat(a), lora._flat(b)
    assert flat_a.keys() == flat_b.keys()
    return {p for p in flat_a if not np.array_equal(flat_a[p], flat_b[p])}


@pytest.mark.parametrize("trainable", ["book", "all", "lora"])
def test_only_the_chosen_leaves_train(trainable):
    config = GPTConfig(**{**TINY, "n_layers": 3})
    cfg = ClassifierConfig(trainable=trainable, lora=lora.LoRAConfig(rank=2))
    params = with_head(init_params(config, jax.random.key(1)), init_head(jax.random.key(2), 12, 3))
    tr, frozen = split_trainable(params, config, cfg, jax.random.key(4))
    loss_fn = classification_loss_fn(config)
    if trainable == "lora":
        loss_fn = lora.lora_loss_fn(loss_fn, dataclasses.replace(cfg.lora, trainable=("^cls_head/",)))
    tx = optax.adamw(1e-2, weight_decay=0.1)
    ids, mask = pad_batch([[3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13], [14]], 6)
    batch = {"inputs": ids[None], "mask": mask[None], "targets": np.array([[[0], [2], [1], [2]]])}
    state, _ = jax.jit(lambda s, b, f: train_step(s, b, f, loss_fn=loss_fn, tx=tx,
                                                  lr_fn=lambda _: 0.0))(init_state(tr, tx, 0), batch, frozen)
    changed = _diff_leaves(params, merge_trainable(state.params, frozen, cfg))
    everything = set(lora._flat(params))
    if trainable == "book":
        assert changed == {p for p in everything if p.split("/")[0] in ("h_2", "ln_f", "cls_head")}
        assert set(frozen) == {"wte", "wpe", "h_0", "h_1"}
    elif trainable == "all":
        assert frozen is None and changed == everything
    else:
        kernels = {p for p in everything if any(p.endswith(s) for s in (
            "attn/query/kernel", "attn/key/kernel", "attn/value/kernel", "attn/c_proj/kernel",
            "mlp/c_fc/kernel", "mlp/c_proj/kernel"))}
        assert changed == kernels | {"cls_head/kernel", "cls_head/bias"}


def test_loss_aux_and_accuracy():
    config = GPTConfig(**TINY)
    params = with_head(init_params(config, jax.random.key(1)), init_head(jax.random.key(2), 12, 3))
    ids, mask = pad_batch([[3, 4, 5], [6], [7, 8]], 4)
    targets = np.array([[0], [1], [2]])
    step = jax.jit(lambda p, b: eval_step(p, b, loss_fn=classification_loss_fn(config)))
    out = step(params, {"inputs": ids, "mask": mask, "targets": targets})
    logits = jax.jit(classifier_logits(config))(params, ids, mask)
    want = optax.softmax_cross_entropy_with_integer_labels(logits, targets[:, 0]).sum()
    np.testing.assert_allclose(out["loss_sum"], want, rtol=1e-6)
    assert int(out["count"]) == 3  # one per example
    np.testing.assert_array_equal(out["aux"], np.argmax(logits, -1) == targets[:, 0])
    results = [{"aux": np.array([1.0, 0.0, 1.0]), "count": 3}, {"aux": np.array([0.0]), "count": 1}]
    assert accuracy(results) == {"accuracy": 0.5}


def test_label_mapping_round_trip(tmp_path):
    save_labels(["spam", "ham", "42"], tmp_path / "labels.json")
    classes = load_labels(tmp_path / "labels.json")
    assert classes == ["spam", "ham", "42"]
    assert encode_labels(["ham", "42", "spam"], classes, "train").tolist() == [1, 2, 0]


# ---- bad input -----------------------------------------------------------------------------


def _write(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


@pytest.mark.parametrize("case, message", [
    ("unseen", r"label 'c' in the validation split is not one of the classes \['a', 'b'\]"),
    ("given", r"label 'b' in the train split is not one of the classes \['a', 'z'\]"),
    ("empty", r"train.tsv line 4 has an empty text"),
    ("column", r"column 'text' not in .*train.tsv; available: label, body"),
    ("one_class", r"single class"),
    ("no_tab", r"line 2 has no tab"),
])
def test_bad_input_is_one_clear_line(tmp_path, case, message):
    train = "label\ttext\n" + "".join(f"{'ab'[i % 2]}\tword {i}\n" for i in range(21))
    kw = {}
    if case == "unseen":
        kw = dict(validation=_write(tmp_path, "v.tsv", "label\ttext\na\tok\nc\tnew\n"),
                  test=_write(tmp_path, "t.tsv", "label\ttext\na\tok\n"))
    elif case == "given":
        kw = dict(labels=["a", "z"])
    elif case == "empty":
        train = train.replace("word 2", "  ")
    elif case == "column":
        train = train.replace("label\ttext", "label\tbody")
    elif case == "one_class":
        train = train.replace("b\t", "a\t")
    src = _write(tmp_path, "train.tsv", train)
    if case == "no_tab":
        src = _write(tmp_path, "SMS", "ham\tok\nspam only\n")
    with pytest.raises(ValueError, match=message) as err:
        build_datasets(ClassifierDataConfig(source=src, **kw), context_length=19)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name, content, message", [
    ("d.tsv", "text\tlabel\nhi\tham\nno label here\n", r"d.tsv line 3 has 1 field\(s\) where the header has 2 \(missing"),
    ("d.tsv", "text\tlabel\nhi\tham\nhey\tspam\tmore\n", r"d.tsv line 3 has 3 field\(s\) where the header has 2 \(extra"),
    ("d.tsv", "text\tlabel\nhi\tham\nhey\t \n", r"d.tsv line 3 has an empty label"),
    ("d.csv", "text,label\nhi,ham\n\"two\nlines\",\n", r"d.csv line 3 has an empty label"),
    ("d.csv", "text,label\nhi,ham,x\n", r"d.csv line 2 has 3 field\(s\) where the header has 2 \(extra"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b", "label": null}\n', r"d.jsonl line 3 has a null label"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n', r"d.jsonl line 2 has no 'label' field"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "lab\n', r"d.jsonl line 2 is not valid JSON"),
    ("d.json", '[{"text": "a", "label": "x"}, {"text": "b", "label": ""}]', r"d.json record 2 of 2 has an empty label"),
    ("d.json", '[{"text": "a", "label": "x"}, {"text": "b", "label": ["y"]}]', r"d.json record 2 of 2 has a list"),
    ("d.json", '[{"text": "a", "label": "x"}, "b"]', r"d.json record 2 of 2 is a str"),
    ("SMS", "ham\tok\n\tno label\n", r"SMS line 2 has an empty label"),
    ("SMS", "ham\tok\nspam\tcall\tnow\n", r"SMS line 2 has 3 tab-separated fields"),
])
def test_a_bad_row_is_named_by_file_and_line_not_made_a_class(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        read_table(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_well_formed_table_still_reads_after_its_bad_rows_are_fixed(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("text\tlabel\nhi\tham\n\nhey\tspam\n")  # a blank line is not a row
    assert read_table(path) == (["hi", "hey"], ["ham", "spam"])


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="classifier.pooling"):
        load_config(None, ["classifier.pooling=first"], schema=ClassifierRunConfig)
    with pytest.raises(ConfigError, match="classifier.trainable"):
        load_config(None, ["classifier.trainable=some"], schema=ClassifierRunConfig)


# ---- runs ----------------------------------------------------------------------------------


def test_shipped_configs_load():
    book = load_config(ROOT / "configs/cls_spam_book.yaml", schema=ClassifierRunConfig)
    assert (book.classifier.init_from, book.classifier.trainable) == ("gpt2", "book")
    assert (book.optim.learning_rate, book.optim.weight_decay, book.train.epochs,
            book.train.batch_size, book.data.balance) == (5e-5, 0.1, 5, 8, True)
    lo = load_config(ROOT / "configs/cls_spam_lora.yaml", schema=ClassifierRunConfig)
    assert (lo.classifier.trainable, lo.classifier.lora.rank, lo.classifier.lora.alpha,
            lo.optim.learning_rate) == ("lora", 16, 16.0, 8e-4)
    small = load_config(ROOT / "configs/cls_spam_small.yaml", schema=ClassifierRunConfig)
    assert (small.classifier.init_from, small.classifier.trainable) == ("runs/default", "all")


@pytest.fixture(scope="module")
def book_run(tmp_path_factory, sms_file, hf_dir):
    """The book's config on the synthetic SMS file from a tiny Hugging Face checkpoint."""
    runs = tmp_path_factory.mktemp("runs")
    cfg = load_config(ROOT / "configs/cls_spam_book.yaml", [
        f"runs_dir={runs}", f"classifier.init_from={hf_dir}", f"data.source={sms_file}",
        "train.max_steps=3", "classifier.pooling=last_real", *QUIET], schema=ClassifierRunConfig)
    return cfg, finetune(cfg)


def test_book_run_writes_a_complete_run_directory(book_run):
    _, result = book_run
    run = result.fit.run_dir
    assert {"config.yaml", "labels.json", "results.json", "loss.png", "accuracy.png",
            "checkpoints", "frozen", "metrics.jsonl"} <= {p.name for p in run.iterdir()}
    assert load_labels(run / "labels.json") == ["ham", "spam"]
    scores = json.loads((run / "results.json").read_text())
    assert [scores[s]["count"] for s in ("train", "validation", "test")] == [18, 2, 6]
    assert all(0.0 <= s["accuracy"] <= 1.0 and np.isfinite(s["loss"]) for s in scores.values())
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [1, 3]  # once per 2-step epoch
    assert {"train_accuracy", "val_accuracy"} <= set(evals[0])


def test_final_evaluation_matches_the_training_loss(book_run):
    cfg, result = book_run
    data = build_datasets(cfg.data, 19)
    rows = data.train.rows(np.arange(len(data.train)))
    params = result.classifier.params
    trained = {k: params[k] for k in ("h_1", "ln_f", "cls_head")}  # the book's split, 2 layers
    frozen = {k: v for k, v in params.items() if k not in trained}
    loss_fn = classification_loss_fn(result.classifier.config, "last_real")
    out = eval_step(trained, rows, frozen, loss_fn=loss_fn)
    want = evaluate(result.classifier, data.train)
    np.testing.assert_allclose(float(out["loss_sum"]) / int(out["count"]), want["loss"], rtol=1e-5)
    assert accuracy([jax.device_get(out)])["accuracy"] == want["accuracy"]


def test_saved_classifier_loads_and_classifies_like_the_trained_one(book_run):
    _, result = book_run
    texts = ["win cash prize now", "see you at home tonight", 'a "quoted" <|endoftext|> text']
    model = load_classifier(result.fit.run_dir)
    jax.tree.map(np.testing.assert_array_equal, model.params, result.classifier.params)
    labels, probs = classify(model, texts)
    _, direct = classify(result.classifier, texts)
    np.testing.assert_allclose(probs, direct, rtol=1e-6)
    assert probs.shape == (3, 2) and set(labels) <= {"ham", "spam"}
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="text 1 is empty"):
        classify(model, ["ok", " "])


def test_rerunning_a_finished_run_restores_it(book_run):
    cfg, result = book_run
    again = finetune(cfg)
    assert again.scores == result.scores


def test_classify_cli(book_run):
    _, result = book_run
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "jaxgpt.cli.classify", "--model", str(result.fit.run_dir),
                           "win cash now", "see you later"], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == ""  # no absl/Orbax warnings: stderr holds only real errors
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[1].endswith("\tsee you later")
    label, prob, _ = lines[0].split("\t")
    assert label in ("ham", "spam") and 0.5 <= float(prob) <= 1.0
    bad = subprocess.run([sys.executable, "-m", "jaxgpt.cli.classify", "--model", str(ROOT), "x"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no config.yaml" in bad.stderr


def _finetune_script():
    sys.path.insert(0, str(ROOT / "train"))
    import finetune_classifier

    return finetune_classifier.main


def test_lora_config_through_the_script_reproduces_its_scores(tmp_path, sms_file, hf_dir, capsys):
    main = _finetune_script()
    args = ["--config", str(ROOT / "configs/cls_spam_lora.yaml"), f"runs_dir={tmp_path}",
            f"classifier.init_from={hf_dir}", f"data.source={sms_file}", "classifier.lora.rank=3",
            "train.max_steps=2", *QUIET]
    assert main(args) == 0
    assert "test accuracy" in capsys.readouterr().out
    run = tmp_path / "cls_spam_lora"
    model = load_classifier(run)  # frozen base + adapters merged + head
    assert "lm_head" not in model.params and model.pooling == "last_position"
    cfg = load_config(ROOT / "configs/cls_spam_lora.yaml", [f"data.source={sms_file}"],
                      schema=ClassifierRunConfig)
    data = build_datasets(cfg.data, 19)
    saved = json.loads((run / "results.json").read_text())
    for name in ("train", "validation", "test"):
        got = evaluate(model, getattr(data, name))
        np.testing.assert_allclose(got["loss"], saved[name]["loss"], rtol=1e-5)
        assert got["accuracy"] == saved[name]["accuracy"]
    assert main([*args, "classifier.pooling=first"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "classifier.pooling" in err


@pytest.fixture(scope="module")
def pretraining_run(tmp_path_factory):
    """A jaxgpt pretraining run directory, written directly (a checkpoint of a fresh state)."""
    config = GPTConfig(**{**TINY, "context_length": 128, "drop_rate": 0.1})
    params = init_params(config, jax.random.key(7))
    runs = tmp_path_factory.mktemp("pre")
    run = runs / "default"
    run.mkdir()
    save_config(RunConfig(runs_dir=str(runs), model=config), run / "config.yaml")
    ckpt = Checkpointer(run / "checkpoints", async_save=False)
    ckpt.save(1, init_state(params, optax.adam(1e-3), 0), {"step": 1})
    ckpt.close()
    return run, config, params


def test_init_from_a_pretraining_run_directory(pretraining_run):
    run, config, params = pretraining_run
    cfg = load_config(None, [f"classifier.init_from={run}", "model.drop_rate=0.0"], schema=ClassifierRunConfig)
    got_config, got = init_backbone(cfg)
    # Shape from the run; runtime fields (dropout, compute dtype) from cfg.
    assert got_config == config.replace(drop_rate=0.0, dtype=cfg.model.dtype)
    jax.tree.map(np.testing.assert_array_equal, got, params)


def test_small_config_on_the_real_sms_data(data_dir, tmp_path, pretraining_run):
    cfg = load_config(ROOT / "configs/cls_spam_small.yaml", [
        f"runs_dir={tmp_path}", f"classifier.init_from={pretraining_run[0]}", "train.max_steps=4",
        "classifier.eval_each_epoch=false", "train.eval_freq=0", *QUIET], schema=ClassifierRunConfig)
    result = finetune(cfg)
    assert {s: v["count"] for s, v in result.scores.items()} == {"train": 1045, "validation": 149, "test": 300}
    assert all(0.0 <= v["accuracy"] <= 1.0 for v in result.scores.values())
    assert result.classifier.max_length == 128  # the longest training text is capped by the context
