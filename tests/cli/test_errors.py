"""Command lines under bad input: one `error:` line, no library noise, JAXGPT_DEBUG=1 for the trace."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxgpt import GPTConfig, init_params
from jaxgpt.training.runconfig import ConfigError, RunConfig
from tests.conftest import TINY, write_run

ROOT = Path(__file__).resolve().parents[2]
chat = importlib.import_module("jaxgpt.cli.chat")
classify = importlib.import_module("jaxgpt.cli.classify")
generate = importlib.import_module("jaxgpt.cli.generate")


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    """A pretraining run directory (config.yaml and one checkpoint), no training needed."""
    config = GPTConfig(**TINY)
    return write_run(tmp_path_factory.mktemp("runs") / "pre", RunConfig(model=config),
                     {1: init_params(config, jax.random.key(0))})


@pytest.mark.parametrize("value, message", [
    ("0", "--max-new-tokens must be at least 1, got 0"),
    (str(10**9), "max_new_tokens=1000000000 is too many"),
])
def test_chat_refuses_impossible_lengths_before_loading(tmp_path, capsys, value, message):
    assert chat.main(["--model", str(tmp_path / "no-such-model"), "--max-new-tokens", value]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: {message}") and err.count("\n") == 1


def test_classify_names_a_pretraining_run_as_not_a_classifier(pretrain_run, capsys):
    assert classify.main(["--model", str(pretrain_run), "some text"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"error: {pretrain_run} is not a classifier run")
    assert "Key" not in err and "classifier." not in err  # no config key, no schema message


# Run apart from pytest, whose log capture would swallow the warnings this is about. Importing
# Orbax puts a stderr handler on the root logger, so its absl warnings reach the terminal.
NOISY = """
import importlib
import orbax.checkpoint  # noqa: F401
from absl import logging
import jaxgpt.tasks.classification.model as model

def noisy(*args, **kwargs):
    logging.warning("Sharding info not provided when restoring")  # as Orbax logs it
    raise ValueError("the real problem")

model.load_classifier = noisy
codes = []
for name, args in (("classify", ["text"]), ("generate", ["--prompt", "Hi"]), ("chat", [])):
    cli = importlib.import_module(f"jaxgpt.cli.{name}")
    cli.load_model = noisy
    codes.append(cli.main(["--model", "somewhere", *args]))
print(codes)
"""


def test_library_warnings_stay_off_the_terminal():
    env = {k: v for k, v in os.environ.items() if k != "JAXGPT_DEBUG"}
    proc = subprocess.run([sys.executable, "-c", NOISY], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**env, "JAX_PLATFORMS": "cpu"})
    assert proc.stdout == "[2, 1, 1]\n", proc.stderr[-2000:]
    assert proc.stderr == "error: the real problem\n" * 3


def _pretrain_script():
    sys.path.insert(0, str(ROOT / "train"))
    try:
        return importlib.import_module("pretrain")
    finally:
        sys.path.remove(str(ROOT / "train"))


def test_a_script_prints_one_line_and_jaxgpt_debug_gives_the_trace(monkeypatch, capsys, tmp_path):
    script = _pretrain_script()
    bad = [f"runs_dir={tmp_path}", "train.batch_size=0"]
    monkeypatch.delenv("JAXGPT_DEBUG", raising=False)
    assert script.main(bad) == 2
    assert capsys.readouterr().err == "error: train.batch_size must be a positive integer, got 0\n"
    monkeypatch.setenv("JAXGPT_DEBUG", "1")
    with pytest.raises(ConfigError, match="train.batch_size must be a positive integer"):
        script.main(bad)
    assert not (tmp_path / "default").exists()  # refused before a run directory was made


def test_a_diverged_run_names_the_cause_and_the_key(tmp_path, corpus):
    # A learning rate far too high: the run stops on its own divergence in one line naming
    # optim.learning_rate (not "check the weights it loaded" from the sampler), and no
    # tensorboardX warning comes before it.
    plain = tmp_path / "plain.yaml"
    plain.write_text("{}\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train" / "pretrain.py"), "--config", str(plain),
         "model.vocab_size=50257", "model.context_length=16", "model.emb_dim=12", "model.n_heads=3",
         "model.n_layers=2", "train.batch_size=4", "train.max_steps=30", "train.eval_freq=5",
         "train.eval_iter=2", "train.sample_tokens=5", "train.progress=false",
         "optim.learning_rate=1000", f"runs_dir={tmp_path}", f"data.source={corpus}"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and "training diverged" in errors[0], proc.stderr[-2000:]
    assert "optim.learning_rate, now 1000" in errors[0] and "weights" not in errors[0]
