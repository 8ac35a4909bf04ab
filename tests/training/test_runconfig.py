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
           "cls_": ("jaxgpt.tasks.classification.model", "ClassifierRunConfig")}


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
