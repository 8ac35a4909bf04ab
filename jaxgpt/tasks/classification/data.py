"""Labelled text for classification (chapter 6): sources, the book's balanced split, token arrays.

A source is the SMS Spam Collection ("sms-spam"), a CSV/TSV/JSON/JSONL file with named text and
label columns, a file of headerless `label<TAB>text` lines (SMSSpamCollection's format), or a
Hugging Face data set ("hf:<path>[:<config>]"). Labels are compared as strings
and mapped to ids by their position in a label list, which is saved beside the model.

SMSSpamCollection is read line by line, each line split at its first tab. Its texts hold stray
double quotes, so a CSV reader with default quoting (pandas `read_csv(sep="\\t")`, `csv.reader`)
treats them as field quotes and merges lines around row 5081 (5,572 rows); line by line gives the
file's 5,574 rows, 747 spam and 4,827 ham. For the same reason every .tsv file is read without
quoting: a tab-separated field cannot hold a tab or a newline, so quotes there are just text.

Token arrays are padded on the right with `pad_id`, and a 0/1 mask marks the real tokens: the pad
id (50256, GPT-2's end-of-text) may also occur inside a text, so padding is never found by id.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from jaxgpt.checks import (
    FRACTION,
    NON_EMPTY,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    check_fields,
    optional,
)
from jaxgpt.tokenizer import EOT_ID, get_tokenizer

Rows = tuple[list[str], list[str]]  # (texts, labels)
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
    tokenizer: str = "gpt2"
    pad_id: int = EOT_ID
    seed: int = 123

    def __post_init__(self):
        check_fields(self, {"source": NON_EMPTY, "train_fraction": FRACTION,
                            "validation_fraction": FRACTION, "max_length": optional(POSITIVE_INT),
                            "pad_id": NON_NEGATIVE_INT, "seed": NON_NEGATIVE_INT})
        if self.train_fraction + self.validation_fraction >= 1:
            raise ValueError(f"ClassifierDataConfig.validation_fraction={self.validation_fraction} "
                             f"plus train_fraction={self.train_fraction} must be below 1 (the test "
                             "split takes the rest)")
        if self.labels is not None and (len(set(map(str, self.labels))) != len(self.labels)
                                        or len(self.labels) < 2):
            raise ValueError("ClassifierDataConfig.labels must name at least two distinct classes, "
                             f"got {list(self.labels)}")


# ---- reading -------------------------------------------------------------------------------


def read_sms_spam(path: str | Path) -> Rows:
    """(texts, labels) of SMSSpamCollection, one example per line (see the module docstring)."""
    texts, labels = [], []
    # split("\n"), not splitlines(): the latter also breaks at form feeds and other separators.
    for n, line in enumerate(_read_text(path).split("\n"), 1):
        line = line.rstrip("\r")
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != 2:  # a tab-separated field cannot hold a tab: a third field is a mistake
            what = "no tab between label and text" if len(fields) == 1 else \
                f"{len(fields)} tab-separated fields; expected label<TAB>text"
            raise ValueError(f"{path} line {n} has {what}")
        text, label = _example({"label": fields[0], "text": fields[1]}, "text", "label",
                               f"{path} line {n}")
        labels.append(label)
        texts.append(text)
    return texts, labels


def _read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def _example(record, text_column: str, label_column: str, where: str) -> tuple[str, str]:
    """(text, label) of one record; a missing, null, empty or nested value names `where`."""
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a {type(record).__name__}, not an object with "
                         f"{text_column!r} and {label_column!r}")
    out = []
    for column, what in ((text_column, "text"), (label_column, "label")):
        if column not in record:
            raise ValueError(f"{where} has no {column!r} field")
        value = record[column]
        if isinstance(value, (list, dict)):
            raise ValueError(f"{where} has a {type(value).__name__} as its {what} ({column!r})")
        if value is None or not str(value).strip():
            kind = "a null" if value is None else "an empty"
            raise ValueError(f"{where} has {kind} {what} ({column!r})")
        out.append(str(value))
    return out[0], out[1]


def _columns(records: list, text_column: str, label_column: str, where: str,
             places: list[str] | None = None) -> Rows:
    """(texts, labels) of records; `places` names each record in errors ("FILE line 5")."""
    if not records:
        raise ValueError(f"{where} holds no examples")
    if isinstance(records[0], dict):
        for column in (text_column, label_column):
            if column not in records[0]:
                raise ValueError(f"column {column!r} not in {where}; available: "
                                 f"{', '.join(map(str, records[0]))}")
    places = places or [f"{where} record {i + 1} of {len(records)}" for i in range(len(records))]
    pairs = [_example(r, text_column, label_column, at) for r, at in zip(records, places)]
    return [t for t, _ in pairs], [lab for _, lab in pairs]


def _read_delimited(path: Path, delimiter: str, quoting: int) -> tuple[list[dict], list[str]]:
    """Records of a CSV/TSV file with a header, and the line each starts on; a row with more or
    fewer fields than the header is an error naming its line."""
    records, places = [], []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        try:
            header = next(reader, None)
            line = reader.line_num + 1
            for row in reader:
                start, line = line, reader.line_num + 1  # a quoted field may span lines
                if not row:
                    continue
                if len(row) != len(header):
                    more = "extra" if len(row) > len(header) else "missing"
                    raise ValueError(f"{path} line {start} has {len(row)} field(s) where the "
                                     f"header has {len(header)} ({more} fields)")
                records.append(dict(zip(header, row)))
                places.append(f"{path} line {start}")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
        except csv.Error as e:
            raise ValueError(f"{path} line {reader.line_num}: {e}") from None
    return records, places


def read_table(path: str | Path, text_column: str = "text", label_column: str = "label") -> Rows:
    """(texts, labels) from a .csv, .tsv, .json (list of objects) or .jsonl file; any other file
    is read as headerless `label<TAB>text` lines, the format of SMSSpamCollection. A record with
    a missing, null or empty field, or a row with extra fields, is an error naming its line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file {path}")
    suffix, places = path.suffix.lower(), None
    if suffix in (".csv", ".tsv"):
        quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
        records, places = _read_delimited(path, "\t" if suffix == ".tsv" else ",", quoting)
    elif suffix == ".json":
        try:
            records = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {e.lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path} must hold a JSON list of objects")
    elif suffix == ".jsonl":
        records, places = [], []
        for n, line in enumerate(_read_text(path).split("\n"), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n} is not valid JSON ({e.msg})") from None
            places.append(f"{path} line {n}")
    else:  # SMSSpamCollection's own format: headerless label<TAB>text lines
        texts, labels = read_sms_spam(path)
        if not texts:
            raise ValueError(f"{path} holds no examples")
        return texts, labels
    return _columns(records, text_column, label_column, str(path), places)


def read_hf(source: str, text_column: str = "text", label_column: str = "label") -> dict[str, Rows]:
    """{split: (texts, labels)} of a Hugging Face data set "hf:<path>[:<config>]"."""
    import datasets  # slow to import; only this source needs it

    path, _, name = source[3:].partition(":")
    splits = datasets.load_dataset(path, name or None)
    out = {}
    for split, ds in splits.items():
        key = {"valid": "validation", "dev": "validation"}.get(split, split)
        feature = ds.features.get(label_column)
        records = ds.to_list()
        where = f"{source} split {split!r}"
        texts, labels = _columns(records, text_column, label_column, where)
        if isinstance(feature, datasets.ClassLabel):  # integer ids -> their names
            labels = [feature.int2str(int(v)) for v in labels]
        out[key] = (texts, labels)
    if "train" not in out:
        raise ValueError(f"{source} has no 'train' split; splits: {', '.join(out)}")
    return out


def read_source(source: str, text_column: str = "text", label_column: str = "label") -> dict[str, Rows]:
    """{split: rows}: {"train": all rows} for a single file, every split of a HF data set."""
    if source == "sms-spam":
        from jaxgpt.corpus import dataset_path

        source = str(dataset_path("sms-spam"))
    # Every reader refuses an empty text or label, naming its line or record.
    return (read_hf(source, text_column, label_column) if source.startswith("hf:")
            else {"train": read_table(source, text_column, label_column)})


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


def encode_texts(texts: list[str], tokenizer: str = "gpt2") -> list[list[int]]:
    """Token ids of each text (special-token strings are encoded as plain text)."""
    return get_tokenizer(tokenizer).encode_ordinary_batch(list(texts), num_threads=2)


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
    """Read, validate, split, label and tokenize; every input error is raised here, before training."""
    splits = load_splits(cfg)
    classes = label_list(splits["train"][1], cfg.labels)
    labels = {s: encode_labels(splits[s][1], classes, s) for s in SPLITS}
    ids = {s: encode_texts(splits[s][0], cfg.tokenizer) for s in SPLITS}
    longest = max(len(x) for x in ids["train"])
    max_length = cfg.max_length or min(longest, context_length)
    if max_length > context_length:
        raise ValueError(f"data.max_length={max_length} exceeds the model's context_length={context_length}")
    sets = {s: ClassificationDataset(*pad_batch(ids[s], max_length, cfg.pad_id, s), labels[s])
            for s in SPLITS}
    return ClassificationData(sets["train"], sets["validation"], sets["test"], classes, max_length)
