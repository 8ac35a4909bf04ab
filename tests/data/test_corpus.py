"""Text sources, named data sets (found, cached, downloaded, verified) and the token cache."""

import dataclasses
import hashlib
import io
import os
import re
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest

from jaxgpt.data import corpus
from jaxgpt.data.corpus import (
    DATASETS,
    DOC_SEPARATOR,
    dataset_path,
    load_hf_text,
    load_text,
    tokenize_cached,
)
from jaxgpt.data.tokenizer import EOT_ID, get_tokenizer

# Captured before the autouse fixture hides it: the real data, for the opt-in test below.
REAL_DATA_DIR = os.environ.get("JAXGPT_DATA_DIR")
if REAL_DATA_DIR and not os.path.isdir(REAL_DATA_DIR):  # set, but not there: as unset (skip)
    REAL_DATA_DIR = None


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch):
    """Every test gets its own cache and no data dir, so none reads or writes the user's."""
    monkeypatch.setenv("JAXGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("JAXGPT_DATA_DIR", raising=False)


def no_network(*args, **kwargs):
    raise urllib.error.URLError("network is unreachable")


# --- load_text ---


@pytest.fixture
def text_dir(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "b.txt").write_text("second file\n", encoding="utf-8")
    (folder / "a.txt").write_text("first file, café ☕\n", encoding="utf-8")
    (folder / "notes.md").write_text("not text\n", encoding="utf-8")
    return folder


def test_load_file(text_dir):
    assert load_text(text_dir / "a.txt") == "first file, café ☕\n"
    assert load_text(str(text_dir / "b.txt")) == "second file\n"


def test_load_directory_glob_and_list(text_dir):
    joined = "first file, café ☕\n" + DOC_SEPARATOR + "second file\n"
    assert load_text(text_dir) == joined
    assert load_text(str(text_dir / "*.txt")) == joined
    assert load_text([text_dir / "a.txt", str(text_dir / "b.txt")]) == joined
    assert load_text([text_dir / "b.txt", text_dir / "a.txt"]) == "second file\n" + DOC_SEPARATOR + "first file, café ☕\n"


def test_separator_is_one_eot_token(text_dir):
    ids = tokenize_cached(load_text(text_dir))
    assert list(ids).count(EOT_ID) == 1


def test_missing_sources_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file, directory or glob match for .*nothing-here.*the-verdict"):
        load_text(str(tmp_path / "nothing-here"))
    with pytest.raises(ValueError, match="no text files found"):
        load_text(str(tmp_path / "*.none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files found"):
        load_text(tmp_path / "empty")


def test_default_corpus_is_pythons_documentation():
    from pydoc_data.topics import topics

    text = load_text("default")
    assert text.count(DOC_SEPARATOR) == len(topics) - 1
    first, last = min(topics), max(topics)
    assert text.startswith(topics[first]) and text.endswith(topics[last])
    assert len(text) > 100_000


# --- Hugging Face datasets, local files only ---


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    """datasets with its caches in tmp_path and the hub switched off."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    # datasets reads those variables once, at import; set its config for an earlier import too.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    return str(tmp_path / "hf" / "datasets")


def test_hf_text_builder(tmp_path, hf_offline):
    lines = ["line one", "line two", "", "naïve 中文 line"]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    text = load_hf_text("text", data_files=str(path), cache_dir=hf_offline)
    assert text == "\n".join(lines)


def test_hf_json_builder_and_columns(tmp_path, hf_offline):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "doc one", "n": 1}\n{"body": "doc two", "n": 2}\n', encoding="utf-8")
    text = load_hf_text("json", data_files=str(path), text_column="body", separator=DOC_SEPARATOR, cache_dir=hf_offline)
    assert text == "doc one" + DOC_SEPARATOR + "doc two"
    with pytest.raises(ValueError, match="column 'text' not in dataset 'json'; available: body, n"):
        load_hf_text("json", data_files=str(path), cache_dir=hf_offline)


def test_hf_prefix_routes_to_load_hf_text(monkeypatch):
    calls = []
    monkeypatch.setattr(corpus, "load_hf_text", lambda path, name=None: calls.append((path, name)) or "x")
    assert load_text("hf:wikitext:wikitext-2-raw-v1") == "x"
    assert load_text("hf:some/repo") == "x"
    assert calls == [("wikitext", "wikitext-2-raw-v1"), ("some/repo", None)]


# --- Named data sets ---

FAKE = b"a small stand-in for the verdict\n"


@pytest.fixture
def fake_verdict(monkeypatch):
    """Registers the-verdict with FAKE's sha256, so tests never need the real file."""
    spec = dataclasses.replace(corpus.DATASETS["the-verdict"], sha256=hashlib.sha256(FAKE).hexdigest())
    monkeypatch.setitem(corpus.DATASETS, "the-verdict", spec)
    return spec


def test_found_in_data_dir_first(tmp_path, monkeypatch, fake_verdict):
    monkeypatch.setattr(corpus.urllib.request, "urlopen", no_network)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "the-verdict.txt").write_bytes(FAKE)
    monkeypatch.setenv("JAXGPT_DATA_DIR", str(data_dir))
    assert dataset_path("the-verdict") == data_dir / "the-verdict.txt"
    assert load_text("the-verdict") == FAKE.decode()


def test_found_in_cache_dir(tmp_path, monkeypatch, fake_verdict):
    monkeypatch.setattr(corpus.urllib.request, "urlopen", no_network)
    monkeypatch.setenv("JAXGPT_DATA_DIR", str(tmp_path / "empty-data-dir"))  # set but lacking the file
    cached = tmp_path / "cache" / "the-verdict.txt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(FAKE)
    assert dataset_path("the-verdict") == cached


def test_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXGPT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert corpus.default_cache_dir() == tmp_path / "xdg" / "jaxgpt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert corpus.default_cache_dir() == Path.home() / ".cache" / "jaxgpt"


def test_found_file_with_wrong_hash_is_an_error(tmp_path, monkeypatch, fake_verdict):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "the-verdict.txt").write_bytes(FAKE + b"tampered")
    monkeypatch.setenv("JAXGPT_DATA_DIR", str(data_dir))
    with pytest.raises(ValueError, match=f"sha256 mismatch for .*the-verdict.txt: expected {fake_verdict.sha256}"):
        dataset_path("the-verdict")


class FakeResponse(io.BytesIO):
    """What urlopen returns, as far as dataset_path uses it."""


def test_download_verifies_and_caches_atomically(tmp_path, monkeypatch, fake_verdict):
    urls = []
    monkeypatch.setattr(corpus.urllib.request, "urlopen", lambda url, timeout: urls.append(url) or FakeResponse(FAKE))
    path = dataset_path("the-verdict")
    assert path == tmp_path / "cache" / "the-verdict.txt"
    assert path.read_bytes() == FAKE
    assert urls == [fake_verdict.url]
    assert sorted(p.name for p in path.parent.iterdir()) == ["the-verdict.txt"]  # no temp files left
    monkeypatch.setattr(corpus.urllib.request, "urlopen", no_network)
    assert dataset_path("the-verdict") == path  # second call: from the cache


def test_download_from_zip_member(tmp_path, monkeypatch):
    content = b"ham\tHello there\nspam\tWIN NOW\n"
    spec = dataclasses.replace(corpus.DATASETS["sms-spam"], sha256=hashlib.sha256(content).hexdigest())
    monkeypatch.setitem(corpus.DATASETS, "sms-spam", spec)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("readme", "about the data")
        z.writestr("SMSSpamCollection", content)
    monkeypatch.setattr(corpus.urllib.request, "urlopen", lambda url, timeout: FakeResponse(archive.getvalue()))
    assert dataset_path("sms-spam").read_bytes() == content


def test_downloaded_file_with_wrong_hash_is_not_kept(tmp_path, monkeypatch, fake_verdict):
    monkeypatch.setattr(corpus.urllib.request, "urlopen", lambda url, timeout: FakeResponse(b"an error page"))
    with pytest.raises(ValueError, match="sha256 mismatch for the-verdict downloaded from"):
        dataset_path("the-verdict")
    assert not (tmp_path / "cache" / "the-verdict.txt").exists()


def test_offline_message_says_how_to_supply_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus.urllib.request, "urlopen", no_network)
    with pytest.raises(RuntimeError) as info:
        dataset_path("instruction-data")
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "cache" / "instruction-data.json") in message
    assert "JAXGPT_DATA_DIR" in message and "network is unreachable" in message


def test_unknown_dataset_name():
    known = ", ".join(sorted(DATASETS))
    with pytest.raises(ValueError, match=re.escape(f"unknown data set 'verdict'; known: {known}")):
        dataset_path("verdict")
    assert {"instruction-data", "instruction-data-with-preference", "sms-spam", "the-verdict"} <= set(DATASETS)


@pytest.mark.skipif(REAL_DATA_DIR is None, reason="set JAXGPT_DATA_DIR to the real data sets (e.g. /work/shared/data)")
def test_real_data_sets(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXGPT_DATA_DIR", REAL_DATA_DIR)
    monkeypatch.setattr(corpus.urllib.request, "urlopen", no_network)
    for name, spec in corpus.DATASETS.items():
        assert dataset_path(name) == Path(REAL_DATA_DIR) / spec.filename
    text = load_text("the-verdict")
    assert len(text.encode("utf-8")) == 20_479
    assert len(tokenize_cached(text, cache_dir=tmp_path)) == 5_145
    assert len(dataset_path("sms-spam").read_bytes().splitlines()) == 5_574


# --- Token cache ---

TRICKY = (
    "Plain line.\nNext line\n\nparagraph after blank\n  \nindented\n    code\r\nwindows line\r\n"
    "trailing spaces   \nX\n\tTabbed\n中文\nEnd<|endoftext|>\nnew doc 123\n 456\n'quote\n"
    "!bang\n<|endoftext|><|endoftext|>last\n\n"
)


@pytest.mark.parametrize("chunk_chars", [1, 3, 7, 40, 10_000])
def test_chunked_encoding_equals_plain_encoding(chunk_chars):
    text = TRICKY * 5
    expected = get_tokenizer("gpt2").encode(text, allowed_special={"<|endoftext|>"})
    ids = corpus._encode(text, "gpt2", chunk_chars=chunk_chars)
    assert ids.dtype == np.uint16
    assert ids.tolist() == expected


def test_chunked_encoding_of_default_corpus():
    text = load_text("default")
    expected = get_tokenizer("gpt2").encode(text, allowed_special={"<|endoftext|>"})
    assert corpus._encode(text, "gpt2", chunk_chars=2_000).tolist() == expected


@pytest.fixture
def counted_encode(monkeypatch):
    calls = []
    real = corpus._encode

    def encode(text, name):
        calls.append((text, name))
        return real(text, "gpt2")

    monkeypatch.setattr(corpus, "_encode", encode)
    # A second name for the same encoding, to show the name is part of the key.
    monkeypatch.setattr(corpus, "get_tokenizer", lambda name: get_tokenizer("gpt2" if name == "gpt2-alias" else name))
    return calls


def test_token_cache_hit(tmp_path, counted_encode):
    first = tokenize_cached(TRICKY, cache_dir=tmp_path)
    second = tokenize_cached(TRICKY, cache_dir=tmp_path)
    assert len(counted_encode) == 1
    assert first.dtype == second.dtype == np.uint16
    np.testing.assert_array_equal(first, second)
    assert first.tolist() == get_tokenizer("gpt2").encode(TRICKY, allowed_special={"<|endoftext|>"})
    files = sorted((tmp_path / "tokens").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npy"  # and no temp file left behind


def test_token_cache_key_is_text_and_tokenizer(tmp_path, counted_encode):
    tokenize_cached(TRICKY, cache_dir=tmp_path)
    tokenize_cached(TRICKY + ".", cache_dir=tmp_path)
    tokenize_cached(TRICKY, tokenizer_name="gpt2-alias", cache_dir=tmp_path)
    assert len(counted_encode) == 3
    assert len(list((tmp_path / "tokens").iterdir())) == 3


def test_token_cache_default_dir(tmp_path, counted_encode):
    tokenize_cached("hello")
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 1


def test_token_cache_unknown_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt5'"):
        tokenize_cached("hello", tokenizer_name="gpt5", cache_dir=tmp_path)
    assert not (tmp_path / "tokens").exists()


def test_a_subdirectory_named_like_a_text_file_is_skipped(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "notes.txt").mkdir()  # a directory, not a document
    assert load_text(tmp_path) == "alpha"
    with pytest.raises(ValueError, match=r"notes.txt is a directory, not a text file"):
        load_text([tmp_path / "a.txt", tmp_path / "notes.txt"])


def test_an_unreadable_file_in_a_corpus_is_named(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(ValueError, match=r"b.txt is not UTF-8 text \(byte 3"):
        load_text(tmp_path)
    (tmp_path / "b.txt").write_text("beta")
    read = Path.read_text

    def denied(self, *args, **kwargs):
        if self.name == "b.txt":
            raise PermissionError(13, "Permission denied")
        return read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(OSError, match=r"^cannot read .*b.txt: Permission denied$"):
        load_text(str(tmp_path / "*.txt"))
