"""Preference pairs (the book's chapter 7 bonus, DPO): records, checks, and batches of pairs.

A record holds `instruction`, `input` (may be empty), `chosen` and `rejected`, read from the
same sources as instruction data (JSON, JSONL, Parquet, a named data set, "hf:<path>") with
configurable columns. Each side is rendered like an instruction-tuning example whose output is
that response (the Alpaca prompt of chapter 7 with the response appended, or a model's own chat
template), tokenized, and given the family's end-of-text as its last learned token. Only the
response's targets count: the prompt's and the padding's are IGNORE, so they change nothing.

A side longer than the allowed length loses the start of its prompt (at least the prompt's
last token is kept; the count is reported), or is refused by a setting; a response longer than
the length by itself is then cut at the end. Rows are [n, 2, T] arrays, chosen at [:, 0] and
rejected at [:, 1], one fixed T for a data set, so the step compiles once.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from jaxgpt.data.prompts import Template, get_template
from jaxgpt.data.tokenizer import EOT_ID, get_tokenizer
from jaxgpt.tasks.instruct.data import collate, common_prefix, load_records, report_bad

FIELDS = ("instruction", "input", "chosen", "rejected")
SIDES = ("chosen", "rejected")


def _problem(record: Mapping[str, str]) -> str | None:
    for side in SIDES:
        if not record[side].strip():
            return f"{side} is empty"
    if record["chosen"] == record["rejected"]:
        return "chosen == rejected"
    return None


def load_pairs(source: Any, columns: Mapping[str, str | None] | None = None, *,
               hf_split: str = "train", skip_bad: bool = False) -> list[dict]:
    """Records {instruction, input, chosen, rejected}; a record without chosen or rejected, with
    an empty one, or with both equal is an error naming its index and field. With `skip_bad`
    a warning counts them instead: records without a field are left out here, the others when
    a `PreferenceDataset` is made, after the split (so the split keeps the file's positions:
    the book's 1,100 records hold 6 whose chosen equals rejected)."""
    records = load_records(source, columns, hf_split=hf_split, fields=FIELDS, skip_bad=skip_bad,
                           kind="preference data", check=None if skip_bad else _problem)
    if skip_bad:
        bad = [f"{i} ({p})" for i, r in enumerate(records) if (p := _problem(r))]
        if bad:
            report_bad(bad, "preference data: pairs to be left out", skip=True)
    return records


class PreferenceDataset:
    """Tokenized pairs whose `rows(indices)` are {"inputs", "targets"} [n, 2, T], "pairs" [n, 1]
    (1 per pair: what the loss is a mean over) and, once `reference` [N, 2] is set (stored
    reference log-probabilities), "ref_logps" [n, 2]. Pairs with an empty response or equal
    responses are left out (`skipped` counts them)."""

    def __init__(self, records: Sequence[Mapping[str, str]], template: Template | str = "alpaca",
                 *, tokenizer=None, max_length: int = 1024, truncate: bool = True,
                 pad_id: int = EOT_ID):
        self.template = get_template(template) if isinstance(template, str) else template
        tok = get_tokenizer("gpt2") if tokenizer is None else tokenizer
        self.records = [r for r in records if _problem(r) is None]
        self.skipped = len(records) - len(self.records)
        self.max_length, self.pad_id = max_length, pad_id
        self.tokens: list[list[int]] = []  # 2 per record: chosen, rejected
        self.prompt_lengths: list[int] = []
        self.truncated_prompts = self.truncated_responses = 0
        for i, r in enumerate(self.records):
            query = tok.encode(self.template.query(r), disallowed_special=())
            cut = False
            for side in SIDES:
                full = tok.encode(self.template.full({**r, "output": r[side]}), disallowed_special=())
                prompt = common_prefix(query, full)
                excess = len(full) - max_length
                if excess > 0:
                    if not truncate:
                        raise ValueError(
                            f"preference record {i}: its prompt and {side} response take "
                            f"{len(full)} tokens, more than the allowed {max_length}; allow "
                            "cutting prompts from the left (preference.truncate_prompts=true)")
                    drop = min(excess, prompt - 1)  # the prompt's last token stays
                    full, prompt, cut = full[drop:], prompt - drop, cut or drop > 0
                    self.truncated_responses += len(full) > max_length  # cut at the end by rows()
                self.tokens.append(full)
                self.prompt_lengths.append(prompt)
            self.truncated_prompts += cut
        longest = max((len(t) for t in self.tokens), default=0)
        self.length = min(longest, max_length)  # the fixed T
        self.reference: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.records)

    def rows(self, indices) -> dict[str, np.ndarray]:
        idx = np.asarray(indices).reshape(-1)  # [n]
        sides = np.stack([2 * idx, 2 * idx + 1], axis=1).reshape(-1)  # [2n]: chosen, rejected
        batch = collate([self.tokens[j] for j in sides], [self.prompt_lengths[j] for j in sides],
                        pad_id=self.pad_id, allowed_max_length=self.max_length, length=self.length,
                        mask_prompt=True)  # [2n, T] each
        out = {k: v.reshape(len(idx), 2, -1) for k, v in batch.items()}  # [n, 2, T]
        out["pairs"] = np.ones((len(idx), 1), np.int32)  # [n, 1]: a step batch is rank 3 at least
        if self.reference is not None:
            out["ref_logps"] = self.reference[idx]  # [n, 2]
        return out
