import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import GPTConfig, init_params
from jaxgpt.training.optim import decay_mask, make_optimizer, schedule
from jaxgpt.training.runconfig import OptimConfig


def test_warmup_then_cosine_values():
    cfg = OptimConfig(learning_rate=1.0, init_lr=0.1, min_lr=0.2, warmup_steps=4, decay="cosine")
    lr = schedule(cfg, total_steps=14)
    expected = {
        0: 0.1, 2: 0.1 + 0.9 * 2 / 4,  # linear warmup from init_lr
        4: 1.0,  # peak at the end of warmup
        9: 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 5 / 10)),  # halfway down the cosine
        14: 0.2, 20: 0.2,  # floor at min_lr, and it stays there
    }
    for step, value in expected.items():
        assert float(lr(step)) == pytest.approx(value, rel=1e-6), step


def test_constant_after_warmup_and_bad_decay():
    lr = schedule(OptimConfig(learning_rate=0.5, warmup_steps=0), 10)
    assert [float(lr(s)) for s in (0, 5, 99)] == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="OptimConfig.decay must be one of"):  # when built
        OptimConfig(decay="linear")


@pytest.mark.parametrize("scan", [False, True])
def test_decay_mask_matrices_only(scan):
    cfg = GPTConfig(vocab_size=17, context_length=11, emb_dim=12, n_heads=3, n_layers=2,
                    qkv_bias=True, scan_layers=scan)
    params = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    mask = decay_mask(params)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    decayed = sorted(k for k, v in flat.items() if v)
    for name, on in flat.items():
        leaf = name.split("/")[-1]
        assert on == (leaf in ("kernel", "embedding", "lm_head")), name
    # The [H, K] query bias is 2-D but is a bias: not decayed.
    blk = "h" if scan else "h_0"
    assert not flat[f"{blk}/attn/query/bias"] and flat[f"{blk}/attn/query/kernel"]
    assert "wte/embedding" in decayed and "ln_f/scale" not in decayed


def test_weight_decay_applies_only_to_masked_leaves():
    params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,))}}
    tx = make_optimizer(OptimConfig(learning_rate=0.1, weight_decay=0.5), 10)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * np.ones((3, 2)))
    np.testing.assert_array_equal(updates["dense"]["bias"], 0.0)


def test_clipping_matches_adamw_on_clipped_gradients():
    import optax

    params = {"w": {"kernel": jnp.zeros((4,))}}
    cfg = OptimConfig(learning_rate=0.1, weight_decay=0.0, grad_clip=1.0)
    steps = [jnp.array([30.0, 40.0, 0.0, 0.0]), jnp.array([0.3, 0.0, 0.4, 0.0])]  # norms 50, 0.5

    def run(tx, grads_list):
        state, out = tx.init(params), []
        for g in grads_list:
            u, state = tx.update({"w": {"kernel": g}}, state, params)
            out.append(u["w"]["kernel"])
        return out

    ours = run(make_optimizer(cfg, 10), steps)
    manual = [g / max(1.0, float(jnp.linalg.norm(g))) for g in steps]  # clip by hand
    ref = run(optax.adam(0.1, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps), manual)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    unclipped = run(optax.adam(0.1, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps), steps)
    assert not np.allclose(unclipped[1], ours[1])  # clipping changed the second step
