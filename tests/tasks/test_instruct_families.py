"""Instruction finetuning of a Llama-family model in its own chat template (template=chat):
a random tiny LlamaForCausalLM beside a tokenizer.json built offline, LoRA on its projections."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from jaxgpt.tasks.instruct.data import IGNORE, InstructDataset  # noqa: E402
from jaxgpt.data.prompts import ChatTemplate  # noqa: E402
from jaxgpt.data.tokenizer import FamilyTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WORDS = "red green blue cat dog sun moon tree river stone".split()


def _records(n):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        w = rng.choice(WORDS, 3)
        out.append({"instruction": f"Repeat {w[0]} {w[1]}.", "input": w[2] if i % 3 == 0 else "",
                    "output": f"{w[0]} {w[1]}"})
    return out


def test_chat_dataset_learns_the_reply_and_its_end_of_turn(qwen_like_dir):
    tok = FamilyTokenizer(qwen_like_dir)
    rec = _records(1)[0]
    ds = InstructDataset([rec], ChatTemplate(tok), tokenizer=tok, mask_prompt=True,
                         pad_id=tok.stop_ids[0])
    row = ds.rows([0])
    learned = row["targets"][0][row["targets"][0] != IGNORE].tolist()
    im_end = tok.tokenizer.token_to_id("<|im_end|>")
    # The reply, the template's <|im_end|> and newline, then the appended stop id.
    assert tok.decode(learned) == rec["output"] + "<|im_end|>\n<|im_end|>"
    assert learned[-1] == im_end == tok.stop_ids[0]


def test_lora_chat_finetune_runs_exports_and_chats(qwen_like_dir, tmp_path, monkeypatch, capsys):
    import io

    from jaxgpt.cli import chat
    from jaxgpt.weights.loader import load_model

    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _records(40)))
    spec = importlib.util.spec_from_file_location("finetune_instruct", ROOT / "train" / "finetune_instruct.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = [f"runs_dir={tmp_path}", "name=run", f"instruct.data={data}",
            f"instruct.init_from={qwen_like_dir}", "instruct.template=chat", "instruct.max_new_tokens=4",
            "instruct.response_batch_size=2", "instruct.max_test_records=2", "instruct.allowed_max_length=96",
            "model.dtype=float32", "optim.learning_rate=1e-2", "train.batch_size=4", "train.max_steps=2",
            "train.eval_freq=2", "train.eval_iter=1", "train.sample_tokens=2", "train.progress=false",
            "train.report=false", "lora.rank=2", "lora.alpha=4.0"]
    assert script.main(["--config", str(ROOT / "configs" / "instruct_qwen3_0.6b_lora.yaml"), *args]) == 0
    run = tmp_path / "run"
    responses = json.loads((run / "test_responses.json").read_text())
    assert len(responses) == 2 and all("model_response" in r for r in responses)
    assert (run / "model" / "tokenizer.json").is_file()
    config, _ = load_model(run)
    assert config.family == "qwen3"
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("Repeat red cat.\nexit\n"))
    assert chat.main(["--model", str(run), "--max-new-tokens", "3"]) == 0
    assert len(capsys.readouterr().out.split("\n")) == 2  # one reply (random weights: any text)
    summary = json.loads((run / "instruct_summary.json").read_text())
    assert 0 < summary["val_loss_after"] < summary["val_loss_before"]  # the replies are learned
