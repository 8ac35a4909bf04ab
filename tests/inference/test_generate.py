"""Generation invariants: transformers' greedy decode, cached == uncached, batching, sampling."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxgpt import GPTConfig, init_params
from jaxgpt.inference import generate as generation
from jaxgpt.inference import requests as generation_inputs
from jaxgpt.inference.generate import (
    generate,
    generate_simple,
    generate_stream,
    prefill,
    prompt_bucket,
)
from jaxgpt.weights.huggingface import load_pretrained, save_pretrained

# The CLI module by its full name: `jaxgpt.generate` could also name a re-exported function.
cli = importlib.import_module("jaxgpt.cli.generate")

# V=67, context 23, D=20, H=4 (K=5), L=3, F=80: pairwise distinct.
SHAPE = dict(vocab_size=67, n_positions=23, n_embd=20, n_head=4, n_layer=3)
PROMPTS = [[5], [3, 9, 14, 2, 7], [60, 1, 1, 8, 33, 20, 4, 41, 12]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(transformers model, config, params) of one random GPT-2 with lively logits."""
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(**SHAPE, initializer_range=0.3, bos_token_id=None,
                                        eos_token_id=None, pad_token_id=0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("gen")
    hf.save_pretrained(path, safe_serialization=True)
    config, params = load_pretrained(path, dtype="float32")  # float32 on every backend
    return hf, config, params


def _hf_greedy(hf, prompts, new):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                          min_new_tokens=new, pad_token_id=0)
    return out[:, width:].numpy()


@pytest.mark.parametrize("kernel_set", ["auto", "reference"])
def test_greedy_matches_transformers(model, kernel_set):
    hf, config, params = model
    config = config.replace(kernels=kernel_set)
    for prompt in PROMPTS:
        ours = generate(params, config, [prompt], 8)
        np.testing.assert_array_equal(ours[:, :len(prompt)], [prompt])
        np.testing.assert_array_equal(ours[:, len(prompt):], _hf_greedy(hf, [prompt], 8))
    # Left-padded batch: transformers derives positions from the mask the same way.
    np.testing.assert_array_equal(generate(params, config, PROMPTS, 8)[:, -8:],
                                  _hf_greedy(hf, PROMPTS, 8))


def test_cached_equals_uncached_past_the_context(model):
    _, config, params = model
    prompt = (np.arange(16) * 5 % 67)[None].astype(np.int32)
    new = 10  # 16 + 10 tokens overflow the 23-token context: the window slides
    cached = generate(params, config, prompt, new)
    np.testing.assert_array_equal(cached, generate_simple(params, config, prompt, new, 23))
    assert len(set(cached[0, 16:].tolist())) > 3  # a lively model, not one repeated token
    kw = dict(temperature=1.3, top_k=13, key=jax.random.key(7))
    np.testing.assert_array_equal(generate(params, config, prompt, new, **kw),
                                  generate_simple(params, config, prompt, new, 23, **kw))


def test_left_padded_batch_equals_one_at_a_time(model):
    _, config, params = model
    prompts = [[4, 8], [50, 2, 19, 7, 7, 31, 6], [11, 12, 13, 14], [9]]
    batch = generate(params, config, prompts, 8)
    for row, prompt in zip(batch, prompts):
        np.testing.assert_array_equal(row[-8:], generate(params, config, [prompt], 8)[0, -8:])
    # One row slides past the context while the other still decodes from the cache.
    long = list(np.arange(20) % 60 + 3)
    batch = generate(params, config, [long, [5, 6, 7]], 8)
    alone = generate_simple(params, config, np.array([long]), 8, 23)
    np.testing.assert_array_equal(batch[0, -8:], np.asarray(alone)[0, -8:])
    np.testing.assert_array_equal(batch[1, -8:], generate(params, config, [[5, 6, 7]], 8)[0, -8:])


def test_array_with_mask_equals_list(model):
    _, config, params = model
    junk = 999  # padding may hold any value, even outside the vocabulary
    ids = np.array([[junk, junk, 4, 8], [50, 2, 19, 7]])
    mask = ids != junk
    out = generate(params, config, ids, 8, prompt_mask=mask)
    np.testing.assert_array_equal(out[:, :4], ids)
    np.testing.assert_array_equal(out[:, 4:], generate(params, config, [[4, 8], [50, 2, 19, 7]], 8)[:, 4:])


def test_long_prompt_is_cut_to_the_context(model):
    _, config, params = model
    prompt = (np.arange(30) * 7 % 67)[None].astype(np.int32)
    out = generate(params, config, prompt, 4)
    np.testing.assert_array_equal(out[:, :30], prompt)
    np.testing.assert_array_equal(out[:, 30:], generate(params, config, prompt[:, -23:], 4)[:, 23:])
    np.testing.assert_array_equal(out, generate_simple(params, config, prompt, 4, 23))


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    _, config, params = model
    greedy = generate(params, config, PROMPTS, 8)
    key = jax.random.key(3)
    np.testing.assert_array_equal(generate(params, config, PROMPTS, 8, temperature=0.7, top_k=1, key=key), greedy)
    np.testing.assert_array_equal(generate(params, config, PROMPTS, 8, temperature=0.7, top_p=1e-6, key=key), greedy)


def test_sampling_is_fixed_by_the_key(model):
    _, config, params = model
    kw = dict(temperature=2.0, top_p=0.9)
    a = generate(params, config, PROMPTS, 8, key=jax.random.key(1), **kw)
    np.testing.assert_array_equal(a, generate(params, config, PROMPTS, 8, key=jax.random.key(1), **kw))
    assert not np.array_equal(a, generate(params, config, PROMPTS, 8, key=jax.random.key(2), **kw))


def test_eos_pads_finished_rows_and_stops_early(model):
    _, config, params = model
    free = generate(params, config, PROMPTS, 8)[:, -8:]
    row = free[1].tolist()
    k = next(i for i in range(1, 8) if row[i] not in row[:i])  # a token new at step k
    eos = row[k]
    out = generate(params, config, PROMPTS, 8, eos_id=eos)[:, -8:]
    for got, want in zip(out, free):
        stop = want.tolist().index(eos) if eos in want else 8
        np.testing.assert_array_equal(got[: stop + 1], want[: stop + 1])
        assert (got[stop:] == eos).all()
    chunks = list(generate_stream(params, config, [PROMPTS[1]], 8, eos_id=eos, chunk_size=1))
    assert sum(c.shape[1] for c in chunks) == k + 1  # the loop ended at the eos


def test_stream_chunks_equal_generate(model):
    _, config, params = model
    chunks = list(generate_stream(params, config, PROMPTS, 8, chunk_size=3))
    assert [c.shape[1] for c in chunks] == [1, 3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), generate(params, config, PROMPTS, 8)[:, -8:])


def test_scanned_params_generate_the_same(model):
    _, config, params = model
    stacked = {**{k: v for k, v in params.items() if not k.startswith("h_")},
               "h": jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"h_{i}"] for i in range(3)])}
    np.testing.assert_array_equal(generate(params, config, PROMPTS, 8),
                                  generate(stacked, config.replace(scan_layers=True), PROMPTS, 8))


def test_one_compilation_per_bucket(model):
    _, config, params = model
    assert prompt_bucket(3, 23) == prompt_bucket(9, 23) == 16 and prompt_bucket(17, 23) == 23
    generate(params, config, [[1, 2, 3]], 5)
    before = prefill._cache_size()
    generate(params, config, [[4, 5, 6, 7, 8, 9, 10, 11, 12]], 5)
    assert prefill._cache_size() == before


def test_no_new_tokens_returns_the_prompt(model):
    _, config, params = model
    np.testing.assert_array_equal(generate(params, config, [[1, 2]], 0), [[1, 2]])


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([[1, 67]], {}, r"token id 67 in prompt 0 is outside the vocabulary \[0, 67\)"),
    ([[1], []], {}, "prompt 1 is empty"),
    (np.array([1, 2]), {}, r"prompt_ids must be \[batch, time\]"),
    (np.array([[1, 2, 3]]), dict(prompt_mask=np.array([[1, 0, 1]])), "row 0 is not left padding"),
    ([[1]], dict(top_k=0), "top_k must be an integer in"),
    ([[1]], dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    ([[1]], dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    ([[1]], dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    ([[1]], dict(temperature=0.5), "needs a PRNG key"),
    ([[1]], dict(eos_id=67), "eos_id 67 is outside"),
])
def test_bad_inputs_are_named(model, prompts, kwargs, message):
    _, config, params = model
    with pytest.raises(ValueError, match=message):
        generate(params, config, prompts, 3, **kwargs)


def test_buffers_past_the_bound_are_refused_before_anything_is_compiled(model, monkeypatch):
    _, config, params = model
    with pytest.raises(ValueError, match=r"max_new_tokens=1000000000 is too many: .* over the 256 MiB"):
        generate(params, config, [[1, 2]], 10**9)
    with pytest.raises(ValueError, match="too many"):
        next(generate_stream(params, config, [[1, 2]], 10**9))
    # The bound is what generate keeps: [B, prompt bucket + new] int32 ids and bool mask.
    B, bucket, new = 2, prompt_bucket(2, config.context_length), 3
    monkeypatch.setattr(generation_inputs, "MAX_BUFFER_BYTES", B * (bucket + new) * 5)
    assert generate(params, config, [[1, 2], [3]], new).shape == (B, 2 + new)
    monkeypatch.setattr(generation, "prefill", None)  # refused before the first compiled call
    with pytest.raises(ValueError, match="too many"):
        generate(params, config, [[1, 2], [3]], new + 1)


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    """A model with GPT-2's vocabulary (the tokenizer needs it) and tiny everything else."""
    config = GPTConfig(vocab_size=50257, context_length=32, emb_dim=12, n_heads=3, n_layers=1,
                       qkv_bias=True, tie_embeddings=True, drop_rate=0.0, dtype="float32")
    params = init_params(config, jax.random.key(0))
    path = save_pretrained(config, params, tmp_path_factory.mktemp("cli"))
    return path, config, params


def test_cli_streams_the_continuation(cli_model, capsys):
    from jaxgpt.data.tokenizer import get_tokenizer

    path, config, params = cli_model
    assert cli.main(["--model", str(path), "--prompt", "Hello there", "--max-new-tokens", "5",
                     "--temperature", "0"]) == 0
    tok = get_tokenizer("gpt2")
    new = generate(params, config, [tok.encode("Hello there")], 5, eos_id=tok.eot_token)[0, -5:].tolist()
    new = new[: new.index(tok.eot_token)] if tok.eot_token in new else new
    assert capsys.readouterr().out == "Hello there" + tok.decode(new) + "\n"


def test_cli_run_directory_and_errors(cli_model, tmp_path, capsys):
    from jaxgpt.training.runconfig import RunConfig
    from tests.conftest import write_run

    path, config, params = cli_model
    run = write_run(tmp_path / "run", RunConfig(model=config), {1: params})
    args = ["--prompt", "Hi", "--max-new-tokens", "2", "--temperature", "0.8", "--top-k", "5"]
    assert cli.main(["--model", str(path), *args]) == 0
    exported = capsys.readouterr().out
    assert cli.main(["--model", str(run), *args]) == 0
    assert capsys.readouterr().out == exported  # the same weights, the same seeded sample
    assert cli.main(["--model", str(tmp_path / "missing"), *args]) == 1
    assert "is neither a directory nor one of" in capsys.readouterr().err
    assert cli.main(["--model", str(run), "--prompt", "Hi", "--top-p", "1.5"]) == 1
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_cli_zero_new_tokens_prints_the_prompt(cli_model, capsys):
    path, _, _ = cli_model
    assert cli.main(["--model", str(path), "--prompt", "Hello there", "--max-new-tokens", "0"]) == 0
    assert capsys.readouterr() == ("Hello there\n", "")


def test_cli_refuses_a_huge_request_before_loading_the_model(tmp_path, capsys):
    missing = str(tmp_path / "no-such-model")  # never read: the options are refused first
    assert cli.main(["--model", missing, "--prompt", "Hi", "--max-new-tokens", str(10**9)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: max_new_tokens=1000000000 is too many") and err.count("\n") == 1
    assert cli.main(["--model", missing, "--prompt", "Hi", "--max-new-tokens", "-1"]) == 1
    assert "max_new_tokens must be a non-negative integer" in capsys.readouterr().err
