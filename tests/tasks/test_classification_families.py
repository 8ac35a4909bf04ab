"""Classification finetuning (chapter 6) from a Llama-family base: a random tiny LlamaForCausalLM
with grouped queries beside a tokenizer.json built offline (no padding token: its end-of-text id
pads), the book's trainable split (layers_<L-1>, norm, head) and LoRA on its projections."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from jaxgpt.tasks.classification.data import build_datasets, encode_texts, pad_batch  # noqa: E402
from jaxgpt.tasks.classification.finetune import evaluate, finetune  # noqa: E402
from jaxgpt.tasks.classification.model import (  # noqa: E402
    ClassifierRunConfig,
    classifier_logits,
    classify,
    load_classifier,
)
from jaxgpt.data.tokenizer import FamilyTokenizer  # noqa: E402
from jaxgpt.training.metrics import read_metrics  # noqa: E402
from jaxgpt.training.runconfig import config_from_yaml, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SPAM = "win cash prize now claim free call txt urgent reward".split()
HAM = "see you later at home tonight ok lunch mum sorry".split()
QUIET = ["train.progress=false", "train.report=false"]
EOS = "<|eot_id|>"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(SPAM + HAM)] * 5, trainers.BpeTrainer(
        vocab_size=285, special_tokens=["<|begin_of_text|>", "<|end_of_text|>", EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    path = tmp_path_factory.mktemp("llama_like")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=20, intermediate_size=26,
                                   num_hidden_layers=3, num_attention_heads=5, num_key_value_heads=1,
                                   head_dim=4, max_position_embeddings=64, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sms_file(tmp_path_factory):
    """SMSSpamCollection's format (label<TAB>text); spam and ham draw from disjoint words."""
    rng = np.random.default_rng(1)
    labels = rng.permutation(["spam"] * 24 + ["ham"] * 24)
    lines = [f"{lab}\t" + " ".join(rng.choice(SPAM if lab == "spam" else HAM, rng.integers(1, 9)))
             for lab in labels]
    path = tmp_path_factory.mktemp("sms") / "SMSSpamCollection"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def book_run(tmp_path_factory, llama_dir, sms_file):
    runs = tmp_path_factory.mktemp("runs")
    cfg = load_config(ROOT / "configs/cls_spam_book.yaml", [
        f"runs_dir={runs}", "name=llama_book", f"classifier.init_from={llama_dir}",
        f"data.source={sms_file}", "data.balance=false", "model.dtype=float32",
        "optim.learning_rate=3e-3", "train.batch_size=4", "train.epochs=4", "train.eval_iter=2",
        "classifier.pooling=last_real", *QUIET], schema=ClassifierRunConfig)
    return finetune(cfg)


def test_book_split_trains_the_last_llama_block_and_its_loss_falls(book_run, llama_dir):
    run = book_run.fit.run_dir
    assert (run / "frozen").is_dir()  # the frozen base, written once
    trained = set(book_run.fit.state.params)
    assert trained == {"layers_2", "norm", "cls_head"}  # the last of 3 blocks, the final RMSNorm
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "train"]
    assert len(losses) == 4 * 8 and np.mean(losses[-6:]) < 0.5 * np.mean(losses[:6])
    # The model directory's own tokenizer read the text, and its end-of-text id pads.
    tok = FamilyTokenizer(llama_dir)
    assert book_run.classifier.pad_id == tok.tokenizer.token_to_id(EOS)
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    assert book_run.scores["train"]["accuracy"] >= 0.9


def _reference_logits(llama_dir, classifier, texts, tmp_path):
    """transformers' LlamaModel on each unpadded text, its last hidden state through the head."""
    from jaxgpt.weights.huggingface import save_pretrained

    backbone = {k: v for k, v in classifier.params.items() if k != "cls_head"}
    # the classifier has no LM head: written tied, the HF model's head is the embedding (unused)
    save_pretrained(classifier.config.replace(tie_embeddings=True), jax.device_get(backbone),
                tmp_path / "trained")
    model = transformers.LlamaModel.from_pretrained(tmp_path / "trained", dtype=torch.float32).eval()
    head = {k: np.asarray(v, np.float64) for k, v in classifier.params["cls_head"].items()}
    tok = FamilyTokenizer(llama_dir)
    out = []
    for text in texts:
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            hidden = model(input_ids=ids).last_hidden_state[0, -1].double().numpy()
        out.append(hidden @ head["kernel"] + head["bias"])
    return np.stack(out)


def test_logits_equal_transformers_llama_at_the_last_real_token(book_run, llama_dir, tmp_path):
    clf = load_classifier(book_run.fit.run_dir)
    assert clf.config.family == "llama" and clf.config.kv_heads == 1
    texts = ["win cash now", "see you at home tonight ok", "free", "mum sorry lunch later claim prize"]
    ids, mask = pad_batch(encode_texts(texts, clf.tokenizer), clf.max_length, clf.pad_id)
    assert mask.sum(1).min() < clf.max_length  # every row padded: pooling must skip the padding
    got = np.asarray(classifier_logits(clf.config, clf.pooling)(clf.params, ids, mask))
    want = _reference_logits(llama_dir, clf, texts, tmp_path)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    labels, probs = classify(clf, texts)
    np.testing.assert_allclose(probs, np.exp(want) / np.exp(want).sum(1, keepdims=True), atol=1e-4)
    assert labels == [clf.labels[i] for i in want.argmax(1)]


def test_classify_cli_on_the_llama_run(book_run):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "jaxgpt.cli.classify", "--model",
                          str(book_run.fit.run_dir), "claim free prize", "see you later"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().split("\n")
    want, _ = classify(book_run.classifier, ["claim free prize", "see you later"])
    assert [line.split("\t")[0] for line in lines] == want


def test_qwen3_lora_config_runs_on_a_scanned_llama_base(tmp_path, llama_dir, sms_file, capsys):
    sys.path.insert(0, str(ROOT / "train"))
    import finetune_classifier

    args = ["--config", str(ROOT / "configs/cls_spam_qwen3_0.6b_lora.yaml"), f"runs_dir={tmp_path}",
            f"classifier.init_from={llama_dir}", f"data.source={sms_file}", "model.dtype=float32",
            "classifier.lora.rank=2", "train.max_steps=3", "train.batch_size=4", *QUIET]
    assert finetune_classifier.main(args) == 0
    assert "test accuracy" in capsys.readouterr().out
    run = tmp_path / load_config(ROOT / "configs/cls_spam_qwen3_0.6b_lora.yaml",
                                 schema=ClassifierRunConfig).name
    clf = load_classifier(run)  # frozen stacked base + adapters merged + head
    assert clf.config.scan_layers and "layers" in clf.params and "lm_head" not in clf.params
    # Adapters on the seven Llama projections changed exactly those kernels; the rest is the base.
    from jaxgpt.weights.loader import load_model
    from jaxgpt.trees import flatten

    _, base = load_model(llama_dir, scan_layers=True, tie_embeddings=True, dtype="float32")
    got, want = flatten(clf.params), flatten(jax.device_get(base))
    changed = {p for p in want if not np.array_equal(np.asarray(got[p]), np.asarray(want[p]))}
    assert changed == {f"layers/{m}/{n}_proj/kernel" for m, names in
                       (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for n in names}
    saved = json.loads((run / "results.json").read_text())
    data = build_datasets(config_from_yaml(run / "config.yaml", ClassifierRunConfig).data, 64)
    for name in ("train", "validation", "test"):  # the saved run reproduces its scores
        got = evaluate(clf, getattr(data, name))
        np.testing.assert_allclose(got["loss"], saved[name]["loss"], rtol=1e-5)
        assert got["accuracy"] == saved[name]["accuracy"]
    # A Llama base read with GPT-2's tokenizer is refused in one line, before training.
    assert finetune_classifier.main([*args, "data.tokenizer=gpt2", "name=gpt2tok"]) == 2
    # (lines of JAX's compile-cache warnings, which a shared cache directory may print, aside)
    err = [line for line in capsys.readouterr().err.splitlines()
           if "UserWarning" not in line and line.strip() != "warnings.warn("]
    assert len(err) == 1 and err[0].startswith("error: ") and "own tokenizer.json" in err[0]


def test_book_split_of_a_scanned_stack_trains_only_its_last_layer():
    """One step of the book split on scanned layers changes exactly the last layer's slice of
    every stacked leaf, the final norm and the head; its logits equal the unscanned model's."""
    import optax

    from jaxgpt.config import GPTConfig
    from jaxgpt.models.model import init_params
    from jaxgpt.tasks.classification.model import (
        ClassifierConfig,
        classification_loss_fn,
        init_head,
        merge_trainable,
        split_trainable,
        with_head,
    )
    from jaxgpt.training.state import init_state
    from jaxgpt.training.step import train_step
    from jaxgpt.trees import flatten, unflatten

    config = GPTConfig(family="qwen3", vocab_size=29, emb_dim=12, n_heads=3, n_kv_heads=1,
                       n_layers=3, context_length=16, mlp_dim=14, scan_layers=True, drop_rate=0.0,
                       dtype="float32")
    cfg = ClassifierConfig(trainable="book")
    params = with_head(init_params(config, jax.random.key(1)), init_head(jax.random.key(2), 12, 3))
    tr, frozen = split_trainable(params, config, cfg)
    assert set(tr) == {"layers_last", "norm", "cls_head"} and "layers" in frozen
    ids, mask = pad_batch([[3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13], [14]], 6, pad_id=0)
    flat = flatten(params["layers"])
    unscanned = {**{k: v for k, v in params.items() if k != "layers"},
                 **{f"layers_{i}": unflatten({k: v[i] for k, v in flat.items()}) for i in range(3)}}
    want = classifier_logits(config.replace(scan_layers=False))(unscanned, ids, mask)
    np.testing.assert_allclose(classifier_logits(config)(merge_trainable(tr, frozen, cfg), ids, mask),
                               want, rtol=1e-5, atol=1e-6)
    tx = optax.adamw(1e-2, weight_decay=0.1)
    batch = {"inputs": ids[None], "mask": mask[None], "targets": np.array([[[0], [2], [1], [2]]])}
    loss_fn = classification_loss_fn(config)
    state, _ = jax.jit(lambda s, b, f: train_step(s, b, f, loss_fn=loss_fn, tx=tx,
                                                  lr_fn=lambda _: 0.0))(init_state(tr, tx, 0), batch, frozen)
    after = merge_trainable(state.params, frozen, cfg)
    for path, before in flatten(params["layers"]).items():
        now = np.asarray(flatten(after["layers"])[path])
        np.testing.assert_array_equal(now[:-1], np.asarray(before)[:-1])
        assert not np.array_equal(now[-1], np.asarray(before)[-1]), path
    np.testing.assert_array_equal(after["embed_tokens"]["embedding"], params["embed_tokens"]["embedding"])
    assert not np.array_equal(after["norm"]["scale"], params["norm"]["scale"])


def test_auto_tokenizer_is_the_family_base_s_own(llama_dir, tmp_path):
    from jaxgpt.tasks.classification.data import default_pad_id, resolve_tokenizer

    assert resolve_tokenizer("auto", str(llama_dir), "llama") == str(llama_dir)
    # A GPT-2 base keeps tiktoken's GPT-2 encoding even beside a tokenizer.json; scratch too.
    assert resolve_tokenizer("auto", str(llama_dir), "gpt2") == "gpt2"
    assert resolve_tokenizer("auto", "scratch", "llama") == "gpt2"
    assert default_pad_id("gpt2") == 50256
    assert default_pad_id(str(llama_dir)) == FamilyTokenizer(llama_dir).tokenizer.token_to_id(EOS)
    with pytest.raises(ValueError, match="data.tokenizer"):
        resolve_tokenizer(str(tmp_path))  # a directory without tokenizer.json
