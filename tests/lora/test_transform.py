"""LoRA as a parameter-tree transformation: invariants against independent references."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.lora import transform as lora
from jaxgpt.config import GPTConfig
from jaxgpt.data.windows import IGNORE
from jaxgpt.lora.adapters import export_peft, load_adapters, save_adapters
from jaxgpt.models.model import GPT, abstract_params, init_params
from jaxgpt.training.losses import lm_loss_fn
from jaxgpt.training.optim import make_optimizer, schedule
from jaxgpt.training.runconfig import OptimConfig
from jaxgpt.training.state import init_state
from jaxgpt.training.step import train_step
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "e2e" / "workers" / "lora_fit.py"
sys.path.insert(0, str(WORKER.parent))
import lora_fit  # noqa: E402

UNTIED = GPTConfig(**{**TINY, "qkv_bias": True})  # V=17, D=12, H=3, K=4, F=48, L=2, own lm_head
TIED = GPTConfig(**{**TINY, "vocab_size": 67, "qkv_bias": True, "tie_embeddings": True})
CFG = lora.LoRAConfig(rank=3, alpha=5.0, include_head=True, trainable=("ln_f",))


def _randomize(trainable, seed=7):
    """Non-zero B (and perturbed A) so adapters change the model."""
    leaves, tree = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _setup(scan_layers: bool):
    cfg = UNTIED.replace(scan_layers=scan_layers)
    params = init_params(cfg, jax.random.key(0))
    trainable, frozen = lora.partition(params, CFG, jax.random.key(1))
    ids = jax.random.randint(jax.random.key(2), (2, 9), 0, cfg.vocab_size)
    return cfg, params, trainable, frozen, ids


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scanned"])
def setup(request):
    """Both layouts, for what depends on them (a scanned model's leaves have a leading L)."""
    return _setup(request.param)


@pytest.fixture(scope="module")
def unrolled():
    return _setup(False)


def _logits_loss(cfg):
    """A base loss whose aux is the logits, so a wrapped loss exposes the model's output."""
    def loss_fn(params, frozen, batch, rng, deterministic):
        logits = GPT(cfg).apply({"params": params}, batch["inputs"], deterministic,
                                rngs={"dropout": rng})
        return jnp.sum(logits), logits
    return loss_fn


def _logits(cfg, config, trainable, frozen, ids, rng=0, deterministic=True, factored=True):
    """The model's logits through the wrapped loss (adapters factored or merged)."""
    loss = lora.lora_loss_fn(_logits_loss(cfg), config, factored=factored)
    return loss(trainable, frozen, {"inputs": ids}, jax.random.key(rng), deterministic)[1]


def test_config_validation():
    bad = [dict(rank=0), dict(rank=2.0), dict(alpha=-1.0), dict(alpha=float("nan")),
           dict(dropout=1.0), dict(targets=("(",)), dict(targets=()), dict(trainable=("[",))]
    for kwargs in bad:
        field = next(iter(kwargs))
        with pytest.raises(ValueError, match=f"LoRAConfig.{field}"):
            lora.LoRAConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown LoRAConfig field.*rnak"):
        lora.LoRAConfig.from_dict({"rnak": 4})
    assert lora.LoRAConfig(targets="query").targets == ("query",)
    assert lora.LoRAConfig.from_dict(CFG.to_dict()) == CFG
    assert lora.LoRAConfig(rank=4, alpha=8).scale == 2.0
    assert lora.LoRAConfig(rank=4, alpha=8, rank_stabilized=True).scale == 4.0


def test_roles_errors():
    params = jax.eval_shape(lambda k: init_params(TIED, k), jax.random.key(0))
    with pytest.raises(ValueError, match="matches no kernel.*wte/embedding"):
        lora.roles(params, lora.LoRAConfig(include_head=True))  # tied: no head leaf
    with pytest.raises(ValueError, match="'nothing' matches no kernel"):
        lora.roles(params, lora.LoRAConfig(targets=("nothing",)))
    with pytest.raises(ValueError, match="trainable pattern 'nope' matches no parameter"):
        lora.roles(params, lora.LoRAConfig(trainable=("nope",)))
    with pytest.raises(ValueError, match="h_0/mlp/c_fc/kernel is both"):
        lora.roles(params, lora.LoRAConfig(trainable=("h_0/mlp/c_fc",)))
    # A pattern over a whole module adapts its kernel only, never its bias.
    r = lora.roles(params, lora.LoRAConfig(targets=("h_1/attn/query",)))
    assert r == {"h_1/attn/query/kernel": "lora"}


def test_shapes_and_logical_axes(setup):
    cfg, params, trainable, _, _ = setup
    D, H, K, F, r = 12, 3, 4, 48, 3
    lead = (2,) if cfg.scan_layers else ()
    blocks = trainable["lora"]["h" if cfg.scan_layers else "h_0"]
    shape = lambda x: tuple(x.shape)  # noqa: E731
    ab = lambda node: jax.tree.map(shape, node["kernel"])  # noqa: E731
    assert ab(blocks["attn"]["query"]) == {"a": lead + (D, r), "b": lead + (r, H, K)}
    assert ab(blocks["attn"]["c_proj"]) == {"a": lead + (H, K, r), "b": lead + (r, D)}
    assert ab(blocks["mlp"]["c_fc"]) == {"a": lead + (D, r), "b": lead + (r, F)}
    assert shape(trainable["lora"]["lm_head"]["a"]) == (D, r)
    assert all(not np.any(b) for _, b in lora.adapter_pairs(trainable["lora"]).values())  # B starts at 0
    bound = 1 / math.sqrt(H * K)  # A ~ U(+-1/sqrt(fan_in)), fan_in of c_proj is H K
    a = np.asarray(blocks["attn"]["c_proj"]["kernel"]["a"])
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
    boxed, frozen_boxed = lora.boxed_trees(abstract_params(cfg), CFG)
    names = lambda x: tuple(x.names)  # noqa: E731
    is_box = lambda x: hasattr(x, "names")  # noqa: E731
    lb = ("layers",) if cfg.scan_layers else ()
    q = boxed["lora"]["h" if cfg.scan_layers else "h_0"]["attn"]["query"]["kernel"]
    p = boxed["lora"]["h" if cfg.scan_layers else "h_0"]["attn"]["c_proj"]["kernel"]
    assert jax.tree.map(names, q, is_leaf=is_box) == {"a": (*lb, "embed", None),
                                                      "b": (*lb, None, "heads", "kv")}
    assert jax.tree.map(names, p, is_leaf=is_box) == {"a": (*lb, "heads", "kv", None),
                                                      "b": (*lb, None, "embed")}
    # The boxed trees have exactly the structure and shapes of the real ones.
    unboxed = jax.tree.map(lambda b: b.value, boxed, is_leaf=is_box)
    assert jax.tree.map(shape, unboxed) == jax.tree.map(shape, trainable)
    assert "ln_f" not in frozen_boxed and "ln_f" in boxed["full"]


def test_zero_b_gives_the_base_model_exactly(setup):
    cfg, params, trainable, frozen, ids = setup
    base = GPT(cfg).apply({"params": params}, ids)
    merged = GPT(cfg).apply({"params": lora.combine(trainable, frozen, CFG)}, ids)
    np.testing.assert_array_equal(merged, base)
    np.testing.assert_array_equal(_logits(cfg, CFG, trainable, frozen, ids), base)


def test_merged_equals_unmerged_computed_independently(setup):
    cfg, params, trainable, frozen, ids = setup
    trainable = _randomize(trainable)
    merged = lora.combine(trainable, frozen, CFG)
    flat_m, flat_p = lora._flat(merged), lora._flat(params)
    rng = np.random.default_rng(0)
    # x @ W + scale * (x @ A) @ B with the input axes spelled out per layout, in float64.
    h = "h" if cfg.scan_layers else "h_1"
    for path, n_in in [(f"{h}/attn/value/kernel", 1), (f"{h}/attn/c_proj/kernel", 2),
                       (f"{h}/mlp/c_proj/kernel", 1), ("lm_head", 1)]:
        w = np.asarray(flat_p[path], np.float64)
        a, b = (np.asarray(x, np.float64) for x in lora.adapter_pairs(trainable["lora"])[path])
        if cfg.scan_layers and path.startswith("h/"):
            w, a, b = w[1], a[1], b[1]  # layer 1 of the stack
            w_eff = np.asarray(flat_m[path][1], np.float64)
        else:
            w_eff = np.asarray(flat_m[path], np.float64)
        x = rng.normal(size=(5,) + w.shape[:n_in])
        ax = list(range(1, n_in + 1))
        want = np.tensordot(x, w, (ax, list(range(n_in)))) + CFG.scale * np.tensordot(
            np.tensordot(x, a, (ax, list(range(n_in)))), b, ([1], [0]))
        got = np.tensordot(x, w_eff, (ax, list(range(n_in))))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=path)
    # The frozen leaves pass through untouched; unmerge recovers the base.
    for path in ("wte/embedding", f"{h}/attn/query/bias", f"{h}/ln_1/scale"):
        assert flat_m[path] is flat_p[path] or np.array_equal(flat_m[path], flat_p[path])
    back = lora.unmerge(merged, trainable["lora"], CFG)
    want = {**params, "ln_f": trainable["full"]["ln_f"]}  # ln_f is trained in full
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), back, want)
    # The factored loss (adapters beside the kernels, no merge) gives the merged model's logits.
    full = GPT(cfg).apply({"params": merged}, ids)
    np.testing.assert_allclose(_logits(cfg, CFG, trainable, frozen, ids), full, rtol=1e-5, atol=1e-5)


def test_count_trainable_by_hand(setup):
    cfg, params, trainable, _, _ = setup
    D, F, V, L, r = 12, 48, 17, 2, 3
    # query/key/value [D]->[D], attention c_proj [D]->[D], c_fc [D]->[F], MLP c_proj [F]->[D]
    per_layer = 3 * r * (D + D) + r * (D + D) + r * (D + F) + r * (F + D)
    want = L * per_layer + r * (D + V) + 2 * D  # + lm_head adapter + ln_f scale and bias
    assert lora.count_trainable(params, CFG) == want
    assert sum(x.size for x in jax.tree.leaves(trainable)) == want
    assert lora.count_trainable(params, lora.LoRAConfig(rank=1, targets=r"mlp/c_fc")) == L * (D + F)
    mask = lora._flat(lora.trainable_mask(params, CFG))
    assert mask["lm_head"] and mask["ln_f/bias"] and not mask["wte/embedding"]


def _batch(cfg, seed=3, accum=1, rows=4):
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (accum, rows, 10))
    targets = ids[..., 1:].copy()
    targets[:, 0, :3] = IGNORE
    return {"inputs": jnp.asarray(ids[..., :-1], jnp.int32),
            "targets": jnp.asarray(targets, jnp.int32)}


@pytest.fixture(scope="module")
def stepped(setup):
    """Two train steps of the LoRA loss through the shared train_step."""
    cfg, params, trainable, frozen, _ = setup
    tx = make_optimizer(OptimConfig(learning_rate=1e-2), 10)
    loss_fn = lora.lora_loss_fn(lm_loss_fn(cfg), CFG)
    step = jax.jit(lambda s, b, f: train_step(s, b, f, loss_fn=loss_fn, tx=tx,
                                               lr_fn=schedule(OptimConfig(), 10)))
    before = jax.tree.map(np.array, frozen)
    state = init_state(trainable, tx, 0)
    for seed in (3, 4):
        state, metrics = step(state, _batch(cfg, seed), frozen)
    return cfg, params, trainable, frozen, before, state, metrics


def test_train_step_changes_only_adapters_and_trainable_leaves(stepped):
    cfg, params, trainable, frozen, before, state, metrics = stepped
    assert np.isfinite(metrics["loss"]) and int(metrics["skipped"]) == 0
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, frozen), before)
    new, old = lora._flat(state.params), lora._flat(trainable)
    assert set(new) == set(old)
    assert all(not np.array_equal(new[p], old[p]) for p in new), "every adapter and full leaf moves"
    merged, base = lora._flat(lora.combine(state.params, frozen, CFG)), lora._flat(params)
    adapted = set(lora.adapter_pairs(state.params["lora"])) | {"ln_f/scale", "ln_f/bias"}
    for path in base:
        same = np.array_equal(merged[path], base[path])
        assert same == (path not in adapted), path


def test_optimizer_state_exists_only_for_trainable_leaves(stepped):
    _, params, trainable, _, _, state, _ = stepped
    mu = lora_fit.adam_mu(state.opt_state)
    assert jax.tree.structure(mu) == jax.tree.structure(trainable)
    n_float = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.dtype == jnp.float32)
    assert n_float == 2 * lora.count_trainable(params, CFG)  # Adam's two moments, nothing else


def test_factored_and_merged_losses_give_the_same_gradients(setup):
    cfg, _, trainable, frozen, _ = setup
    trainable = _randomize(trainable)
    batch = {k: v[0] for k, v in _batch(cfg).items()}
    grads = [jax.jit(jax.grad(lambda t: lora.lora_loss_fn(lm_loss_fn(cfg), CFG, factored=f)(
        t, frozen, batch, jax.random.key(0), False)[0]))(trainable) for f in (True, False)]
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5), *grads)


def test_adapter_dropout(unrolled):
    cfg, _, trainable, frozen, ids = unrolled
    trainable = _randomize(trainable)
    drop = lora.LoRAConfig(**{**CFG.to_dict(), "dropout": 0.5})
    plain = _logits(cfg, CFG, trainable, frozen, ids)
    np.testing.assert_array_equal(_logits(cfg, drop, trainable, frozen, ids), plain)  # evaluation
    a, b = (_logits(cfg, drop, trainable, frozen, ids, rng, False) for rng in (0, 1))
    assert not np.allclose(a, plain) and not np.allclose(a, b)
    np.testing.assert_array_equal(a, _logits(cfg, drop, trainable, frozen, ids, 0, False))
    with pytest.raises(ValueError, match="dropout needs factored=True"):
        lora.lora_loss_fn(_logits_loss(cfg), drop, factored=False)


def test_kernel_read_without_dense_is_merged(setup):
    cfg, params, trainable, frozen, ids = setup
    trainable = _randomize(trainable)
    h = "h" if cfg.scan_layers else "h_0"

    def hand_rolled(params, frozen, batch, rng, deterministic):  # reads kernels with no nn.Dense
        x = jax.nn.one_hot(batch["inputs"], cfg.emb_dim)  # [B, T, D]
        w = params[h]["mlp"]["c_fc"]["kernel"]  # [D, F] or [L, D, F]
        h1 = x @ (w[0] if cfg.scan_layers else w)  # [B, T, F]
        return jnp.sum(jnp.sin(h1)), params[h]["attn"]["c_proj"]["kernel"]

    batch = {"inputs": ids}
    want = lora.lora_loss_fn(hand_rolled, CFG, factored=False)(trainable, frozen, batch, None, True)
    got = lora.lora_loss_fn(hand_rolled, CFG)(trainable, frozen, batch, None, True)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), got, want)
    drop = lora.LoRAConfig(**{**CFG.to_dict(), "dropout": 0.1})
    with pytest.raises(ValueError, match=f"dropout needs every.*{h}/attn/c_proj/kernel is not"):
        lora.lora_loss_fn(hand_rolled, drop)(trainable, frozen, batch, None, True)


def test_adapter_checkpoint_restores_and_refuses_another_base(unrolled, tmp_path):
    cfg, params, trainable, frozen, _ = unrolled
    trainable = _randomize(trainable)
    save_adapters(tmp_path / "ad", trainable, CFG, params)
    meta = json.loads((tmp_path / "ad" / "lora.json").read_text())
    assert meta["num_trainable"] == lora.count_trainable(params, CFG)
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapters", "lora.json"]
    restored, config = load_adapters(tmp_path / "ad", frozen)  # the frozen part hashes the same
    assert config == CFG
    jax.tree.map(np.testing.assert_array_equal, restored, trainable)
    other = jax.tree.map(lambda x: x, params)
    other["wpe"]["embedding"] = other["wpe"]["embedding"].at[3, 1].add(1e-3)
    with pytest.raises(ValueError, match="trained on other base weights"):
        load_adapters(tmp_path / "ad", other)
    # A change to a leaf trained in full is no change of base.
    load_adapters(tmp_path / "ad", {**params, "ln_f": jax.tree.map(jnp.zeros_like, params["ln_f"])})
    with pytest.raises(FileNotFoundError, match="not a LoRA adapters checkpoint"):
        load_adapters(tmp_path, params)


@pytest.fixture(scope="module")
def saved(unrolled, tmp_path_factory):
    """An adapters checkpoint of `unrolled`, to copy and damage."""
    cfg, params, trainable, _, _ = unrolled
    return save_adapters(tmp_path_factory.mktemp("saved") / "ad", _randomize(trainable), CFG, params)


def _meta_with(**changes):
    def change(meta):
        for key, value in changes.items():
            if value is None:
                meta.pop(key)
            else:
                meta[key] = value(meta[key]) if callable(value) else value
        return json.dumps(meta)
    return change


@pytest.mark.parametrize("change, message", [
    (lambda meta: "{not json", "is not valid JSON"),
    (lambda meta: b"\xff\x00", "is not valid JSON"),
    (lambda meta: "[1, 2]", "holds list, not a JSON object"),
    (lambda meta: "3", "holds int, not a JSON object"),
    (_meta_with(lora_config=None, shapes=None), "lacks lora_config, shapes"),
    (_meta_with(version=2), "has version 2; this jaxgpt reads version 1"),
    (_meta_with(lora_config=[3]), r"has lora_config=\[3\]; expected an object"),
    (_meta_with(lora_config=lambda c: {**c, "rank": "3"}), "LoRAConfig.rank must be a positive integer"),
    (_meta_with(lora_config=lambda c: {**c, "bogus": 1}), r"unknown LoRAConfig field\(s\): bogus"),
    (_meta_with(base_sha256=5), "has base_sha256=5; expected 64 hex digits"),
    (_meta_with(shapes=[1]), "has no shapes object"),
    (_meta_with(shapes=lambda s: {p: [d, "floatx"] for p, (d, _) in s.items()}), "has no shapes object"),
    (_meta_with(shapes=lambda s: {p: [[n + 1 for n in d], t] for p, (d, t) in s.items()}),
     "records adapter shapes that its LoRA config does not make"),
    (_meta_with(base_sha256="0" * 64), "trained on other base weights"),
], ids=["not-json", "not-utf8", "array", "number", "lacks-keys", "version", "config-array",
        "config-type", "config-unknown", "sha-type", "shapes-array", "shapes-dtype", "shapes-wrong",
        "other-base"])
def test_damaged_lora_json_is_one_line_naming_it(unrolled, saved, tmp_path, change, message):
    bad = Path(shutil.copytree(saved, tmp_path / "ad"))
    text = change(json.loads((bad / "lora.json").read_text()))
    (bad / "lora.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=message) as err:
        load_adapters(bad, unrolled[1])
    assert str(bad / "lora.json") in str(err.value) and "\n" not in str(err.value)


def _largest_data_file(adapters):
    return max((p for p in (adapters / "d").iterdir()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage, error", [
    (lambda a: shutil.rmtree(a), FileNotFoundError),
    (lambda a: (a / "manifest.ocdbt").unlink(), ValueError),
    (lambda a: _largest_data_file(a).write_bytes(_largest_data_file(a).read_bytes()[:100]), ValueError),
    (lambda a: _largest_data_file(a).unlink(), ValueError),
    (lambda a: (a / "_METADATA").write_text((a / "_METADATA").read_text()[:50]), ValueError),
], ids=["no-adapters", "no-manifest", "truncated-data", "missing-data", "truncated-metadata"])
def test_missing_or_truncated_adapter_files_are_one_line(unrolled, saved, tmp_path, damage, error):
    bad = Path(shutil.copytree(saved, tmp_path / "ad"))
    damage(bad / "adapters")
    with pytest.raises(error, match="adapters (is missing|cannot be restored)") as err:
        load_adapters(bad, unrolled[1])
    assert str(bad / "adapters") in str(err.value) and "\n" not in str(err.value)


# ---- parity with transformers and peft (PyTorch) ------------------------------------------------


def _torch_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.array(ids), dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module")
def tied():
    params = init_params(TIED, jax.random.key(5))
    ids = jax.random.randint(jax.random.key(6), (2, 11), 0, TIED.vocab_size)
    return params, ids


def test_merged_export_loads_in_transformers(tied, tmp_path):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxgpt.weights.huggingface import save_pretrained

    params, ids = tied
    cfg = lora.LoRAConfig(rank=2, alpha=3.0)
    trainable, frozen = lora.partition(params, cfg, jax.random.key(1))
    merged = lora.combine(_randomize(trainable), frozen, cfg)
    save_pretrained(TIED, merged, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    want = GPT(TIED).apply({"params": merged}, ids)
    np.testing.assert_allclose(_torch_logits(hf, ids), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_cfg, lora_cfg", [
    (TIED, lora.LoRAConfig(rank=2, alpha=3.0)),
    # Query and value only (a partial fused c_attn), one layer's c_fc, the head, rsLoRA scaling.
    (UNTIED, lora.LoRAConfig(rank=3, alpha=5.0, targets=(r"attn/(query|value)/kernel$", "h_1/mlp/c_fc"),
                             include_head=True, rank_stabilized=True, dropout=0.1)),
], ids=["tied-all-projections", "untied-qv-head-rslora"])
def test_peft_export_matches_merged_model(model_cfg, lora_cfg, tmp_path):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from jaxgpt.weights.huggingface import save_pretrained

    params = init_params(model_cfg, jax.random.key(5))
    ids = jax.random.randint(jax.random.key(6), (2, 11), 0, model_cfg.vocab_size)
    trainable, frozen = lora.partition(params, lora_cfg, jax.random.key(1))
    trainable = _randomize(trainable)
    save_pretrained(model_cfg, params, tmp_path / "base")
    export_peft(tmp_path / "adapter", trainable, lora_cfg, model_cfg, str(tmp_path / "base"))
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    n_lora = sum("lora_A" in k for k in model.state_dict())
    assert n_lora == len({k for k in export_peft_keys(tmp_path / "adapter") if "lora_A" in k})
    want = GPT(model_cfg).apply({"params": lora.combine(trainable, frozen, lora_cfg)}, ids)
    assert not np.allclose(want, GPT(model_cfg).apply({"params": params}, ids), atol=1e-3)
    np.testing.assert_allclose(_torch_logits(model, ids), want, rtol=1e-4, atol=1e-4)


def export_peft_keys(directory):
    from safetensors import safe_open

    with safe_open(Path(directory) / "adapter_model.safetensors", framework="numpy") as f:
        return list(f.keys())


def test_peft_export_refuses_what_gpt2_cannot_hold(unrolled, tmp_path):
    cfg, params, trainable, _, _ = unrolled
    with pytest.raises(ValueError, match="trained in full have no PEFT LoRA form"):
        export_peft(tmp_path, trainable, CFG, cfg)
    emb = lora.LoRAConfig(rank=2, targets=("wpe/embedding",))
    tr, _ = lora.partition(params, emb, jax.random.key(0))
    with pytest.raises(ValueError, match="adapter of wpe/embedding to PEFT"):
        export_peft(tmp_path, tr, emb, cfg)


# ---- trainer.fit, single device and an 8-device fsdp mesh -----------------------------------------


def test_fit_on_fsdp_mesh_equals_single_device(tmp_path):
    single = lora_fit.lora_fit(tmp_path / "single")
    assert int(single.state.step) == 3
    assert [r["step"] for r in single.history if r["kind"] == "eval"] == [1, 3]
    # XLA reads the device count when jax starts, so the sharded run needs a process of its own.
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip())
    cmd = [sys.executable, str(WORKER), str(tmp_path), str(tmp_path / "fsdp"), "--fsdp", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "specs.json").read_text())
    assert info["devices"] == 8
    # Adapters (and their Adam moments) shard along the axes of the weight they adapt.
    assert info["specs"]["lora/h_0/attn/query/kernel/a"] == [["fsdp", None]] * 2
    assert info["specs"]["lora/h_1/mlp/c_proj/kernel/b"] == [[None, "fsdp"]] * 2
    sharded = np.load(tmp_path / "trainable.npz")
    ours = lora_fit.flat_host(single.state.params)
    assert set(sharded.files) == set(ours)
    for path, x in ours.items():
        np.testing.assert_allclose(sharded[path], x, rtol=1e-4, atol=1e-6, err_msg=path)
    assert not np.allclose(ours["lora/h_0/attn/query/kernel/b"], 0)
    assert math.isfinite([r for r in single.history if r["kind"] == "train"][-1]["loss"])
