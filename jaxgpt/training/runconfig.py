"""Typed run configuration: frozen dataclasses, YAML files and dotted command-line overrides.

OmegaConf does the typing: an unknown key or a value of the wrong type is an error that names
the key. Each dataclass checks its values against its table of rules (jaxgpt/checks.py) when it
is built; `load_config` builds the sections one by one, so a broken rule is reported with the
dotted key (`train.batch_size must be a positive integer, got 0`) and, when the value came from
the YAML file, the file and line. A `model_preset` (e.g. gpt2-small) is laid under the YAML's
`model` section, so a file only states what it changes.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jaxgpt.checks import (
    FRACTION,
    NON_EMPTY,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    PROBABILITY,
    check_fields,
    one_of,
    optional,
)
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

    def __post_init__(self):
        check_fields(self, {
            "learning_rate": POSITIVE, "init_lr": NON_NEGATIVE, "min_lr": NON_NEGATIVE,
            "warmup_steps": NON_NEGATIVE_INT, "decay": one_of("constant", "cosine"),
            "weight_decay": NON_NEGATIVE, "b1": PROBABILITY, "b2": PROBABILITY, "eps": POSITIVE,
            "grad_clip": optional(POSITIVE), "accum_steps": POSITIVE_INT})


@dataclass(frozen=True)
class DataConfig:
    source: str = "default"  # a path, a glob, "default", a named corpus, or "hf:<dataset>"
    text_column: str = "text"  # for hf: sources
    tokenizer: str = "gpt2"
    train_ratio: float = 0.9
    stride: Optional[int] = None  # defaults to the model's context length
    # A directory of token shards (train/prepare_data.py): when set, windows are read from its
    # memory-mapped shards (its own validation shard; `source` and `train_ratio` are unused).
    shards: Optional[str] = None
    # Read each shard whole once per process, when first used, and check it against the
    # manifest's sha256 and the vocabulary (false: only each batch's ids are checked).
    verify_shards: bool = True
    hellaswag: Optional[str] = None  # a HellaSwag-format JSONL file scored at each evaluation
    hellaswag_examples: Optional[int] = None  # score only the first N examples (None: all)
    # lm-evaluation-harness tasks (comma-separated) scored at each evaluation, each on its first
    # `harness_limit` examples; `harness_include` a folder of task files (jaxgpt's own are known).
    harness_tasks: Optional[str] = None
    harness_limit: Optional[int] = None
    harness_include: Optional[str] = None

    def __post_init__(self):
        check_fields(self, {"source": NON_EMPTY, "tokenizer": NON_EMPTY, "train_ratio": FRACTION,
                            "stride": optional(POSITIVE_INT), "shards": optional(NON_EMPTY),
                            "hellaswag": optional(NON_EMPTY),
                            "hellaswag_examples": optional(POSITIVE_INT),
                            "harness_tasks": optional(NON_EMPTY), "harness_limit": optional(POSITIVE_INT),
                            "harness_include": optional(NON_EMPTY)})


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
    report_table: bool = False  # the per-parameter table even on one device

    def __post_init__(self):
        check_fields(self, {
            "batch_size": POSITIVE_INT, "epochs": POSITIVE_INT, "max_steps": optional(POSITIVE_INT),
            "seed": NON_NEGATIVE_INT,  # numpy's generators take no negative seed
            "eval_freq": NON_NEGATIVE_INT,  # 0: no evaluation
            "eval_iter": POSITIVE_INT, "sample_tokens": NON_NEGATIVE_INT,  # 0: no samples
            "sample_temperature": NON_NEGATIVE, "sample_top_k": optional(POSITIVE_INT),
            "checkpoint_every": POSITIVE_INT,
            "keep_checkpoints": POSITIVE_INT,  # Orbax takes 0 as "keep none": a run would end with no checkpoint
            "max_consecutive_skips": POSITIVE_INT})


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

    def __post_init__(self):
        check_fields(self, {"name": NON_EMPTY, "runs_dir": NON_EMPTY})

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A configuration mistake, reported in one line."""


def load_config(path: str | Path | None = None, overrides: list[str] = (), schema=RunConfig):
    """Build a run configuration from an optional YAML file and `key=value` overrides."""
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
    from_file = _read_yaml(Path(path)) if path else None
    given = {o.split("=", 1)[0].strip() for o in overrides}

    def where(key: str) -> str:  # "FILE line N: " when the value came from the file
        if key in given or from_file is None:
            return ""
        line = _yaml_line(Path(path), key)
        return f"{path} line {line}: " if line else ""

    try:
        base = OmegaConf.structured(schema)
        OmegaConf.set_readonly(base, False)
        layers = [x for x in (from_file, OmegaConf.from_dotlist(list(overrides))) if x is not None]
        user = OmegaConf.merge(*layers)
        preset = user.get("model_preset")
        if preset:
            key = PRESET_ALIASES.get(preset, preset)
            if key not in PRESETS:
                raise ConfigError(f"{where('model_preset')}model_preset {preset!r} is unknown; "
                                  f"choose from {sorted(PRESETS)}")
            base = OmegaConf.merge(base, {"model": PRESETS[key]})
        return _build(OmegaConf.merge(base, user), "", where)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        named = f"{where(key)}{key}: " if key else ""
        raise ConfigError(f"{named}{str(e).splitlines()[0]}") from None


def _read_yaml(path: Path) -> DictConfig:
    """The file's mapping, or a one-line ConfigError naming the file."""
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {path} {what}; --config takes a YAML file")
    try:
        loaded = OmegaConf.load(path)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{at}: not valid YAML ({problem})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path} must hold a mapping of sections (model:, train:, ...), "
                          "not a list")
    return loaded


def _yaml_line(path: Path, key: str) -> int | None:
    """The 1-based line of a dotted key in a YAML file, if the file states it."""
    node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    line = None
    for part in key.split("."):
        if not isinstance(node, yaml.MappingNode):
            return None
        match = next(((k, v) for k, v in node.value if k.value == part), None)
        if match is None:
            return None
        line, node = match[0].start_mark.line + 1, match[1]
    return line


def _build(node: DictConfig, prefix: str, where):
    """OmegaConf.to_object, sections first: a section's "ClassName.field ..." error is reported
    as the dotted key the user writes ("train.batch_size ...")."""
    for key in node:
        child = node[key]
        if isinstance(child, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(child)):
            _build(child, f"{prefix}{key}.", where)
    try:
        return OmegaConf.to_object(node)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        name, message = OmegaConf.get_type(node).__name__ + ".", str(e)
        if not message.startswith(name):
            raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {message}") from None
        message = prefix + message[len(name):]
        key = re.match(r"[\w.]+", message).group(0)
        raise ConfigError(where(key) + message) from None


def save_config(config, path: str | Path) -> None:
    """Write a run configuration as YAML (the run directory's record of what it is)."""
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))


def config_from_yaml(path: str | Path, schema=RunConfig):
    """Read back a configuration written by `save_config`."""
    return load_config(path, schema=schema)
