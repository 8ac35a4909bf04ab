"""Preference tuning (DPO): pairs and their batches, the objectives against PyTorch on
transformers' GPT-2, the live, LoRA and stored references, and the training script end to end."""

import importlib.util
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import GPTConfig
from jaxgpt.data.windows import IGNORE
from jaxgpt.lora import transform as lora
from jaxgpt.models.model import GPT, init_params
from jaxgpt.tasks.instruct.data import collate
from jaxgpt.tasks.preference import reference
from jaxgpt.tasks.preference.data import PreferenceDataset, load_pairs
from jaxgpt.tasks.preference.loss import (
    Objective,
    logps_fn,
    preference_loss_fn,
    preference_losses,
    sequence_logps,
)
from jaxgpt.data.tokenizer import get_tokenizer
from jaxgpt.sharding import MeshConfig

ROOT = Path(__file__).resolve().parents[2]
LN2 = math.log(2.0)
WORDS = "red green blue cat dog sun moon tree river stone".split()
# Tiny, odd sizes (vocab 67, context 19, D 18, H 3, L 2): the random-token tests.
SMALL = GPTConfig(vocab_size=67, context_length=19, emb_dim=18, n_heads=3, n_layers=2,
                  drop_rate=0.0, dtype="float32")


def _records(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w = rng.choice(WORDS, 3)
        out.append({"instruction": f"Repeat {w[0]} {w[1]}.", "input": w[2] if i % 3 == 0 else "",
                    "chosen": f"Gladly: {w[0]} {w[1]}.", "rejected": f"No. {w[1]}"})
    return out


def _batch(vocab, pairs=3, seed=0, length=14, pad_id=0):
    """A [pairs, 2, T] batch of random token rows through the task's collation: shared prompts,
    responses of different lengths, padding after each."""
    rng = np.random.default_rng(seed)
    rows, prompts = [], []
    for _ in range(pairs):
        prompt = rng.integers(1, vocab, rng.integers(2, 6)).tolist()
        for _ in range(2):
            rows.append(prompt + rng.integers(1, vocab, rng.integers(1, length - 6)).tolist())
            prompts.append(len(prompt))
    b = collate(rows, prompts, pad_id=pad_id, length=length, allowed_max_length=length, mask_prompt=True)
    out = {k: v.reshape(pairs, 2, -1) for k, v in b.items()}
    out["pairs"] = np.ones((pairs, 1), np.int32)
    return out


# ---- data -------------------------------------------------------------------------------------


def test_both_sides_learn_only_their_response_and_end_of_text():
    tok = get_tokenizer("gpt2")
    rec = _records(1)[0]
    ds = PreferenceDataset([rec], "alpaca", max_length=128)
    row = ds.rows([0])
    assert row["inputs"].shape == row["targets"].shape == (1, 2, ds.length) and row["pairs"].shape == (1, 1)
    for side, key in enumerate(("chosen", "rejected")):
        targets = row["targets"][0, side]
        learned = targets[targets != IGNORE].tolist()
        assert tok.decode(learned) == rec[key] + "<|endoftext|>"
        # The unmasked targets are one contiguous run: the response, then the end-of-text.
        first = int(np.argmax(targets != IGNORE))
        assert (targets[first:first + len(learned)] != IGNORE).all()
    np.testing.assert_array_equal(row["inputs"][0, 0, :first], row["inputs"][0, 1, :first])  # one prompt


def test_long_prompts_are_cut_from_the_left_or_refused():
    tok = get_tokenizer("gpt2")
    rec = {**_records(1)[0], "instruction": "Repeat " + " ".join(WORDS * 4) + "."}
    full = len(tok.encode(PreferenceDataset([rec]).template.full({**rec, "output": rec["chosen"]})))
    ds = PreferenceDataset([rec], max_length=full - 7)
    assert ds.truncated_prompts == 1 and ds.truncated_responses == 0 and ds.length == full - 7
    targets = ds.rows([0])["targets"][0, 0]
    assert tok.decode(targets[targets != IGNORE].tolist()) == rec["chosen"] + "<|endoftext|>"  # whole
    with pytest.raises(ValueError, match=r"preference record 0: its prompt and chosen response take "
                                         rf"{full} tokens, more than the allowed {full - 7}"):
        PreferenceDataset([rec], max_length=full - 7, truncate=False)


def test_bad_records_are_named_or_skipped_with_a_count(tmp_path):
    records = _records(8)
    del records[1]["chosen"]
    records[3]["rejected"] = "  "
    records[5]["rejected"] = records[5]["chosen"]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"1 \(chosen\), 3 \(rejected is empty\), 5 \(chosen == rejected\)$"):
        load_pairs(path)
    with pytest.warns(UserWarning, match="skipped 1 record"):
        with pytest.warns(UserWarning, match="skipped 2 record"):
            kept = load_pairs(path, skip_bad=True)
    assert len(kept) == 7  # the one without a field is gone; the other two go with the data set
    ds = PreferenceDataset(kept)
    assert (len(ds), ds.skipped) == (5, 2)


def test_json_jsonl_and_parquet_give_the_same_pairs(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    records = [{**r, "extra": 1} for r in _records(5)]
    (tmp_path / "p.json").write_text(json.dumps(records))
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "p.parquet")
    renamed = [{"prompt": r["instruction"], "good": r["chosen"], "bad": r["rejected"]} for r in records]
    columns = {"instruction": "prompt", "input": None, "chosen": "good", "rejected": "bad"}
    loaded = [load_pairs(tmp_path / f"p.{ext}") for ext in ("json", "jsonl", "parquet")]
    assert loaded[0] == loaded[1] == loaded[2] == [{k: r[k] for k in
                                                    ("instruction", "input", "chosen", "rejected")} for r in records]
    assert [r["chosen"] for r in load_pairs(renamed, columns)] == [r["chosen"] for r in records]


def test_the_real_preference_data(data_dir, monkeypatch):
    monkeypatch.setenv("JAXGPT_DATA_DIR", data_dir)
    with pytest.raises(ValueError, match=r"122 \(chosen == rejected\)"):
        load_pairs("instruction-data-with-preference")
    with pytest.warns(UserWarning, match="skipped 6 record"):
        records = load_pairs("instruction-data-with-preference", skip_bad=True)
    assert len(records) == 1100 and all(r["chosen"] and r["rejected"] for r in records)


# ---- the objectives ---------------------------------------------------------------------------


def test_sequence_logps_are_the_counted_targets_log_probabilities():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 6, 9)).astype(np.float32)
    targets = rng.integers(0, 9, (4, 6))
    targets[:, :2] = IGNORE
    targets[1, 4:] = IGNORE
    logp = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    picked = np.where(targets != IGNORE, np.take_along_axis(logp, np.maximum(targets, 0)[..., None], -1)[..., 0], 0)
    counted = (targets != IGNORE).sum(-1)
    np.testing.assert_allclose(sequence_logps(logits, targets, "sum"), picked.sum(-1), rtol=1e-6)
    np.testing.assert_allclose(sequence_logps(logits, targets, "mean"), picked.sum(-1) / counted, rtol=1e-6)


@pytest.mark.parametrize("loss, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_objectives_against_their_formulas(loss, smoothing):
    rng = np.random.default_rng(2)
    policy, ref = rng.normal(size=(5, 2)) * 3, rng.normal(size=(5, 2)) * 3
    beta = 0.3
    h = (policy[:, 0] - policy[:, 1]) - (ref[:, 0] - ref[:, 1])
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    expected = {"sigmoid": -(1 - smoothing) * np.log(sig(beta * h)) - smoothing * np.log(sig(-beta * h)),
                "ipo": (h - 1 / (2 * beta)) ** 2}[loss]
    losses, chosen, rejected = preference_losses(jnp.asarray(policy, jnp.float32), jnp.asarray(ref, jnp.float32),
                                                 Objective(loss, beta, smoothing))
    np.testing.assert_allclose(losses, expected, rtol=2e-5)
    np.testing.assert_allclose(chosen, beta * (policy[:, 0] - ref[:, 0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rejected, beta * (policy[:, 1] - ref[:, 1]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_loss_is_ln2_when_the_policy_is_the_reference(reduction, smoothing):
    params = init_params(SMALL, jax.random.key(0))
    batch = _batch(SMALL.vocab_size, pairs=4)
    fn = preference_loss_fn(SMALL, Objective("sigmoid", 0.1, smoothing, reduction), stored=False)
    total, aux = jax.jit(fn, static_argnums=4)(params, params, batch, jax.random.key(0), True)
    assert abs(float(total) / 4 - LN2) < 1e-6
    assert float(aux["chosen_reward"]) == float(aux["rejected_reward"]) == float(aux["correct"]) == 0.0


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """Two random tiny GPT-2s from transformers (policy, reference) and jaxgpt's loads of them."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from jaxgpt.weights.huggingface import load_pretrained

    out = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        cfg = transformers.GPT2Config(vocab_size=67, n_positions=19, n_embd=18, n_head=3, n_layer=2,
                                      initializer_range=0.2, tie_word_embeddings=False,
                                      bos_token_id=None, eos_token_id=None)
        model = transformers.GPT2LMHeadModel(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        path = tmp_path_factory.mktemp(f"hf{seed}")
        model.save_pretrained(path, safe_serialization=True)
        config, params = load_pretrained(path, dtype="float32", drop_rate=0.0)
        out.append((model, config, params))
    return out


def _torch_dpo(policy, ref, batch, beta, reduction):
    import torch
    import torch.nn.functional as F

    inputs = torch.tensor(batch["inputs"].reshape(-1, batch["inputs"].shape[-1]), dtype=torch.long)
    targets = torch.tensor(batch["targets"].reshape(inputs.shape), dtype=torch.long)
    mask = targets != IGNORE

    def logps(model):
        logp = F.log_softmax(model(inputs).logits.float(), dim=-1)
        picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        total = picked.sum(-1)
        return (total / mask.sum(-1) if reduction == "mean" else total).view(-1, 2)

    p = logps(policy)
    with torch.no_grad():
        r = logps(ref)
    losses = -F.logsigmoid(beta * ((p[:, 0] - p[:, 1]) - (r[:, 0] - r[:, 1])))
    loss = losses.mean()
    policy.zero_grad()
    loss.backward()
    rewards = (beta * (p - r)).detach().numpy()
    grads = {n: q.grad.numpy() for n, q in policy.named_parameters()}
    return loss.detach().item(), rewards, grads


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loss_rewards_and_gradients_match_pytorch_on_transformers_gpt2(hf_pair, reduction):
    from jaxgpt.weights.huggingface import to_hf_tensors

    (policy_t, config, policy), (ref_t, _, ref) = hf_pair
    batch = _batch(config.vocab_size, pairs=3, seed=5, length=16)
    loss_t, rewards_t, grads_t = _torch_dpo(policy_t, ref_t, batch, 0.5, reduction)
    fn = preference_loss_fn(config, Objective("sigmoid", 0.5, 0.0, reduction), stored=False)
    mean = lambda p: (lambda t, aux: (t / 3, aux))(*fn(p, ref, batch, jax.random.key(0), True))  # noqa: E731
    (loss, aux), grads = jax.jit(jax.value_and_grad(mean, has_aux=True))(policy)
    assert abs(float(loss) - loss_t) < 1e-5
    np.testing.assert_allclose(float(aux["chosen_reward"]), rewards_t[:, 0].sum(), atol=1e-5)
    np.testing.assert_allclose(float(aux["rejected_reward"]), rewards_t[:, 1].sum(), atol=1e-5)
    ours = to_hf_tensors(config, grads)
    assert set(grads_t) <= set(ours)
    for name, g in grads_t.items():
        np.testing.assert_allclose(ours[name], g, atol=1e-5, rtol=1e-5, err_msg=name)
    assert max(np.abs(g).max() for g in grads_t.values()) > 1e-3  # a gradient worth comparing


def test_masked_prompt_and_padding_tokens_change_nothing():
    params, ref = init_params(SMALL, jax.random.key(1)), init_params(SMALL, jax.random.key(2))
    batch = _batch(SMALL.vocab_size, pairs=3, seed=6)
    fn = jax.jit(jax.value_and_grad(
        lambda p, b: preference_loss_fn(SMALL, Objective(), stored=False)(p, ref, b, jax.random.key(0), True)[0]))
    loss, grads = fn(params, batch)
    # Other token ids after each row's end (padding) and other targets where they are ignored.
    changed = {k: v.copy() for k, v in batch.items()}
    pad = np.zeros(batch["inputs"].shape, bool)
    for b in range(3):
        for s in range(2):
            counted = np.nonzero(batch["targets"][b, s] != IGNORE)[0]
            pad[b, s, counted[-1] + 1:] = True  # inputs after the last counted target's input
    changed["inputs"][pad] = np.random.default_rng(0).integers(1, SMALL.vocab_size, pad.sum())
    assert (changed["inputs"] != batch["inputs"]).any()
    loss2, grads2 = fn(params, changed)
    assert float(loss) == float(loss2)
    jax.tree.map(np.testing.assert_array_equal, grads, grads2)
    # The prompt's own tokens are not scored: the log-probabilities are those of the response.
    logits = GPT(SMALL).apply({"params": params}, batch["inputs"].reshape(6, -1), True)
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), -1)
    t = batch["targets"].reshape(6, -1)
    direct = [sum(float(logp[i, j, t[i, j]]) for j in range(t.shape[1]) if t[i, j] != IGNORE) for i in range(6)]
    got, _ = logps_fn(SMALL, "sum")(params, None, batch, None, True)
    np.testing.assert_allclose(np.asarray(got).reshape(-1), direct, rtol=1e-5)


def test_the_lora_reference_is_the_base_with_adapters_off():
    base = init_params(SMALL, jax.random.key(3))
    cfg = lora.LoRAConfig(rank=2, alpha=4.0)
    trainable, frozen = lora.partition(base, cfg, jax.random.key(4))
    trainable = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(5), x.shape), trainable)
    batch = _batch(SMALL.vocab_size, pairs=3, seed=7)
    obj = Objective(beta=0.2)
    total, aux = preference_loss_fn(SMALL, obj, stored=False, lora=cfg)(trainable, frozen, batch, None, True)
    # Independently: the merged model as the policy, a separate copy of the base as the reference.
    copy = jax.tree.map(jnp.array, base)
    policy, _ = logps_fn(SMALL, "sum")(lora.combine(trainable, frozen, cfg), None, batch, None, True)
    ref, _ = logps_fn(SMALL, "sum")(copy, None, batch, None, True)
    losses, chosen, rejected = preference_losses(policy, ref, obj)
    np.testing.assert_allclose(float(total), float(losses.sum()), rtol=1e-5)
    np.testing.assert_allclose(float(aux["chosen_reward"]), float(chosen.sum()), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(aux["rejected_reward"]), float(rejected.sum()), rtol=1e-4, atol=1e-6)
    assert abs(float(total) / 3 - LN2) > 1e-3  # the adapters moved the policy off the reference


def test_the_stored_reference_equals_the_live_one_and_is_kept(tmp_path):
    tok = get_tokenizer("gpt2")
    config = GPTConfig(vocab_size=50257, context_length=40, emb_dim=12, n_heads=3, n_layers=2,
                       drop_rate=0.0, dtype="float32")
    params = jax.device_get(init_params(config, jax.random.key(6)))
    train, val = PreferenceDataset(_records(5), tokenizer=tok, max_length=40), \
        PreferenceDataset(_records(3, seed=1), tokenizer=tok, max_length=40)
    sets = {"train": train, "val": val}
    assert reference.attach(tmp_path, params, config, sets, rows=2, reduction="sum", mesh_config=MeshConfig())
    live, _ = logps_fn(config, "sum")(params, None, train.rows(np.arange(5)), None, True)
    np.testing.assert_allclose(train.reference, np.asarray(live), rtol=1e-5)
    assert val.reference.shape == (3, 2)
    stored = train.reference.copy()
    train.reference = None
    assert not reference.attach(tmp_path, params, config, sets, rows=2, reduction="sum",
                                mesh_config=MeshConfig())  # read back, not computed
    np.testing.assert_array_equal(train.reference, stored)
    assert reference.attach(tmp_path, params, config, sets, rows=2, reduction="mean",
                            mesh_config=MeshConfig())  # another reduction: computed again


# ---- the run ----------------------------------------------------------------------------------

RUN_ARGS = ["preference.init_from=scratch", "preference.max_new_tokens=4", "preference.sample_records=2",
            "preference.response_batch_size=2", "model.vocab_size=50257", "model.context_length=48",
            "model.emb_dim=12", "model.n_heads=3", "model.n_layers=2", "model.drop_rate=0.0",
            "optim.learning_rate=1e-2", "train.batch_size=2", "train.max_steps=4", "train.eval_freq=3",
            "train.eval_iter=1", "train.sample_tokens=2", "train.progress=false", "train.report=false",
            "train.checkpoint_every=2"]


def _config(tmp, name, *extra):
    from jaxgpt.tasks.preference.finetune import PreferenceRunConfig
    from jaxgpt.training.runconfig import load_config

    data = tmp / "pairs.jsonl"
    if not data.exists():
        data.write_text("\n".join(json.dumps(r) for r in _records(60)))
    args = [f"runs_dir={tmp}", f"name={name}", f"preference.data={data}", *RUN_ARGS, *extra]
    return load_config(ROOT / "configs" / "preference_book.yaml", args, schema=PreferenceRunConfig)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    from jaxgpt.tasks.preference.finetune import finetune

    tmp = tmp_path_factory.mktemp("pref")
    finetune(_config(tmp, "full"))
    return tmp


def _train_records(run):
    from jaxgpt.training.metrics import read_metrics

    return [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


def test_a_run_logs_the_preference_metrics_and_writes_its_results(full_run):
    from jaxgpt.training.metrics import read_metrics
    from jaxgpt.weights.loader import load_model

    run = full_run / "full"
    records = read_metrics(run / "metrics.jsonl")
    assert abs(records[0]["loss"] - LN2) < 1e-6  # step 1 starts at the reference
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [1, 4]
    for split in ("train", "val"):
        for key in ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy"):
            assert all(np.isfinite(r[f"{split}_{key}"]) for r in evals), (split, key)
        assert all(abs(r[f"{split}_margin"] - (r[f"{split}_chosen_reward"] - r[f"{split}_rejected_reward"]))
                   < 1e-6 for r in evals)
    assert "beta" in evals[0]["val_reward_convention"]
    samples = json.loads((run / "preference_samples.json").read_text())
    assert len(samples) == 2 and all({"before", "after", "chosen", "rejected"} <= set(s) for s in samples)
    summary = json.loads((run / "preference_summary.json").read_text())
    assert summary["steps"] == 4 and summary["last_eval_step"] == 4
    assert summary["objective"] == {"loss": "sigmoid", "beta": 0.1, "label_smoothing": 0.0, "reduction": "mean"}
    assert (run / "reward_margin.png").is_file() and (run / "loss.png").is_file()
    config, params = load_model(run / "model")
    assert config.n_layers == 2
    _, latest = load_model(run)  # the run directory itself: its last checkpoint
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), params, latest)


def test_resume_equals_an_uninterrupted_run(full_run):
    from jaxgpt.tasks.preference.finetune import finetune
    from jaxgpt.training.fit import FitOptions
    from jaxgpt.weights.loader import load_model

    def stop_at_2(info):
        if info.step == 2:
            info.stop.request()

    cfg = _config(full_run, "resumed")
    assert finetune(cfg, FitOptions(hooks=[(stop_at_2, 1)])).fit.preempted
    assert [r["step"] for r in _train_records(full_run / "resumed")] == [1, 2]
    finetune(cfg)  # resumes from step 2
    assert _train_records(full_run / "resumed") == _train_records(full_run / "full")  # bitwise
    _, resumed = load_model(full_run / "resumed" / "model")
    _, full = load_model(full_run / "full" / "model")
    jax.tree.map(np.testing.assert_array_equal, resumed, full)


def test_lora_with_a_stored_reference_runs_exports_peft_and_generates(full_run, capsys):
    from jaxgpt.cli import generate

    spec = importlib.util.spec_from_file_location("finetune_preference", ROOT / "train" / "finetune_preference.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    data = full_run / "pairs.jsonl"
    args = [f"runs_dir={full_run}", "name=lora", f"preference.data={data}", *RUN_ARGS,
            "preference.reference=stored", "preference.reduction=sum", "lora.rank=2", "lora.alpha=4.0"]
    assert script.main(["--config", str(ROOT / "configs" / "preference_book.yaml"), *args]) == 0
    assert "done: 4 steps; last evaluation: val_loss" in capsys.readouterr().out
    run = full_run / "lora"
    assert (run / reference.FILE).is_file()
    assert abs(_train_records(run)[0]["loss"] - LN2) < 1e-6
    peft = json.loads((run / "peft" / "adapter_config.json").read_text())
    assert peft["r"] == 2 and (run / "peft" / "adapter_model.safetensors").is_file()
    assert generate.main(["--model", str(run / "model"), "--prompt", "Repeat red", "--max-new-tokens", "3"]) == 0


def test_bad_settings_are_one_line_before_any_work(full_run):
    from jaxgpt.tasks.preference.finetune import finetune
    from jaxgpt.training.runconfig import ConfigError

    with pytest.raises(ValueError, match="label_smoothing is for the sigmoid loss"):
        _config(full_run, "bad", "preference.loss=ipo", "preference.label_smoothing=0.1")
    with pytest.raises(ConfigError, match="preference.allowed_max_length=64 exceeds the model's context_length=48"):
        finetune(_config(full_run, "bad", "preference.allowed_max_length=64"))
    with pytest.raises(ConfigError, match="lora.trainable .* preference.reference=stored"):
        finetune(_config(full_run, "bad", "lora.rank=2", "lora.trainable=[lm_head]"))
    assert not (full_run / "bad" / "checkpoints").exists()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("preference_*.yaml")), ids=lambda p: p.name)
def test_preference_configs_load(path):
    from jaxgpt.tasks.preference.finetune import PreferenceRunConfig
    from jaxgpt.training.runconfig import load_config

    cfg = load_config(path, schema=PreferenceRunConfig)
    assert cfg.train.batch_size == 8 and cfg.preference.beta == 0.1 and cfg.train.epochs == 1
    assert cfg.preference.skip_bad_records  # the book's data holds 6 pairs with chosen == rejected


def test_book_recipe():
    from jaxgpt.tasks.preference.finetune import PreferenceRunConfig
    from jaxgpt.training.runconfig import load_config

    cfg = load_config(ROOT / "configs" / "preference_book.yaml", schema=PreferenceRunConfig)
    p, o = cfg.preference, cfg.optim
    assert (p.init_from, p.data, p.template, p.reduction, p.loss) == \
        ("runs/instruct_book", "instruction-data-with-preference", "alpaca", "mean", "sigmoid")
    assert (o.learning_rate, o.weight_decay, cfg.lora) == (5e-6, 0.01, None)
    assert (p.train_frac, p.test_frac) == (0.85, 0.10)


def test_a_qwen3_model_in_its_chat_template_with_lora(qwen_like_dir, tmp_path):
    from jaxgpt.tasks.preference.finetune import PreferenceRunConfig, finetune
    from jaxgpt.training.runconfig import load_config
    from jaxgpt.weights.loader import load_model

    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _records(30)))
    args = [f"runs_dir={tmp_path}", "name=qwen", f"preference.data={data}", f"preference.init_from={qwen_like_dir}",
            "preference.max_new_tokens=3", "preference.sample_records=1", "preference.allowed_max_length=64",
            "model.dtype=float32", "optim.learning_rate=1e-2", "train.batch_size=2", "train.max_steps=2",
            "train.eval_freq=2", "train.eval_iter=1", "train.sample_tokens=0", "train.progress=false",
            "train.report=false", "lora.rank=2", "lora.alpha=4.0"]
    cfg = load_config(ROOT / "configs" / "preference_qwen3_0.6b_lora.yaml", args, schema=PreferenceRunConfig)
    result = finetune(cfg)
    run = tmp_path / "qwen"
    assert abs(_train_records(run)[0]["loss"] - LN2) < 1e-6
    assert result.summary["steps"] == 2
    # The chat template's pairs learn each reply, its end of turn and the appended stop id.
    from jaxgpt.data.prompts import ChatTemplate
    from jaxgpt.data.tokenizer import FamilyTokenizer

    tok = FamilyTokenizer(qwen_like_dir)
    rec = _records(1)[0]
    row = PreferenceDataset([rec], ChatTemplate(tok), tokenizer=tok, max_length=64,
                            pad_id=tok.stop_ids[0]).rows([0])
    for side, key in enumerate(("chosen", "rejected")):
        t = row["targets"][0, side]
        assert tok.decode(t[t != IGNORE].tolist()) == rec[key] + "<|im_end|>\n<|im_end|>"
    assert (run / "model" / "tokenizer.json").is_file() and (run / "peft" / "adapter_config.json").is_file()
    config, _ = load_model(run / "model")
    assert config.family == "qwen3"
