"""Instruction data (chapter 7): records from JSON, JSONL or Hugging Face, splits, and collation.

Collation is the book's `custom_collate_fn`, vectorised: each example gets one end-of-text token,
the batch is padded with end-of-text, targets are the inputs shifted by one, every padding target
but the first (the end-of-text the model must learn to emit) becomes IGNORE, and rows are cut to
an allowed maximum length. Optionally the prompt's targets are ignored too, so only the response
(and its end-of-text) is learned. The book finds padding by token value; here it is found by
position, which is the same unless an example itself contains the end-of-text id.

The training loop compiles its step once per batch shape, so `InstructDataset` pads every batch
to one fixed length (the longest example of the split, capped), or to a multiple of a bucket size.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from jaxgpt.data.windows import IGNORE
from jaxgpt.data.prompts import Template, get_template
from jaxgpt.data.tokenizer import EOT_ID, get_tokenizer

FIELDS = ("instruction", "input", "output")
_SHOWN = 5  # record indices named in an error


class Splits(NamedTuple):
    train: list[dict]
    test: list[dict]
    val: list[dict]


def _read_file(path: Path) -> list:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # installed with datasets

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path} line {n} is not JSON: {err.msg}") from None
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON ({err.msg} at line {err.lineno}); "
                         "use a .jsonl suffix for one record per line") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path} holds a JSON {type(rows).__name__}, not a list of records")
    return rows


def _rows(source: Any, hf_split: str) -> Iterable:
    """The raw rows of a source: a file, a named data set, "hf:<path>[:<config>]", or rows."""
    if not isinstance(source, (str, Path)):
        return source  # already rows: a list of mappings or a `datasets.Dataset`
    if str(source).startswith("hf:"):
        import datasets  # slow to import; only this source needs it

        path, _, config = str(source)[3:].partition(":")
        return datasets.load_dataset(path, config or None, split=hf_split)
    path = Path(source)
    if not path.is_file():
        from jaxgpt.data.corpus import DATASETS, dataset_path

        if str(source) not in DATASETS:
            raise FileNotFoundError(f"instruction data {str(source)!r} is neither a file nor a "
                                    f"named data set ({', '.join(sorted(DATASETS))})")
        path = dataset_path(str(source))
    return _read_file(path)


def load_records(source: Any, columns: Mapping[str, str | None] | None = None, *,
                 hf_split: str = "train", fields: Sequence[str] = FIELDS, skip_bad: bool = False,
                 kind: str = "instruction data",
                 check: Callable[[dict], str | None] | None = None) -> list[dict]:
    """Records {instruction, input, output} (or other `fields`) from `source`, each field read
    from its column.

    `columns` maps a field to the source's column name (default: the field's own name); an
    input column of None means every input is empty. A record that lacks a field, or holds a
    non-string there, is an error naming its index (`kind` names the data), or with `skip_bad`
    is left out with a warning that counts them; so is one for which `check(record)` returns a
    problem (a short text in place of the field).
    """
    unknown = sorted(set(columns or {}) - set(fields))
    if unknown:
        raise ValueError(f"column mapping names unknown field(s) {', '.join(unknown)}; "
                         f"fields are {', '.join(fields)}")
    columns = {**{f: f for f in fields}, **(columns or {})}
    for field in (f for f in fields if f != "input"):
        if not columns[field]:
            raise ValueError(f"column mapping needs a column for {field!r}; only input may be None")
    records, bad = [], []
    for i, row in enumerate(_rows(source, hf_split)):
        if not isinstance(row, Mapping):
            bad.append(f"{i} (not an object)")
            continue
        record = {}
        for field, column in columns.items():
            value = "" if column is None else row.get(column)
            if not isinstance(value, str):
                bad.append(f"{i} ({column})")
                break
            record[field] = value
        else:
            problem = None if check is None else check(record)
            if problem:
                bad.append(f"{i} ({problem})")
            else:
                records.append(record)
    if bad:
        report_bad(bad, f"{kind} {_name(source)}: records refused", skip_bad)
    if not records:
        raise ValueError(f"{kind} {_name(source)} holds no records")
    return records


def report_bad(bad: Sequence[str], what: str, skip: bool) -> None:
    """Raise (or with `skip`, warn) naming the first bad records, 'index (field)' each: the
    field missing or not a string, or a check's problem."""
    more = f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
    text = (f"{what}, by index (the field missing or not a string, or the problem): "
            f"{', '.join(bad[:_SHOWN])}{more}")
    if not skip:
        raise ValueError(text)
    warnings.warn(f"skipped {len(bad)} record(s): {text}", stacklevel=3)


def _name(source: Any) -> str:
    return repr(str(source)) if isinstance(source, (str, Path)) else type(source).__name__


def split_records(records: Sequence, train_frac: float = 0.85, test_frac: float = 0.10, *,
                  shuffle: bool = False, seed: int = 123) -> Splits:
    """The book's split: first train_frac for training, next test_frac for testing, rest for
    validation, in file order (1,100 records: 935, 110, 55); or after a seeded shuffle."""
    if not (0 < train_frac and 0 <= test_frac and train_frac + test_frac <= 1):
        raise ValueError(f"split fractions train={train_frac}, test={test_frac} must be positive "
                         "and sum to at most 1")
    records = list(records)
    if shuffle:
        records = [records[i] for i in np.random.default_rng(seed).permutation(len(records))]
    n_train, n_test = int(len(records) * train_frac), int(len(records) * test_frac)
    return Splits(records[:n_train], records[n_train:n_train + n_test], records[n_train + n_test:])


def collate(batch: Sequence[Sequence[int]], prompt_lengths: Sequence[int] | None = None, *,
            pad_id: int = EOT_ID, allowed_max_length: int | None = 1024,
            length: int | None = None, mask_prompt: bool = False) -> dict[str, np.ndarray]:
    """{"inputs", "targets"} int32 [B, T] from token lists (the book's custom_collate_fn).

    T is `length` (default: the longest example), cut to `allowed_max_length`. With
    `mask_prompt`, targets inside each example's first `prompt_lengths[b]` tokens are IGNORE.
    """
    if len(batch) == 0:
        raise ValueError("cannot collate an empty batch")
    lengths = np.array([len(x) for x in batch])  # [B]
    if lengths.min() == 0:
        raise ValueError(f"example {int(np.argmin(lengths))} of the batch has no tokens")
    T = int(lengths.max()) if length is None else length
    if allowed_max_length is not None:
        T = min(T, allowed_max_length)
    width = max(T, int(lengths.max())) + 1  # room for every example and its end-of-text
    cols = np.arange(width)  # [W]
    padded = np.full((len(batch), width), pad_id, np.int32)  # [B, W]
    padded[cols < lengths[:, None]] = np.concatenate([np.asarray(x, np.int32) for x in batch])
    inputs, targets = padded[:, :T], padded[:, 1:T + 1].copy()  # [B, T] each
    # Target j predicts token j + 1; j = length - 1 is the appended end-of-text and stays.
    ignored = cols[None, :T] >= lengths[:, None]
    if mask_prompt:
        if prompt_lengths is None:
            raise ValueError("mask_prompt needs the prompt length of every example")
        # Target j = prompt_length - 1 is the first response token: the first one learned.
        ignored |= cols[None, :T] < np.asarray(prompt_lengths)[:, None] - 1
    targets[ignored] = IGNORE
    return {"inputs": inputs, "targets": targets}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class InstructDataset:
    """Tokenized records whose `rows(indices)` are collated batches of one fixed shape."""

    def __init__(self, records: Sequence[Mapping[str, str]], template: Template | str = "alpaca",
                 *, tokenizer=None, allowed_max_length: int = 1024, mask_prompt: bool = False,
                 bucket: int | None = None, pad_id: int = EOT_ID):
        self.pad_id = pad_id  # also the end-of-text target after each example (a family's stop id)
        self.template = get_template(template) if isinstance(template, str) else template
        tok = get_tokenizer("gpt2") if tokenizer is None else tokenizer
        self.records = list(records)
        self.tokens, self.prompt_lengths = [], []
        for r in self.records:
            # User text is data: a literal "<|endoftext|>" in it is not the special token.
            full = tok.encode(self.template.full(r), disallowed_special=())
            query = tok.encode(self.template.query(r), disallowed_special=())
            self.tokens.append(full)
            # Tokenized as one text (as the book does), the prompt is the shared prefix; a BPE
            # merge across the boundary only leaves one more prompt token learned.
            self.prompt_lengths.append(common_prefix(query, full))
        if bucket is not None and bucket <= 0:
            raise ValueError(f"bucket must be a positive number of tokens, got {bucket}")
        self.allowed_max_length, self.mask_prompt, self.bucket = allowed_max_length, mask_prompt, bucket
        longest = max((len(t) for t in self.tokens), default=0)
        self.length = min(longest, allowed_max_length)  # the fixed T when not bucketing

    def __len__(self) -> int:
        return len(self.records)

    def rows(self, indices) -> dict[str, np.ndarray]:
        idx = np.asarray(indices).reshape(-1)
        batch = [self.tokens[i] for i in idx]
        length = self.length
        if self.bucket is not None:  # a few shapes, each a multiple of the bucket
            longest = max(len(t) for t in batch)
            length = min(-(-longest // self.bucket) * self.bucket, self.allowed_max_length)
        return collate(batch, [self.prompt_lengths[i] for i in idx], length=length, pad_id=self.pad_id,
                       allowed_max_length=self.allowed_max_length, mask_prompt=self.mask_prompt)
