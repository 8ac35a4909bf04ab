"""The GPT-2 124M FineWeb-Edu recipe: its values are llm.c's/nanoGPT's, and the shipped file
runs end to end (tiny model, small local corpus prepared here, HellaSwag fixture)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from jaxgpt.data.prepare import PrepareOptions, prepare
from jaxgpt.data.sources import SourceSpec
from jaxgpt.training.metrics import read_metrics
from jaxgpt.training.runconfig import load_config

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "gpt2_124m_fineweb.yaml"


def test_recipe_is_the_gpt2_124m_reproduction():
    cfg = load_config(RECIPE)
    m, o, t = cfg.model, cfg.optim, cfg.train
    assert (m.n_layers, m.n_heads, m.emb_dim, m.context_length, m.vocab_size) == (12, 12, 768, 1024, 50257)
    assert (m.drop_rate, m.dtype, m.tie_embeddings) == (0.0, "bfloat16", True)
    assert t.batch_size * m.context_length == 524_288 and t.batch_size % o.accum_steps == 0
    assert (o.learning_rate, o.b1, o.b2, o.weight_decay, o.grad_clip, o.decay) == (6e-4, 0.9, 0.95, 0.1, 1.0, "cosine")
    assert 0 < o.warmup_steps < t.max_steps and cfg.data.shards and cfg.data.hellaswag
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (-1, 1, 1)


def test_recipe_runs_on_a_small_local_corpus(tmp_path):
    rng = np.random.default_rng(11)
    words = "education science history learning students the of and to a in is".split()
    for i in range(10):
        (tmp_path / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 300)))
    shards = tmp_path / "shards"
    prepare(SourceSpec(str(tmp_path / "*.txt")), shards, PrepareOptions(shard_tokens=1000, val_tokens=400, workers=0),
            log=lambda text: None)
    hs = tmp_path / "hs.jsonl"
    hs.write_text("".join(json.dumps({"ctx": f"Students learn {i}", "endings": ["science", "the", "of a", "history"],
                                      "label": i % 4}) + "\n" for i in range(3)))
    overrides = [f"runs_dir={tmp_path / 'runs'}", f"data.shards={shards}", f"data.hellaswag={hs}",
                 "data.hellaswag_examples=2", "model.n_layers=1", "model.n_heads=3", "model.emb_dim=12",
                 "model.context_length=16", "train.batch_size=8", "optim.accum_steps=2",
                 "train.max_steps=2", "train.eval_freq=1", "train.eval_iter=1", "optim.warmup_steps=1",
                 "train.sample_tokens=3", "train.progress=false", "train.report=false"]
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "pretrain.py"), "--config", str(RECIPE), *overrides],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(tmp_path / "runs" / "gpt2_124m_fineweb" / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2]
    assert all(0.0 <= r["hellaswag_acc_norm"] <= 1.0 and np.isfinite(r["val_loss"]) for r in evals)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["tokens_seen"] for r in train] == [8 * 16, 16 * 16]  # both micro-batches counted
