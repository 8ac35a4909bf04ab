"""Typed run configuration: frozen dataclasses, YAML files and dotted command-line overrides.

OmegaConf does the typing: an unknown key or a value of the wrong type is an error that names
the key. A `model_preset` (e.g. gpt2-small) is laid under the YAML's `model` section, so a file
only states what it changes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jaxgpt.config import PRESET_ALIASES, PRESETS, GPTConfig
from jaxgpt.distributed import DistributedConfig
from jaxgpt.sharding import MeshConfig


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup, then constant or cosine decay, and optional clipping."""

    learning_rate: float = 4e-4  # peak
    init_lr: float = 0.0  # start of the warmup
    min_lr: float = 0.0  # end of the cosine decay
    warmup_steps: int = 0
    decay: str = "constant"  # "constant" or "cosine"
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: Optional[float] = None  # global-norm clipping threshold
    accum_steps: int = 1  # micro-batches per step; batch_size must divide by it


@dataclass(frozen=True)
class DataConfig:
    source: str = "default"  # a path, a glob, "default", a named corpus, or "hf:<dataset>"
    text_column: str = "text"  # for hf: sources
    tokenizer: str = "gpt2"
    train_ratio: float = 0.9
    stride: Optional[int] = None  # defaults to the model's context length


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 8  # global, across all devices and micro-batches
    epochs: int = 1
    max_steps: Optional[int] = None  # overrides epochs when set
    seed: int = 123
    eval_freq: int = 50  # steps between evaluations (the book's eval_freq)
    eval_iter: int = 5  # batches per evaluation (the book's eval_iter)
    sample_prompt: str = "Every effort moves you"
    sample_tokens: int = 30
    sample_temperature: float = 0.0  # 0: greedy
    sample_top_k: Optional[int] = None
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    max_consecutive_skips: int = 5  # non-finite updates in a row before the run stops
    progress: bool = True
    report: bool = True  # print the sharding and memory report before the first step


@dataclass(frozen=True)
class RunConfig:
    name: str = "default"
    runs_dir: str = "runs"
    model_preset: Optional[str] = None
    model: GPTConfig = field(default_factory=GPTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A configuration mistake, reported in one line."""


def load_config(path: str | Path | None = None, overrides: list[str] = (), schema=RunConfig):
    """Build a run configuration from an optional YAML file and `key=value` overrides."""
    try:
        base = OmegaConf.structured(schema)
        OmegaConf.set_readonly(base, False)
        layers = [OmegaConf.load(path)] if path else []
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        user = OmegaConf.merge(*layers) if layers else OmegaConf.create({})
        preset = user.get("model_preset")
        if preset:
            key = PRESET_ALIASES.get(preset, preset)
            if key not in PRESETS:
                raise ConfigError(f"model_preset {preset!r} is unknown; choose from {sorted(PRESETS)}")
            base = OmegaConf.merge(base, {"model": PRESETS[key]})
        return OmegaConf.to_object(OmegaConf.merge(base, user))
    except OmegaConfBaseException as e:
        raise ConfigError(f"config error: {str(e).splitlines()[0]}") from None
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config error: {e}") from None


def save_config(config, path: str | Path) -> None:
    """Write a run configuration as YAML (the run directory's record of what it is)."""
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))


def config_from_yaml(path: str | Path, schema=RunConfig):
    """Read back a configuration written by `save_config`."""
    return load_config(path, schema=schema)
