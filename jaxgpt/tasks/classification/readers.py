"""Reading labelled text (chapter 6) into (texts, labels) rows, one check per record.

A source is the SMS Spam Collection ("sms-spam"), a CSV/TSV/JSON/JSONL file with named text and
label columns, a file of headerless `label<TAB>text` lines (SMSSpamCollection's format), or a
Hugging Face data set ("hf:<path>[:<config>]"). A record with a missing, null or empty field, or
a line with extra fields, is one error naming the file and the line or record.

SMSSpamCollection is read line by line, each line split at its first tab. Its texts hold stray
double quotes, so a CSV reader with default quoting (pandas `read_csv(sep="\\t")`, `csv.reader`)
treats them as field quotes and merges lines around row 5081 (5,572 rows); line by line gives the
file's 5,574 rows, 747 spam and 4,827 ham. For the same reason every .tsv file is read without
quoting: a tab-separated field cannot hold a tab or a newline, so quotes there are just text.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

Rows = tuple[list[str], list[str]]  # (texts, labels)


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
        from jaxgpt.data.corpus import dataset_path

        source = str(dataset_path("sms-spam"))
    # Every reader refuses an empty text or label, naming its line or record.
    return (read_hf(source, text_column, label_column) if source.startswith("hf:")
            else {"train": read_table(source, text_column, label_column)})
