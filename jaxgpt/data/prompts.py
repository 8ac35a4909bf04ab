"""Prompt formats for instruction tuning (chapter 7): the book's Alpaca template, a Phi-3 style,
and a Llama 3 / Qwen3 model's own chat template (`ChatTemplate`, rendered by its tokenizer).

A record is a mapping with `instruction`, `input` (may be empty) and `output`. A template turns it
into three pieces of text: the prompt (instruction and input), the response header that opens
the answer, and the answer itself. Training sees prompt + header + output; generation is given
prompt + header, so the model's continuation is the response.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


@dataclass(frozen=True)
class Template:
    """How a record becomes text; `marker` is what precedes the response."""

    name: str
    instruction: str  # "{instruction}" is filled in
    input: str  # added only when the record's input is non-empty
    header: str  # opens the response; ends with `marker` and a newline
    marker: str
    turn_starts: tuple[str, ...]  # text that begins a new turn: a response ends before it

    def prompt(self, record: Mapping[str, str]) -> str:
        """The instruction and (non-empty) input, without the response header."""
        text = self.instruction.format(instruction=record["instruction"])
        if record.get("input"):
            text += self.input.format(input=record["input"])
        return text

    def query(self, record: Mapping[str, str]) -> str:
        """What the model is given at inference: prompt and response header."""
        return self.prompt(record) + self.header

    def full(self, record: Mapping[str, str]) -> str:
        """The training text: prompt, response header and the reference output."""
        return self.query(record) + record["output"]


TEMPLATES: dict[str, Template] = {
    "alpaca": Template(
        name="alpaca",
        instruction=ALPACA_PREAMBLE + "\n\n### Instruction:\n{instruction}",
        input="\n\n### Input:\n{input}",
        header="\n\n### Response:\n",
        marker="### Response:",
        turn_starts=("\n\n### Instruction:", "\n\n### Input:", "\n\n### Response:"),
    ),
    # The book's exercise 7.1 format.
    "phi3": Template(
        name="phi3",
        instruction="<|user|>\n{instruction}",
        input="\n{input}",
        header="\n<|assistant|>:\n",
        marker="<|assistant|>:",
        turn_starts=("<|user|>", "<|assistant|>"),
    ),
}


def get_template(name: str) -> Template:
    """The prompt format called `name` (alpaca or phi3)."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; choose from {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def extract_response(text: str, template: Template | str, query: str | None = None) -> str:
    """The response in `text`: after `query` (or the first marker), up to any new turn, stripped.

    Text that holds neither is taken to be the continuation of a query, i.e. the response.
    """
    template = get_template(template) if isinstance(template, str) else template
    if query is not None and text.startswith(query):
        response = text[len(query):]  # the marker could also occur inside the instruction
        if response.lstrip().startswith(template.marker):  # the model repeated the header
            response = response.lstrip()[len(template.marker):]
    else:
        _, found, after = text.partition(template.marker)
        response = after if found else text
    # A model that did not learn to stop may start the next turn itself; that is not its answer.
    cuts = [i for s in template.turn_starts if (i := response.find(s)) >= 0]
    return response[: min(cuts)].strip() if cuts else response.strip()


@dataclass(frozen=True)
class ChatTemplate:
    """A model's own chat template (Llama 3, Qwen3) behind Template's interface, so instruction
    tuning and response extraction take it unchanged: a record is one user turn (the
    instruction, then the input after a blank line) answered by one assistant turn (the output).
    Its texts hold the family's special tokens; tokenize them with the same FamilyTokenizer."""

    tokenizer: Any  # jaxgpt.data.tokenizer.FamilyTokenizer
    name: str = "chat"
    marker: str = ""  # the query ends with the assistant header the template writes
    turn_starts: tuple[str, ...] = ()

    def _user(self, record: Mapping[str, str]) -> list[dict]:
        text = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return [{"role": "user", "content": text}]

    def prompt(self, record: Mapping[str, str]) -> str:
        return self.tokenizer.render_chat(self._user(record), add_generation_prompt=False)

    def query(self, record: Mapping[str, str]) -> str:
        return self.tokenizer.render_chat(self._user(record), add_generation_prompt=True)

    def full(self, record: Mapping[str, str]) -> str:
        turns = self._user(record) + [{"role": "assistant", "content": record["output"]}]
        return self.tokenizer.render_chat(turns, add_generation_prompt=False)
