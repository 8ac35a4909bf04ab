import importlib
from pathlib import Path

import pytest

from jaxgpt.training.runconfig import (
    ConfigError,
    RunConfig,
    config_from_yaml,
    load_config,
    save_config,
)

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


# Recipes with sections of their own load with their schema, a RunConfig subclass.
SCHEMAS = {"instruct_": ("jaxgpt.tasks.instruct.finetune", "InstructRunConfig"),
           "cls_": ("jaxgpt.tasks.classification.model", "ClassifierRunConfig"),
           "preference_": ("jaxgpt.tasks.preference.finetune", "PreferenceRunConfig")}


def _schema(path):
    for prefix, (module, name) in SCHEMAS.items():
        if path.name.startswith(prefix):
            return getattr(importlib.import_module(module), name)
    return RunConfig


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path, schema=_schema(path))
    assert isinstance(cfg, RunConfig) and cfg.model.emb_dim % cfg.model.n_heads == 0


def test_there_are_configs():
    names = {p.stem for p in CONFIGS}
    assert {"default", "ch05_verdict", "appendix_d_verdict", "gpt2_small_hf"} <= names


def test_chapter5_recipe_matches_the_book():
    cfg = load_config(Path(CONFIGS[0]).parent / "ch05_verdict.yaml")
    m, o, t = cfg.model, cfg.optim, cfg.train
    assert (m.emb_dim, m.n_layers, m.n_heads, m.context_length) == (768, 12, 12, 256)
    assert (m.drop_rate, m.qkv_bias, m.tie_embeddings) == (0.1, False, False)
    assert (o.learning_rate, o.weight_decay, t.batch_size, t.epochs, t.eval_freq) == (4e-4, 0.1, 2, 10, 5)


def test_preset_is_a_layer_under_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model_preset: gpt2-medium\nmodel:\n  context_length: 64\n")
    cfg = load_config(f, ["model.drop_rate=0.0"])
    assert (cfg.model.emb_dim, cfg.model.n_layers, cfg.model.context_length) == (1024, 24, 64)
    assert cfg.model.drop_rate == 0.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.learning_rte=1"], "learning_rte"),
        (["train.batch_size=many"], "many"),
        (["model.n_heads=5"], "n_heads=5"),
        (["model_preset=gpt5"], "gpt5"),
        (["train.batch_size"], "key=value"),
    ],
)
def test_bad_keys_and_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["model.emb_dim=24", "model.n_heads=3", "optim.grad_clip=1.0"])
    save_config(cfg, tmp_path / "config.yaml")
    assert config_from_yaml(tmp_path / "config.yaml") == cfg


# Every numeric field is checked when the config loads, with the dotted key the user writes.
@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", "train.batch_size must be a positive integer, got 0"),
    ("train.checkpoint_every=0", "train.checkpoint_every must be a positive integer, got 0"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints must be a positive integer, got 0"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints must be a positive integer, got -1"),
    ("train.eval_iter=0", "train.eval_iter must be a positive integer, got 0"),
    ("train.epochs=0", "train.epochs must be a positive integer, got 0"),
    ("train.max_steps=-3", r"train.max_steps must be a positive integer or null, got -3"),
    ("train.eval_freq=-1", "train.eval_freq must be a non-negative integer, got -1"),
    ("train.seed=-1", "train.seed must be a non-negative integer"),
    ("train.sample_top_k=0", "train.sample_top_k must be"),
    ("train.sample_temperature=-0.5", "train.sample_temperature must be a finite number >= 0"),
    ("train.max_consecutive_skips=0", "train.max_consecutive_skips must be"),
    ("optim.accum_steps=0", "optim.accum_steps must be a positive integer, got 0"),
    ("optim.learning_rate=0", r"optim.learning_rate must be a finite number > 0, got 0"),
    ("optim.learning_rate=nan", "optim.learning_rate must be a finite number > 0, got nan"),
    ("optim.learning_rate=inf", "optim.learning_rate must be a finite number > 0, got inf"),
    ("optim.warmup_steps=-2", "optim.warmup_steps must be a non-negative integer"),
    ("optim.b2=1.0", r"optim.b2 must be a number in \[0, 1\), got 1.0"),
    ("optim.eps=0", "optim.eps must be a finite number > 0"),
    ("optim.grad_clip=0", "optim.grad_clip must be a finite number > 0 or null"),
    ("optim.decay=linear", "optim.decay must be one of"),
    ("data.stride=0", "data.stride must be a positive integer or null, got 0"),
    ("data.train_ratio=1.0", r"data.train_ratio must be a number in \(0, 1\), got 1.0"),
    ("data.train_ratio=0", r"data.train_ratio must be a number in \(0, 1\)"),
    ("mesh.fsdp=0", r"mesh.fsdp must be a positive integer or -1 \(all remaining devices\), got 0"),
    ("mesh.tensor=-2", "mesh.tensor must be a positive integer or -1"),
    ("mesh.tensor=-1", "mesh.tensor cannot be -1 as well as data"),
    ("distributed.num_processes=0", "distributed.num_processes must be a positive integer or null"),
    ("distributed.process_id=-1", "distributed.process_id must be a non-negative integer or null"),
    ("distributed.initialization_timeout=0", "distributed.initialization_timeout must be"),
    ("model.ln_eps=0", r"model.ln_eps must be a number in \(0, 1\), got 0"),
    ("model.ln_eps=5", r"model.ln_eps must be a number in \(0, 1\), got 5"),
    ("model.ln_eps=nan", r"model.ln_eps must be a number in \(0, 1\), got nan"),
    ("model.drop_rate=1.0", r"model.drop_rate must be a number in \[0, 1\)"),
    ("model.vocab_size=0", "model.vocab_size must be a positive integer, got 0"),
    ("name=' '", "name must be a non-empty string"),
])
def test_impossible_values_are_refused_at_load_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        load_config(None, [override])


def test_a_bad_value_in_the_file_names_the_file_and_line(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("name: x\ntrain:\n  epochs: 2\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match=f"^{f} line 4: train.batch_size must be a positive"):
        load_config(f)
    with pytest.raises(ConfigError, match="^train.batch_size must be a positive integer, got -1"):
        load_config(f, ["train.batch_size=-1"])  # the override is what is wrong: no file named
    assert load_config(f, ["train.batch_size=2"]).train.batch_size == 2


def test_gpt_config_refuses_an_impossible_layernorm_epsilon():
    from jaxgpt.config import GPTConfig

    for eps in (0.0, -1e-5, 1.0, float("inf")):
        with pytest.raises(ValueError, match="GPTConfig.ln_eps must be a number in"):
            GPTConfig(ln_eps=eps)
    assert GPTConfig(ln_eps=1e-6).ln_eps == 1e-6


def test_task_sections_are_checked_with_their_keys():
    from jaxgpt.tasks.classification.model import ClassifierRunConfig
    from jaxgpt.tasks.instruct.finetune import InstructRunConfig

    cases = [
        (ClassifierRunConfig, "data.train_fraction=1.5", r"data.train_fraction must be a number in \(0, 1\)"),
        (ClassifierRunConfig, "data.validation_fraction=0.4", "data.validation_fraction=0.4 plus train_fraction=0.7"),
        (ClassifierRunConfig, "data.max_length=0", "data.max_length must be a positive integer or null"),
        (ClassifierRunConfig, "data.labels=[spam]", "data.labels must name at least two distinct"),
        (ClassifierRunConfig, "classifier.lora.rank=0", "classifier.lora.rank must be a positive integer"),
        (ClassifierRunConfig, "classifier.pooling=first", "classifier.pooling must be one of"),
        (InstructRunConfig, "instruct.train_frac=0", r"instruct.train_frac must be a number in \(0, 1\]"),
        (InstructRunConfig, "instruct.test_frac=0.5", "instruct.test_frac=0.5 plus train_frac=0.85 exceeds 1"),
        (InstructRunConfig, "instruct.max_new_tokens=0", "instruct.max_new_tokens must be a positive"),
        (InstructRunConfig, "instruct.response_batch_size=-1", "instruct.response_batch_size must be"),
        (InstructRunConfig, "instruct.bucket=0", "instruct.bucket must be a positive integer or null"),
        (InstructRunConfig, "instruct.template=chatml", "instruct.template must be one of"),
        (InstructRunConfig, "lora.rank=0", "^lora.rank must be a positive integer"),
    ]
    for schema, override, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override], schema=schema)


@pytest.mark.parametrize("content, message", [
    ("- a\n- b\n", "must hold a mapping of sections"),
    ("train:\n  batch_size: [1\n", r"line 3: not valid YAML"),
    ("train: {}\ntrain: {}\n", "line 2: not valid YAML .found duplicate key"),
    (None, "is a directory"),
])
def test_a_config_file_that_is_not_a_mapping_is_one_line_naming_it(tmp_path, content, message):
    f = tmp_path / "run.yaml"
    if content is None:
        f.mkdir()
    else:
        f.write_text(content)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(f)
    assert str(f) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
