"""Data for jaxgpt's shipped harness tasks, read from local files (no download).

The harness calls these as its `custom_dataset` with the task's metadata as keywords: a file
given by `--metadata '{"hellaswag_file": PATH}'` (or `instruction_file`), else by an environment
variable, else the default path named in the error.
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets

from jaxgpt.data.prompts import get_template
from jaxgpt.tasks.hellaswag import read_examples
from jaxgpt.tasks.instruct.data import load_records, split_records

HELLASWAG_DEFAULT = "data/hellaswag_val.jsonl"


def _file(given, env: str, default: str | None, what: str, hint: str) -> str:
    path = given or os.environ.get(env) or default
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path} does not exist: give it with --metadata "
                                f"'{{\"{hint}\": PATH}}' or ${env}")
    return str(path)


def load_hellaswag(hellaswag_file=None, hellaswag_limit=None, **unused) -> datasets.DatasetDict:
    """HellaSwag's validation JSONL as jaxgpt.tasks.hellaswag reads it (ctx, or ctx_a + " " +
    ctx_b; the endings as they are)."""
    path = _file(hellaswag_file, "JAXGPT_HELLASWAG_FILE", HELLASWAG_DEFAULT, "HellaSwag file",
                 "hellaswag_file")
    rows = [{"context": ex.context, "endings": list(ex.endings), "label": ex.label}
            for ex in read_examples(path, hellaswag_limit)]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


def load_instruct_test(instruction_file=None, **unused) -> datasets.DatasetDict:
    """The book's instruction data (chapter 7), its test split (records 935-1044 of 1,100), each
    with the Alpaca prompt the instruction runs are trained on."""
    if instruction_file is None and os.environ.get("JAXGPT_INSTRUCTION_FILE") is None:
        from jaxgpt.data.corpus import dataset_path

        instruction_file = str(dataset_path("instruction-data"))  # $JAXGPT_DATA_DIR or the cache
    path = _file(instruction_file, "JAXGPT_INSTRUCTION_FILE", None, "instruction data file",
                 "instruction_file")
    alpaca = get_template("alpaca")
    test = split_records(load_records(path)).test
    rows = [{"query": alpaca.query(r), "output": r["output"]} for r in test]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
