"""Tokenizer tests: GPT-2 BPE against transformers' implementation; the book's toy tokenizers."""

import shutil

import pytest

from jaxgpt.data import tokenizer as tk
from jaxgpt.data.tokenizer import (
    EOT_ID,
    SimpleTokenizerV1,
    SimpleTokenizerV2,
    UnknownWordError,
    build_vocab,
    get_tokenizer,
)

SAMPLES = [
    "Hello, do you like tea?",
    "Hello, world. Is this-- a test?",
    "In the sunlit terraces of the palace.",
    "Akwirw ier",
    "",
    " ",
    "   leading and trailing spaces   ",
    "tabs\tand\t\ttabs\t",
    "line one\nline two\n\n\nline five\r\nwindows\r\n",
    "trailing newlines\n\n",
    "numbers 0 1 12 123 1234 12345 3.14159 -42 1e10 $1,000,000",
    "contractions: I'm you're he's we've they'll she'd can't DON'T I'M",
    "café naïve résumé Ångström façade",
    "日本語のテキスト 中文文本 한국어",
    "emoji 😀🎉👍🏽 family 👨\u200d👩\u200d👧",
    "Привет мир, Γειά σου κόσμε, مرحبا بالعالم",
    "symbols <>{}[]|\\/@#%^&*~`",
    "mixed   \t \n  whitespace\u00a0nbsp\u3000ideographic",
    "def f(x):\n    return x ** 2  # square\n",
]


@pytest.fixture(scope="module")
def enc():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """transformers' GPT-2 tokenizer, read from the same two files by its own loader."""
    transformers = pytest.importorskip("transformers")
    files = tk.bpe_files()
    folder = tmp_path_factory.mktemp("hf_gpt2_tokenizer")
    # The file names transformers' GPT-2 tokenizer looks for in a local folder.
    shutil.copy(files["encoder.json"], folder / "vocab.json")
    shutil.copy(files["vocab.bpe"], folder / "merges.txt")
    ref = transformers.GPT2TokenizerFast.from_pretrained(str(folder))
    # Guard against a silently empty reference (an ignored argument would give a 1-entry vocab).
    assert len(ref) == 50257
    assert ref("Hello world")["input_ids"] == [15496, 995]
    return ref


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_matches_transformers(enc, reference, text):
    assert enc.encode(text) == reference.encode(text)


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_round_trip(enc, reference, text):
    ids = enc.encode(text)
    assert enc.decode(ids) == text
    assert reference.decode(ids) == text


def test_endoftext_special(enc, reference):
    text = "first document.<|endoftext|> second document<|endoftext|>"
    ids = enc.encode(text, allowed_special="all")
    assert ids == reference.encode(text)
    assert ids.count(EOT_ID) == 2
    assert enc.decode(ids) == text
    assert enc.encode(text, allowed_special={"<|endoftext|>"}) == ids


def test_endoftext_disallowed_by_default(enc):
    # As tiktoken does: special-token text in input is an error unless explicitly allowed...
    with pytest.raises(ValueError, match="endoftext"):
        enc.encode("a <|endoftext|> b")
    # ...or explicitly treated as ordinary text.
    ordinary = enc.encode("a <|endoftext|> b", disallowed_special=())
    assert EOT_ID not in ordinary
    assert enc.decode(ordinary) == "a <|endoftext|> b"


def test_vocab_size_and_eot(enc, reference):
    assert enc.n_vocab == 50257
    assert enc.eot_token == EOT_ID == 50256
    assert enc.encode_single_token("<|endoftext|>") == EOT_ID
    assert reference.convert_tokens_to_ids("<|endoftext|>") == EOT_ID


def test_pattern_is_tiktokens_gpt2_pattern():
    openai_public = pytest.importorskip("tiktoken_ext.openai_public")
    assert tk.GPT2_PAT_STR == openai_public.r50k_pat_str


def test_tokenizer_is_cached(enc):
    assert get_tokenizer("gpt2") is enc


def test_unknown_tokenizer_name():
    with pytest.raises(ValueError, match="supported: gpt2"):
        get_tokenizer("gpt5")


@pytest.mark.parametrize("which", ["vocab.bpe", "encoder.json"])
def test_bpe_hash_mismatch_is_an_error(tmp_path, monkeypatch, which):
    files = tk.bpe_files()
    tampered = {}
    for name, path in files.items():
        tampered[name] = tmp_path / name
        shutil.copy(path, tampered[name])
    with open(tampered[which], "ab") as f:
        f.write(b" ")
    monkeypatch.setattr(tk, "bpe_files", lambda: tampered)
    # __wrapped__ bypasses the lru_cache, which holds the real, verified encoding.
    with pytest.raises(ValueError, match=f"sha256 mismatch for .*{which}.*expected {tk.BPE_SHA256[which]}, got "):
        get_tokenizer.__wrapped__("gpt2")


# --- Chapter 2 tokenizers ---

FIXTURE_TEXT = (
    'I HAD always thought Jack Gisburn rather a cheap genius--though a good fellow enough--so it was '
    'no great surprise to me to hear that, in the height of his glory, he had dropped his painting. '
    '"Do you like it?" she asked; "tea is served at the villa: come!" (He did not.) '
    "It's the last he painted, you know--Mrs. Gisburn said with pardonable pride."
)


@pytest.fixture
def vocab():
    return build_vocab(FIXTURE_TEXT)


def test_build_vocab(vocab):
    words = list(vocab)
    assert words[-2:] == ["<|endoftext|>", "<|unk|>"]
    assert words[:-2] == sorted(words[:-2])
    assert list(vocab.values()) == list(range(len(vocab)))
    assert {"--", ",", ".", '"', "(", ")", "?", ":", ";", "!", "'", "Gisburn", "s"} <= set(vocab)
    assert not any(w != w.strip() or not w for w in vocab)


def test_v1_round_trip_restores_punctuation_spacing(vocab):
    tok = SimpleTokenizerV1(vocab)
    text = "It's the last he painted, you know, Mrs. Gisburn said."
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    # Words are split at the apostrophe, so the decoded text spaces it; punctuation re-attaches.
    assert tok.decode(ids) == "It' s the last he painted, you know, Mrs. Gisburn said."
    # The book's example: only spaces *before* punctuation go, so an opening quote keeps one.
    text = '"It\'s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
    expected = '" It\' s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
    assert tok.decode(tok.encode(text)) == expected


def test_v1_unknown_word_is_an_error(vocab):
    tok = SimpleTokenizerV1(vocab)
    with pytest.raises(UnknownWordError, match="'Hello'"):
        tok.encode("Hello, do you like tea?")
    with pytest.raises(KeyError):  # also catchable as the KeyError the book's version raises
        tok.encode("Hello")


def test_v2_maps_unknown_words_to_unk(vocab):
    tok = SimpleTokenizerV2(vocab)
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of the palace."
    ids = tok.encode(text)
    unk, eot = vocab["<|unk|>"], vocab["<|endoftext|>"]
    assert ids.count(eot) == 1
    # "Hello", "do" (only "Do"), "In", "sunlit", "terraces", "palace" are not in the fixture text.
    assert ids.count(unk) == 6
    assert tok.decode(ids) == "<|unk|>, <|unk|> you like tea? <|endoftext|> <|unk|> the <|unk|> <|unk|> of the <|unk|>."


def test_v2_needs_special_tokens():
    with pytest.raises(ValueError, match="<\\|unk\\|>"):
        SimpleTokenizerV2(build_vocab("a b c", special_tokens=("<|endoftext|>",)))
