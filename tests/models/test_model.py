import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import GPT, GPTConfig, count_params, init_cache, init_params, logical_axes


@pytest.fixture(scope="module")
def setup():
    from tests.conftest import TINY

    cfg = GPTConfig(**TINY)
    params = init_params(cfg, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    return cfg, params, ids


def _apply(cfg, params, ids, **kw):
    return GPT(cfg).apply({"params": params}, ids, **kw)


def test_shapes_dtypes_and_names(setup):
    cfg, params, ids = setup
    logits = _apply(cfg, params, ids)
    assert logits.shape == (2, 9, 17) and logits.dtype == jnp.float32
    assert set(params) == {"wte", "wpe", "h_0", "h_1", "ln_f", "lm_head"}
    assert params["h_0"]["attn"]["query"]["kernel"].shape == (12, 3, 4)  # [D, H, K]
    assert params["h_0"]["mlp"]["c_fc"]["kernel"].shape == (12, 48)  # [D, F]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_count_params_matches_formula():
    # Independent closed form for GPT-2 shapes: embeddings + L blocks + final LN (+ head).
    def formula(v, c, d, n_layers, qkv_bias, tied):
        block = 2 * 2 * d + 3 * d * d + (3 * d if qkv_bias else 0) + d * d + d + 8 * d * d + 5 * d
        return v * d + c * d + n_layers * block + 2 * d + (0 if tied else d * v)

    for name, exp_layers in [("gpt2-small", 12), ("gpt2-medium", 24)]:
        cfg = GPTConfig.preset(name, qkv_bias=True, tie_embeddings=True)
        shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
        assert cfg.n_layers == exp_layers
        assert count_params(shapes) == formula(50257, 1024, cfg.emb_dim, cfg.n_layers, True, True)
    # GPT-2 small as released: 124,439,808 parameters with the tied head.
    cfg = GPTConfig.preset("gpt2", qkv_bias=True, tie_embeddings=True)
    assert count_params(jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))) == 124_439_808


def test_causal_by_perturbation(setup):
    cfg, params, ids = setup
    base = _apply(cfg, params, ids)
    t = 4
    changed = ids.at[:, t + 1 :].set((ids[:, t + 1 :] + 5) % cfg.vocab_size)
    out = _apply(cfg, params, changed)
    np.testing.assert_array_equal(out[:, : t + 1], base[:, : t + 1])
    assert not np.allclose(out[:, t + 1 :], base[:, t + 1 :])


@pytest.mark.parametrize("kernel_set", ["auto", "reference"])
def test_causal_by_gradient(setup, kernel_set):
    """d loss_t / d (embedding of token s) is zero for s > t, nonzero for s <= t."""
    cfg, params, ids = setup
    cfg = cfg.replace(kernels=kernel_set)
    t = 3

    def loss_at_t(emb_offsets):
        p = dict(params)
        # Perturb each position's input through the position embedding table.
        p["wpe"] = {"embedding": params["wpe"]["embedding"].at[: ids.shape[1]].add(emb_offsets)}
        return _apply(cfg, p, ids)[:, t].sum()

    g = jax.grad(loss_at_t)(jnp.zeros((ids.shape[1], cfg.emb_dim)))
    norms = np.abs(np.asarray(g)).sum(-1)
    assert np.all(norms[t + 1 :] == 0.0)
    assert np.all(norms[: t + 1] > 0.0)


def test_auto_and_reference_kernels_agree(setup):
    cfg, params, ids = setup
    a = _apply(cfg, params, ids)
    b = _apply(cfg.replace(kernels="reference"), params, ids)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_dropout_active_only_when_not_deterministic(setup):
    cfg, params, ids = setup
    cfg = cfg.replace(drop_rate=0.3)
    det1 = _apply(cfg, params, ids, deterministic=True)
    det2 = _apply(cfg, params, ids)
    np.testing.assert_array_equal(det1, det2)
    np.testing.assert_allclose(det1, _apply(cfg.replace(drop_rate=0.0), params, ids), atol=1e-6)
    r1 = _apply(cfg, params, ids, deterministic=False, rngs={"dropout": jax.random.key(1)})
    r1b = _apply(cfg, params, ids, deterministic=False, rngs={"dropout": jax.random.key(1)})
    r2 = _apply(cfg, params, ids, deterministic=False, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(r1, r1b)
    assert not np.allclose(r1, det1) and not np.allclose(r1, r2)


def test_tied_head_uses_token_embedding(setup):
    cfg, params, ids = setup
    tied = cfg.replace(tie_embeddings=True)
    p = {k: v for k, v in params.items() if k != "lm_head"}
    assert set(init_params(tied, jax.random.key(0))) == set(p)
    untied = dict(p, lm_head=params["wte"]["embedding"].T)
    np.testing.assert_allclose(_apply(tied, p, ids), _apply(cfg, untied, ids), atol=1e-6)


def test_bfloat16_compute_keeps_float32_logits(setup):
    cfg, params, ids = setup
    out = _apply(cfg.replace(dtype="bfloat16"), params, ids)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, _apply(cfg, params, ids), atol=0.1)


def test_cached_prefill_and_decode_equal_full_forward(setup):
    cfg, params, ids = setup
    full = _apply(cfg, params, ids)
    cache = init_cache(cfg, 2, cfg.context_length, jnp.float32)
    out, cache = _apply(cfg, params, ids[:, :5], cache=cache, cache_index=0)
    np.testing.assert_allclose(out, full[:, :5], atol=1e-5)
    for t in range(5, 9):
        out, cache = _apply(cfg, params, ids[:, t : t + 1], cache=cache, cache_index=t)
        np.testing.assert_allclose(out[:, 0], full[:, t], atol=1e-5)


def _stack_layers(params, n_layers):
    blocks = [params[f"h_{i}"] for i in range(n_layers)]
    rest = {k: v for k, v in params.items() if not k.startswith("h_")}
    return dict(rest, h=jax.tree.map(lambda *xs: jnp.stack(xs), *blocks))


@pytest.mark.parametrize("variant", [dict(scan_layers=True), dict(remat_policy="full"),
                                     dict(scan_layers=True, remat_policy="dots")])
def test_scan_and_remat_equal_plain_model(setup, variant):
    cfg, params, ids = setup
    other = cfg.replace(**variant)
    p_other = _stack_layers(params, cfg.n_layers) if other.scan_layers else params
    assert jax.tree.structure(p_other) == jax.tree.structure(init_params(other, jax.random.key(0)))

    def loss(p, c):
        return _apply(c, p, ids).mean()

    l1, g1 = jax.value_and_grad(loss)(params, cfg)
    l2, g2 = jax.value_and_grad(loss)(p_other, other)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    g1 = _stack_layers(g1, cfg.n_layers) if other.scan_layers else g1
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


def test_logical_axes_cover_every_parameter(setup):
    cfg, params, _ = setup
    axes = logical_axes(cfg)
    assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)) \
        == jax.tree.structure(params)
    assert tuple(axes["wte"]["embedding"]) == ("vocab", "embed")
    assert tuple(axes["h_1"]["attn"]["c_proj"]["kernel"]) == ("heads", "kv", "embed")


@pytest.mark.parametrize(
    "ids, message",
    [
        (np.zeros((1, 12), np.int32), "exceeds context_length=11"),
        (np.array([[1, 17]]), "token id 17 is outside the vocabulary"),
        (np.array([[-1, 2]]), "token id -1 is outside"),
        (np.zeros((3,), np.int32), "shape [batch, time]"),
        (np.zeros((1, 3), np.float32), "must be integers"),
    ],
)
def test_bad_ids_rejected_before_compiling(setup, ids, message):
    cfg, params, _ = setup
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _apply(cfg, params, ids)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(emb_dim=10, n_heads=3), "not divisible by n_heads"),
        (dict(n_layers=0), "n_layers"),
        (dict(vocab_size=-3), "vocab_size"),
        (dict(drop_rate=1.5), "drop_rate"),
        (dict(dtype="float64"), "dtype"),
    ],
)
def test_config_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**changes)


def test_presets_and_unknown_keys():
    assert GPTConfig.preset("gpt2-xl").emb_dim == 1600
    assert GPTConfig.preset("gpt2-medium", context_length=256).context_length == 256
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.preset("gpt3")
    with pytest.raises(ValueError, match="emb_dimm"):
        GPTConfig.from_dict({"emb_dimm": 3})
    cfg = GPTConfig()
    assert GPTConfig.from_dict(dataclasses.asdict(cfg)) == cfg


def test_torch_init_matches_pytorch_defaults():
    """The book's GPTModel starts from PyTorch's defaults; init="torch" reproduces them."""
    import torch

    cfg = GPTConfig(vocab_size=101, context_length=13, emb_dim=48, n_heads=4, n_layers=2,
                    qkv_bias=True, init="torch")
    p = init_params(cfg, jax.random.key(0))
    lin = torch.nn.Linear(48, 192)  # torch's own initializer gives the bound it uses
    bound = float(lin.weight.abs().max())
    assert abs(float(np.abs(p["h_0"]["mlp"]["c_fc"]["kernel"]).max()) - bound) < 0.01
    assert float(np.abs(p["h_0"]["attn"]["query"]["bias"]).max()) <= 1 / np.sqrt(48)
    assert float(np.abs(p["h_0"]["mlp"]["c_proj"]["kernel"]).max()) <= 1 / np.sqrt(192)
    emb = torch.nn.Embedding(101, 48).weight.detach().numpy()
    np.testing.assert_allclose(np.std(p["wte"]["embedding"]), np.std(emb), rtol=0.05)


def test_every_config_family_has_a_skeleton_entry():
    from jaxgpt.config import FAMILIES as NAMED
    from jaxgpt.models.model import FAMILIES

    assert set(FAMILIES) == set(NAMED)
