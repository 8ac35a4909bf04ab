"""GPTConfig's accelerator options leave what a model computes unchanged:
vocab_multiple (a padded vocabulary: the same loss, generations and exported weights), loss_chunk
(the fused chunked head + loss: the same loss and gradients), attn_drop_rate (its own rate,
defaulting to drop_rate) and the CPU bfloat16 guard."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import kernels
from jaxgpt.config import RUNTIME_FIELDS, GPTConfig
from jaxgpt.data.windows import IGNORE
from jaxgpt.inference.generate import generate
from jaxgpt.models.model import GPT, init_params
from jaxgpt.weights.huggingface import load_pretrained, save_pretrained, to_hf_tensors
from jaxgpt.training.losses import lm_loss_fn

V = 17
# float32 pinned: "auto" is bfloat16 on a GPU, where these float32 tolerances would not hold.
BASE = dict(vocab_size=V, context_length=16, emb_dim=12, n_heads=3, n_layers=2, drop_rate=0.0,
            kernels="reference", dtype="float32")


def _strip(params, tied):
    """A padded model's parameters with the padded rows removed: the unpadded model's."""
    out = {**params, "wte": {"embedding": params["wte"]["embedding"][:V]}}
    if not tied:
        out["lm_head"] = params["lm_head"][:, :V]
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def models(request):
    tied = request.param
    padded = GPTConfig(**BASE, tie_embeddings=tied, vocab_multiple=8)
    assert padded.padded_vocab_size == 24
    params = init_params(padded, jax.random.key(0))  # padded rows random, not zero: masking counts
    plain = padded.replace(vocab_multiple=1)
    return padded, params, plain, _strip(params, tied)


def _batch():
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, V)
    targets = jax.random.randint(jax.random.key(2), (2, 9), 0, V).at[0, :2].set(IGNORE)
    return {"inputs": ids, "targets": targets}


def test_padded_vocabulary_leaves_loss_and_gradients_unchanged(models):
    padded, params, plain, stripped = models
    loss = lambda cfg, p: lm_loss_fn(cfg)(p, None, _batch(), jax.random.key(3), True)[0]  # noqa: E731
    got, got_g = jax.value_and_grad(lambda p: loss(padded, p))(params)
    want, want_g = jax.value_and_grad(lambda p: loss(plain, p))(stripped)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    tied = padded.tie_embeddings
    for a, b in zip(jax.tree.leaves(_strip(got_g, tied)), jax.tree.leaves(want_g)):
        # float32 sums over 24 rather than 17 columns round differently: ~1e-7 of the scale.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The padded rows get no gradient from the loss.
    pad = got_g["wte"]["embedding"][V:] if tied else got_g["lm_head"][:, V:]
    assert np.all(np.asarray(pad) == 0.0)


def test_padded_logits_never_win(models):
    padded, params, _, _ = models
    logits = GPT(padded).apply({"params": params}, _batch()["inputs"])  # [B, T, 24]
    assert logits.shape[-1] == 24
    assert np.all(np.asarray(jnp.argmax(logits, -1)) < V)
    np.testing.assert_array_equal(jax.nn.softmax(logits)[..., V:], 0.0)


def test_padded_vocabulary_leaves_generation_unchanged(models):
    """Sampled, so the draws themselves must match: the same logits, the same noise."""
    padded, params, plain, stripped = models
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]  # left-padded to a common length inside
    kw = dict(temperature=1.0, key=jax.random.key(4))
    np.testing.assert_array_equal(generate(params, padded, prompts, 5, **kw),
                                  generate(stripped, plain, prompts, 5, **kw))


def test_export_strips_and_import_pads(models, tmp_path):
    padded, params, plain, stripped = models
    exported = to_hf_tensors(padded, params)
    want = to_hf_tensors(plain, stripped)
    assert exported.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(exported[name], want[name], err_msg=name)
    save_pretrained(plain, stripped, tmp_path)
    config, loaded = load_pretrained(tmp_path, vocab_multiple=8)
    assert config.padded_vocab_size == 24 and loaded["wte"]["embedding"].shape == (24, 12)
    for name, x in to_hf_tensors(config, loaded).items():  # import -> export: the file's tensors
        np.testing.assert_array_equal(x, want[name], err_msg=name)
    np.testing.assert_array_equal(loaded["wte"]["embedding"][V:], 0.0)


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_equals_plain_loss(tied):
    cfg = GPTConfig(**{**BASE, "kernels": "auto"}, tie_embeddings=tied, vocab_multiple=8)
    params = init_params(cfg, jax.random.key(5))
    loss = lambda c: jax.value_and_grad(  # noqa: E731
        lambda p: lm_loss_fn(c)(p, None, _batch(), jax.random.key(3), True)[0])(params)
    (got, got_g), (want, want_g) = loss(cfg.replace(loss_chunk=5)), loss(cfg)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # float32 sums in another order


def test_attn_drop_rate_defaults_to_drop_rate_and_is_a_runtime_field():
    assert "attn_drop_rate" in RUNTIME_FIELDS and "loss_chunk" in RUNTIME_FIELDS
    assert GPTConfig(drop_rate=0.2).attention_drop_rate == 0.2
    assert GPTConfig(drop_rate=0.2, attn_drop_rate=0.0).attention_drop_rate == 0.0
    with pytest.raises(ValueError, match="GPTConfig.attn_drop_rate must be"):
        GPTConfig(attn_drop_rate=1.5)
    with pytest.raises(ValueError, match="GPTConfig.vocab_multiple must be"):
        GPTConfig(vocab_multiple=0)


def test_attention_uses_its_own_rate():
    cfg = GPTConfig(**BASE)  # drop_rate 0: only attention dropout can change the output
    params = init_params(cfg, jax.random.key(6))
    ids = _batch()["inputs"]
    run = lambda c: GPT(c).apply({"params": params}, ids, False,  # noqa: E731
                                 rngs={"dropout": jax.random.key(7)})
    still = run(cfg)
    np.testing.assert_array_equal(still, GPT(cfg).apply({"params": params}, ids))
    assert not np.allclose(run(cfg.replace(attn_drop_rate=0.5)), still)
    # The default follows drop_rate: the same draws as asking for the same rate explicitly.
    np.testing.assert_array_equal(run(cfg.replace(drop_rate=0.3)),
                                  run(cfg.replace(drop_rate=0.3, attn_drop_rate=0.3)))


@pytest.mark.parametrize("flags,warns", [({"avx2", "fma"}, True), ({"avx512_bf16"}, False),
                                         ({"amx_bf16", "amx_tile"}, False), ({"bf16"}, False)])
def test_bfloat16_on_a_cpu_without_native_support_warns_once(monkeypatch, flags, warns):
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(kernels, "backend", lambda: "cpu")
    monkeypatch.setattr(kernels, "_bf16_warned", False)
    assert GPTConfig(dtype="auto").compute_dtype == jnp.float32  # auto never picks it on CPU
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            assert GPTConfig(dtype="bfloat16").compute_dtype == jnp.bfloat16
    hits = [w for w in seen if "without native bfloat16" in str(w.message)]
    assert len(hits) == (1 if warns else 0)


def test_bfloat16_guard_is_cpu_only(monkeypatch):
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset())
    monkeypatch.setattr(kernels, "backend", lambda: "gpu")
    monkeypatch.setattr(kernels, "_bf16_warned", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert GPTConfig(dtype="bfloat16").compute_dtype == jnp.bfloat16
        assert GPTConfig(dtype="auto").compute_dtype == jnp.bfloat16
