"""Labelled text for classification (chapter 6): the book's balanced split, labels, token arrays.

Sources are read by `readers.py`. Labels are compared as strings and mapped to ids by their
position in a label list, which is saved beside the model. Token arrays are padded on the right
with `pad_id`, and a 0/1 mask marks the real tokens: the pad id (50256, GPT-2's end-of-text; a
Llama/Qwen3 tokenizer's pad or end-of-text token) may also occur inside a text, so padding is
never found by id. The tokenizer is GPT-2's or, for a Llama 3 / Qwen3 base, the model
directory's own tokenizer.json (`data.tokenizer: auto` picks it).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from jaxgpt.checks import (
    FRACTION,
    NON_EMPTY,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    check_fields,
    optional,
)
from jaxgpt.tasks.classification.readers import Rows, read_source
from jaxgpt.data.tokenizer import EOT_ID, get_tokenizer, load_family_tokenizer, tokenizer_dir

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class ClassifierDataConfig:
    source: str = "sms-spam"  # "sms-spam", a data file (see read_table), or "hf:<path>[:<config>]"
    validation: Optional[str] = None  # a separate validation file; else carved from the source
    test: Optional[str] = None  # a separate test file; else carved from the source
    text_column: str = "text"
    label_column: str = "label"
    labels: Optional[list[str]] = None  # class order (id = position); default: sorted training labels
    balance: bool = False  # downsample every class to the rarest one (the book's balanced subset)
    train_fraction: float = 0.7
    validation_fraction: float = 0.1  # the test split takes the rest
    max_length: Optional[int] = None  # default: the longest training text, capped by the context
    # "auto": the base model directory's tokenizer.json if it has one (Llama 3, Qwen3), else
    # GPT-2's; "gpt2"; or a directory holding a tokenizer.json
    tokenizer: str = "auto"
    pad_id: Optional[int] = None  # default: GPT-2's 50256; a family's pad (else end-of-text) id
    seed: int = 123

    def __post_init__(self):
        check_fields(self, {"source": NON_EMPTY, "train_fraction": FRACTION,
                            "validation_fraction": FRACTION, "max_length": optional(POSITIVE_INT),
                            "pad_id": optional(NON_NEGATIVE_INT), "seed": NON_NEGATIVE_INT})
        if self.train_fraction + self.validation_fraction >= 1:
            raise ValueError(f"ClassifierDataConfig.validation_fraction={self.validation_fraction} "
                             f"plus train_fraction={self.train_fraction} must be below 1 (the test "
                             "split takes the rest)")
        if self.labels is not None and (len(set(map(str, self.labels))) != len(self.labels)
                                        or len(self.labels) < 2):
            raise ValueError("ClassifierDataConfig.labels must name at least two distinct classes, "
                             f"got {list(self.labels)}")


# ---- balancing and splitting ---------------------------------------------------------------


def balance(rows: Rows, seed: int = 123) -> Rows:
    """Every class downsampled (seeded) to the size of the rarest; for spam, all 747 spam and
    747 ham as in the book. Row order: class by class, in order of first appearance."""
    texts, labels = rows
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels, dtype=object)
    classes = list(dict.fromkeys(labels))
    n = min(int(np.sum(labels_arr == c)) for c in classes)
    keep = []
    for c in classes:
        idx = np.flatnonzero(labels_arr == c)
        keep.extend(sorted(rng.choice(idx, n, replace=False)) if len(idx) > n else idx)
    return [texts[i] for i in keep], [labels[i] for i in keep]


def split_sizes(n: int, fractions: list[float]) -> list[int]:
    """The book's cuts: int(fraction * n) for all but the last part, which takes the rest."""
    sizes = [int(f * n) for f in fractions[:-1]]
    return sizes + [n - sum(sizes)]


def random_split(rows: Rows, fractions: list[float], seed: int = 123) -> list[Rows]:
    """Shuffle (seeded), then cut into consecutive parts of `split_sizes`."""
    texts, labels = rows
    order = np.random.default_rng(seed).permutation(len(texts))
    parts, start = [], 0
    for size in split_sizes(len(texts), fractions):
        idx = order[start:start + size]
        parts.append(([texts[i] for i in idx], [labels[i] for i in idx]))
        start += size
    return parts


def load_splits(cfg: ClassifierDataConfig) -> dict[str, Rows]:
    """Train/validation/test rows: the splits the source gives, the missing ones carved from train."""
    f_train, f_val = cfg.train_fraction, cfg.validation_fraction  # checked by the config
    splits = read_source(cfg.source, cfg.text_column, cfg.label_column)
    for name in ("validation", "test"):
        extra = getattr(cfg, name)
        if extra is not None:
            splits[name] = read_source(extra, cfg.text_column, cfg.label_column)["train"]
    train = balance(splits["train"], cfg.seed) if cfg.balance else splits["train"]
    names = ["train"] + [s for s in SPLITS[1:] if s not in splits]
    fractions = [f_train, f_val, 1.0 - f_train - f_val]  # the book's; else renormalised
    if len(names) < len(SPLITS):
        share = {"train": f_train, "validation": f_val, "test": 1.0 - f_train - f_val}
        fractions = [share[s] / sum(share[n] for n in names) for s in names]
    splits.update(zip(names, random_split(train, fractions, cfg.seed)))
    for name in SPLITS:
        if not splits[name][0]:
            raise ValueError(f"the {name} split is empty; use more data or other fractions")
    return {s: splits[s] for s in SPLITS}


# ---- labels --------------------------------------------------------------------------------


def label_list(train_labels: list[str], given: Optional[list[str]] = None) -> list[str]:
    """The class names in id order: `given`, or the sorted distinct training labels."""
    if given is not None:
        labels = [str(x) for x in given]
        if len(set(labels)) != len(labels) or len(labels) < 2:
            raise ValueError(f"data.labels must name at least two distinct classes, got {labels}")
        return labels
    labels = sorted(set(train_labels))
    if len(labels) < 2:
        raise ValueError(f"the training split has a single class {labels}; a classifier needs two")
    return labels


def encode_labels(labels: list[str], classes: list[str], split: str) -> np.ndarray:
    """Label ids [N] int32; a label outside `classes` is an error naming it and the split."""
    index = {c: i for i, c in enumerate(classes)}
    bad = next((x for x in labels if x not in index), None)
    if bad is not None:
        raise ValueError(f"label {bad!r} in the {split} split is not one of the classes {classes}")
    return np.asarray([index[x] for x in labels], np.int32)


def save_labels(classes: list[str], path: str | Path) -> None:
    """Write the label mapping (id = position) as JSON."""
    Path(path).write_text(json.dumps({"labels": list(classes)}, indent=1) + "\n")


def load_labels(path: str | Path) -> list[str]:
    """Read a label mapping written by `save_labels`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no label mapping {path}")
    return list(json.loads(path.read_text())["labels"])


# ---- tokens --------------------------------------------------------------------------------


def resolve_tokenizer(name: str, init_from: str = "scratch", family: str = "gpt2") -> str:
    """The tokenizer a run uses: "gpt2" or a directory holding tokenizer.json (for "auto", a
    Llama/Qwen3 base's own, found in `init_from` or its model/ folder, else GPT-2's)."""
    if name == "auto":
        found = None if init_from == "scratch" or family == "gpt2" else tokenizer_dir(init_from)
        return "gpt2" if found is None else str(found)
    if name != "gpt2" and tokenizer_dir(name) is None:
        raise ValueError(f"data.tokenizer={name!r} is neither auto, gpt2 nor a directory with a "
                         "tokenizer.json")
    return name


def _tokenizer(name: str) -> Any:
    return get_tokenizer(name) if name == "gpt2" else load_family_tokenizer(str(tokenizer_dir(name)))


def default_pad_id(tokenizer: str) -> int:
    """GPT-2's end-of-text id, or a family tokenizer's pad token (else its end-of-text) id."""
    if tokenizer == "gpt2":
        return EOT_ID
    tok = _tokenizer(tokenizer)
    for name in ("pad_token", "eos_token"):
        text = tok.special.get(name)
        if text is not None and tok.tokenizer.token_to_id(text) is not None:
            return tok.tokenizer.token_to_id(text)
    return tok.stop_ids[0] if tok.stop_ids else 0  # any id works: the mask marks the padding


def encode_texts(texts: list[str], tokenizer: str = "gpt2") -> list[list[int]]:
    """Token ids of each text (special-token strings are encoded as plain text; a family
    tokenizer adds no special tokens of its own)."""
    tok = _tokenizer(tokenizer)
    if tokenizer == "gpt2":
        return tok.encode_ordinary_batch(list(texts), num_threads=2)
    return [e.ids for e in tok.tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def pad_batch(ids: list[list[int]], max_length: int, pad_id: int = EOT_ID,
              split: str = "input") -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) [N, max_length] int32: truncated to max_length (with a warning), right-padded."""
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    long = sum(len(x) > max_length for x in ids)
    if long:
        warnings.warn(f"{long} {split} text(s) longer than max_length={max_length} tokens were "
                      "truncated", stacklevel=2)
    out = np.full((len(ids), max_length), pad_id, np.int32)
    mask = np.zeros((len(ids), max_length), np.int32)
    for i, row in enumerate(ids):
        row = row[:max_length]
        if not row:
            raise ValueError(f"{split} example {i} has no tokens")
        out[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return out, mask


class ClassificationDataset:
    """Padded token ids, masks and labels; `rows` gives fit's batches."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, labels: np.ndarray):
        self.ids, self.mask, self.labels = ids, mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, indices) -> dict[str, np.ndarray]:
        # targets are [n, 1], not [n]: the step's batch shardings are declared for arrays of rank
        # >= 2 (eval) and >= 3 (train), and token_counts of them counts one per example.
        idx = np.asarray(indices)
        return {"inputs": self.ids[idx], "mask": self.mask[idx], "targets": self.labels[idx, None]}


@dataclass
class ClassificationData:
    train: ClassificationDataset
    validation: ClassificationDataset
    test: ClassificationDataset
    classes: list[str]
    max_length: int


def build_datasets(cfg: ClassifierDataConfig, context_length: int) -> ClassificationData:
    """Read, validate, split, label and tokenize; every input error is raised here, before training.
    `cfg.tokenizer` is resolved ("gpt2" or a directory; see resolve_tokenizer)."""
    splits = load_splits(cfg)
    classes = label_list(splits["train"][1], cfg.labels)
    labels = {s: encode_labels(splits[s][1], classes, s) for s in SPLITS}
    tokenizer = resolve_tokenizer(cfg.tokenizer)
    pad_id = default_pad_id(tokenizer) if cfg.pad_id is None else cfg.pad_id
    ids = {s: encode_texts(splits[s][0], tokenizer) for s in SPLITS}
    longest = max(len(x) for x in ids["train"])
    max_length = cfg.max_length or min(longest, context_length)
    if max_length > context_length:
        raise ValueError(f"data.max_length={max_length} exceeds the model's context_length={context_length}")
    sets = {s: ClassificationDataset(*pad_batch(ids[s], max_length, pad_id, s), labels[s])
            for s in SPLITS}
    return ClassificationData(sets["train"], sets["validation"], sets["test"], classes, max_length)
