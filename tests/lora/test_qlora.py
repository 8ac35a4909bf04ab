"""QLoRA: LoRA over an int8 (or bfloat16) frozen base. The factored loss over the int8 base is
the loss of the float model whose base is the dequantized int8 weights (an independent
reference: dequantize, merge, plain forward), gradients included; adapters trained over the int8
base apply to the float base; a run trains over it and exports its adapters to PEFT as before."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt.config import GPTConfig
from jaxgpt.kernels.quantized import dequantize, is_quantized
from jaxgpt.lora import transform as lora
from jaxgpt.lora.adapters import export_peft
from jaxgpt.models.model import abstract_params, init_params
from jaxgpt.sharding import with_axes
from jaxgpt.training.losses import lm_loss_fn
from jaxgpt.weights.quantize import lora_base, weight_bytes
from tests.conftest import TINY

FAMILIES = {"gpt2": {}, "llama": dict(family="llama", n_kv_heads=1, mlp_dim=20)}
INT8 = lora.LoRAConfig(rank=3, alpha=5.0, base_weights="int8")


def dequantized(tree):
    return jax.tree.map(lambda x: dequantize(x) if is_quantized(x) else x, tree,
                        is_leaf=is_quantized)


def setup(family: str, scan: bool, config: lora.LoRAConfig = INT8):
    cfg = GPTConfig(**{**TINY, **FAMILIES[family], "scan_layers": scan})
    boxed = with_axes(init_params(cfg, jax.random.key(0)), abstract_params(cfg))
    trainable, frozen = lora.partition(boxed, config, jax.random.key(1))
    trainable = nn.meta.unbox(trainable)
    leaves, tree = jax.tree.flatten(trainable)  # non-zero B: the adapters change the model
    keys = jax.random.split(jax.random.key(2), len(leaves))
    trainable = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                          for x, k in zip(leaves, keys)])
    ids = jax.random.randint(jax.random.key(3), (3, 10), 0, cfg.vocab_size)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:]}
    return cfg, trainable, frozen, batch


@pytest.mark.parametrize("family, scan", [("gpt2", False), ("gpt2", True), ("llama", False)])
def test_the_loss_over_an_int8_base_is_the_dequantized_models(family, scan):
    cfg, trainable, frozen, batch = setup(family, scan)
    q = nn.meta.unbox(lora_base(frozen, INT8))
    kernels = [x for x in jax.tree.leaves(q, is_leaf=is_quantized) if is_quantized(x)]
    assert kernels and all(k["q"].dtype == jnp.int8 for k in kernels)
    loss = lora.lora_loss_fn(lm_loss_fn(cfg), INT8)
    got, grads = jax.value_and_grad(lambda t: loss(t, q, batch, jax.random.key(0), True)[0])(trainable)
    # the reference: the dequantized base merged with the adapters, a plain forward pass
    plain = lm_loss_fn(cfg)
    ref = lambda t: plain(lora.merge(dequantized(q), t["lora"], INT8) | t["full"], None,  # noqa: E731
                          batch, jax.random.key(0), True)[0]
    want, want_grads = jax.value_and_grad(ref)(trainable)
    assert got == pytest.approx(want, rel=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        # (x @ q) * scale against x @ (q * scale): the same product, rounded in another order
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))))
    # the merged form (factored=False) merges into the dequantized kernels: the same loss
    merged = lora.lora_loss_fn(lm_loss_fn(cfg), INT8, factored=False)
    assert merged(trainable, q, batch, jax.random.key(0), True)[0] == pytest.approx(want, rel=1e-5)
    # and the int8 base is near, not equal to, the float one
    float_loss = loss(trainable, nn.meta.unbox(frozen), batch, jax.random.key(0), True)[0]
    assert float_loss != got and float_loss == pytest.approx(got, rel=0.02)


def test_the_boxes_follow_the_kernels_and_the_base_shrinks():
    cfg, _, frozen, _ = setup("gpt2", False)
    q = lora_base(frozen, INT8)
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    k = q["h_0"]["attn"]["query"]["kernel"]
    assert k["q"].names == frozen["h_0"]["attn"]["query"]["kernel"].names == k["scale"].names
    assert jax.tree.leaves(q, is_leaf=is_box)
    assert lora_base(frozen, lora.LoRAConfig()) is frozen  # float32: as it is
    floats, ints = weight_bytes(nn.meta.unbox(frozen)), weight_bytes(nn.meta.unbox(q))
    assert ints < floats
    half = nn.meta.unbox(lora_base(frozen, lora.LoRAConfig(base_weights="bfloat16")))
    assert {x.dtype for x in jax.tree.leaves(half)} == {jnp.dtype("bfloat16")}


def test_adapters_trained_on_the_int8_base_apply_to_the_float_base(tmp_path):
    """Adam on a fixed batch, the base int8: the adapters that learn it lower the float base's
    loss as they lower the int8 base's, and export to PEFT as a float run's do."""
    config = lora.LoRAConfig(rank=3, alpha=5.0, base_weights="int8", include_head=True)
    cfg, _, frozen, batch = setup("gpt2", False, config)  # the head adapted too (merged: float)
    trainable = nn.meta.unbox(lora.partition(frozen, config, jax.random.key(1))[0])  # B = 0
    q, base = nn.meta.unbox(lora_base(frozen, config)), nn.meta.unbox(frozen)
    loss = lora.lora_loss_fn(lm_loss_fn(cfg), config)
    value = lambda t, b: loss(t, b, batch, jax.random.key(0), True)[0]  # noqa: E731
    tx = optax.adam(3e-2)
    opt = tx.init(trainable)

    @jax.jit
    def step(t, opt):
        grads = jax.grad(value)(t, q)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(t, updates), opt

    start_int8, start_float = value(trainable, q), value(trainable, base)
    for _ in range(150):
        trainable, opt = step(trainable, opt)
    end_int8, end_float = value(trainable, q), value(trainable, base)
    assert end_int8 < 0.8 * start_int8 and end_float < 0.8 * start_float
    assert end_float == pytest.approx(end_int8, rel=0.02)
    export_peft(tmp_path, trainable, config, cfg)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 3 and "base_weights" not in json.dumps(saved)


@pytest.mark.parametrize("change, message", [
    (dict(base_weights="int4"), "LoRAConfig.base_weights must be one of float32, bfloat16, int8"),
    (dict(base_group=64), "LoRAConfig.base_group needs base_weights=int8"),
    (dict(base_weights="int8", base_group=0), "LoRAConfig.base_group must be a positive integer"),
])
def test_bad_base_settings_are_one_line(change, message):
    with pytest.raises(ValueError, match=message):
        lora.LoRAConfig(**change)
