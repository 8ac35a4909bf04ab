"""Import/export against transformers' GPT-2 (PyTorch), on random tiny models of each family."""

import json
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxgpt import GPT, GPTConfig, init_params
from jaxgpt.weights.huggingface import load_pretrained, save_pretrained, to_hf_tensors

# GPT-2's four shapes scaled down, keeping each family's flavour of heads to layers
# (12:12, 16:24, 20:36, 25:48); within a family every size differs from every other.
FAMILIES = {
    "small": dict(vocab_size=67, n_positions=23, n_embd=20, n_head=4, n_layer=3),  # K=5, F=80
    "medium": dict(vocab_size=71, n_positions=19, n_embd=18, n_head=3, n_layer=5),  # K=6, F=72
    "large": dict(vocab_size=59, n_positions=29, n_embd=35, n_head=5, n_layer=9),  # K=7, F=140
    "xl": dict(vocab_size=61, n_positions=31, n_embd=33, n_head=3, n_layer=6),  # K=11, F=132
}


def _hf_model(seed, **shape):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**shape, initializer_range=0.2, bos_token_id=None,
                                     eos_token_id=None)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # LayerNorms and biases start at 1 and 0: make every tensor distinct
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def _logits(config, params, ids):
    return jax.jit(GPT(config).apply)({"params": params}, jnp.asarray(ids))  # one compile, not one per op


def _ids(config_or_vocab, shape, seed=0):
    vocab = getattr(config_or_vocab, "vocab_size", config_or_vocab)
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (directory, transformers model); `medium_untied` has its own lm_head."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for seed, (name, shape) in enumerate(FAMILIES.items()):
        out[name] = _hf_model(seed, **shape)
    out["medium_untied"] = _hf_model(7, **FAMILIES["medium"], tie_word_embeddings=False)
    dirs = {}
    for name, model in out.items():
        model.save_pretrained(root / name, safe_serialization=True)
        dirs[name] = (root / name, model)
    return dirs


@pytest.mark.parametrize("name, overrides", [("small", {}), ("medium", {}), ("medium_untied", {}),
                                             ("large", dict(scan_layers=True)), ("xl", {})])
@pytest.mark.parametrize("kernel_set", ["auto", "reference"])
def test_logits_match_transformers(checkpoints, name, overrides, kernel_set):
    path, model = checkpoints[name]
    config, params = load_pretrained(path, dtype="float32", kernels=kernel_set, **overrides)
    assert config.tie_embeddings == (name != "medium_untied")
    assert ("lm_head" in params) == (name == "medium_untied")
    ids = _ids(config, (2, config.context_length))
    ours = _logits(config, params, ids)
    np.testing.assert_allclose(ours, _torch_logits(model, ids), atol=1e-4, rtol=0)


def _cross_entropy_torch(model, ids, targets):
    logits = model(torch.tensor(ids, dtype=torch.long)).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.tensor(targets).long().flatten())


@pytest.mark.parametrize("name", ["small", "medium_untied"])
@pytest.mark.parametrize("kernel_set", ["auto", "reference"])
def test_gradients_match_transformers(checkpoints, name, kernel_set):
    path, model = checkpoints[name]
    config, params = load_pretrained(path, dtype="float32", kernels=kernel_set)
    ids, targets = _ids(config, (2, 9), seed=1), _ids(config, (2, 9), seed=2)

    def loss_fn(p):
        logits = GPT(config).apply({"params": p}, jnp.asarray(ids))
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1).mean()

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    model.zero_grad()
    torch_loss = _cross_entropy_torch(model, ids, targets)
    torch_loss.backward()
    np.testing.assert_allclose(loss, torch_loss.item(), rtol=1e-5)
    ours = to_hf_tensors(config, grads)  # through the same name table as export
    theirs = {k: p.grad.numpy() for k, p in model.named_parameters()}
    assert set(ours) == set(theirs)
    for key, grad in theirs.items():
        np.testing.assert_allclose(ours[key], grad, atol=2e-5, rtol=1e-4, err_msg=key)


@pytest.mark.parametrize("name", ["small", "medium_untied"])
def test_export_loads_in_transformers_with_same_logits(checkpoints, tmp_path, name):
    path, model = checkpoints[name]
    config, params = load_pretrained(path, dtype="float32")
    save_pretrained(config, params, tmp_path)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    tied = name != "medium_untied"
    assert reloaded.config.tie_word_embeddings == tied
    # transformers 5 keeps an untied head separate (its own storage), and ties a tied one.
    same_storage = reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()
    assert same_storage == tied
    ids = _ids(config, (2, 11), seed=3)
    np.testing.assert_allclose(_torch_logits(reloaded, ids), _torch_logits(model, ids), atol=1e-6)


def test_export_without_qkv_bias_writes_zero_biases(tmp_path):
    config = GPTConfig(vocab_size=53, context_length=13, emb_dim=14, n_heads=2, n_layers=3,
                       qkv_bias=False, tie_embeddings=False, drop_rate=0.0, dtype="float32")
    params = init_params(config, jax.random.key(4))
    save_pretrained(config, params, tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="numpy") as f:
        assert not f.get_tensor("transformer.h.1.attn.c_attn.bias").any()
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = _ids(config, (2, 13), seed=5)
    np.testing.assert_allclose(_logits(config, params, ids), _torch_logits(reloaded, ids), atol=1e-4)


def test_scanned_params_export_and_reload(checkpoints, tmp_path):
    path, _ = checkpoints["large"]
    config, params = load_pretrained(path, scan_layers=True)
    assert params["h"]["attn"]["query"]["kernel"].shape == (9, 35, 5, 7)  # [L, D, H, K]
    save_pretrained(config, params, tmp_path)
    plain_config, plain = load_pretrained(tmp_path)
    _, original = load_pretrained(path)
    assert not plain_config.scan_layers
    jax.tree.map(np.testing.assert_array_equal, plain, original)


def _tensors(path):
    with safe_open(path / "model.safetensors", framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_sharded_prefixless_checkpoint_with_buffers(checkpoints, tmp_path):
    path, _ = checkpoints["small"]
    tensors = {k.removeprefix("transformer."): v for k, v in _tensors(path).items()}
    for i in range(3):  # the causal-mask buffers that old GPT-2 files carry
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 23, 23), np.float32))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / file, metadata={"format": "pt"})
    index = {"weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(path / "config.json", tmp_path / "config.json")
    _, sharded = load_pretrained(tmp_path)
    _, single = load_pretrained(path)
    jax.tree.map(np.testing.assert_array_equal, sharded, single)


def test_hub_names_resolve_through_the_cache(checkpoints, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(checkpoints["small"][0])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    config, _ = load_pretrained("gpt2-medium")
    assert config.emb_dim == 20
    repo, kwargs = calls[0]
    assert repo == "openai-community/gpt2-medium"
    assert {"config.json", "model.safetensors"} <= set(kwargs["allow_patterns"])
    assert not any(p.endswith((".bin", ".pt", ".pth", ".ckpt")) for p in kwargs["allow_patterns"])


def _broken_copy(src, dst, change):
    tensors = _tensors(src)
    hf_config = json.loads((src / "config.json").read_text())
    change(tensors, hf_config)
    dst.mkdir()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(hf_config))
    return dst


def _set(key, value):
    return lambda t, c: t.__setitem__(key, value)


def _nan(t, c):
    t["transformer.wpe.weight"][3, 4] = np.nan


@pytest.mark.parametrize("change, message", [
    (_set("transformer.h.1.mlp.c_fc.weight", np.zeros((20, 79), np.float32)),
     r"h\.1\.mlp\.c_fc\.weight has shape \(20, 79\) in model\.safetensors, but .*config\.json "
     r"describes \(20, 80\): config\.json and the weights disagree"),
    (lambda t, c: t.pop("transformer.h.2.ln_2.bias"), r"missing \['h\.2\.ln_2\.bias'\]"),
    (_set("transformer.h.0.attn.rotary.weight", np.zeros(3, np.float32)),
     r"unexpected \['h\.0\.attn\.rotary\.weight'\]"),
    (_nan, r"wpe\.weight holds NaN"),
    (lambda t, c: c.update(tie_word_embeddings=False), r"missing \['lm_head\.weight'\]"),
    (lambda t, c: c.update(activation_function="relu"), "activation_function='relu'"),
    (lambda t, c: c.update(n_layer=4), r"missing \['h\.3\.attn\.c_attn\.bias'"),
    (lambda t, c: c.pop("n_embd"), "config.json lacks n_embd"),
])
def test_bad_checkpoints_name_the_problem(checkpoints, tmp_path, change, message):
    bad = _broken_copy(checkpoints["small"][0], tmp_path / "bad", change)
    with pytest.raises(ValueError, match=message):
        load_pretrained(bad)


def _one_line_naming(err, path):
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage", [
    lambda b: b[:-7],  # the last tensor cut short
    lambda b: b[:5],  # the 8-byte header length cut short
    lambda b: b"",
    lambda b: np.random.default_rng(0).bytes(len(b)),  # random bytes of the same size
], ids=["truncated", "cut-header", "empty", "random"])
def test_corrupt_weights_file_is_one_line_naming_it(checkpoints, tmp_path, damage):
    bad = _copy(checkpoints["small"][0], tmp_path / "bad")
    weights = bad / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(ValueError, match="is not a readable safetensors file") as err:
        load_pretrained(bad)
    _one_line_naming(err, weights)


@pytest.mark.parametrize("index, error, message", [
    ("{not json", ValueError, "is not valid JSON"),
    ("[1, 2]", ValueError, "has no weight_map object"),
    ('{"metadata": {}}', ValueError, "has no weight_map object"),
    ('{"weight_map": {"wte.weight": 3}}', ValueError, "has no weight_map object"),
    ('{"weight_map": {"wte.weight": "../small/model.safetensors"}}', ValueError,
     r"shard\(s\) outside its directory: \.\./small/model\.safetensors"),
    ('{"weight_map": {"wte.weight": "model-00002-of-00002.safetensors"}}', FileNotFoundError,
     r"shard\(s\) missing from .*: model-00002-of-00002\.safetensors"),
], ids=["not-json", "array", "no-weight-map", "non-string-shard", "outside", "missing-shard"])
def test_bad_shard_index_is_one_line_naming_it(checkpoints, tmp_path, index, error, message):
    src = checkpoints["small"][0]
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(src / "config.json", bad / "config.json")
    shutil.copy(src / "model.safetensors", bad / "model-00001-of-00002.safetensors")
    (bad / "model.safetensors.index.json").write_text(index)
    with pytest.raises(error, match=message) as err:
        load_pretrained(bad)
    _one_line_naming(err, bad / "model.safetensors.index.json")


@pytest.mark.parametrize("text, message", [
    ("{oops", "is not valid JSON"),
    (b"\xff\xfe\x00", "is not valid JSON"),
    ("[1, 2]", "holds an array, not a JSON object"),
    ("42", "holds a number, not a JSON object"),
    ("{}", "lacks vocab_size, n_positions, n_embd, n_head, n_layer"),
    ({"n_embd": "20"}, "has n_embd='20'; expected a positive integer"),
    ({"n_layer": 2.5}, "has n_layer=2.5; expected a positive integer"),
    ({"tie_word_embeddings": "false"}, "has tie_word_embeddings='false'; expected true or false"),
    ({"n_head": 3}, "emb_dim=20 is not divisible by n_heads=3"),  # the file contradicts itself
], ids=["not-json", "not-utf8", "array", "number", "empty", "string-size", "float-size",
        "string-flag", "indivisible"])
def test_bad_config_json_is_one_line_naming_it(checkpoints, tmp_path, text, message):
    src = checkpoints["small"][0]
    bad = _copy(src, tmp_path / "bad")
    if isinstance(text, dict):
        text = json.dumps({**json.loads((src / "config.json").read_text()), **text})
    (bad / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=message) as err:
        load_pretrained(bad)
    _one_line_naming(err, bad / "config.json")


def test_pickle_checkpoints_are_refused_unread(checkpoints, tmp_path, monkeypatch):
    path, model = checkpoints["small"]
    shutil.copy(path / "config.json", tmp_path / "config.json")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle was read")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(ValueError, match=r"only pickle checkpoint\(s\) \(pytorch_model\.bin\).*safetensors"):
        load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a pickle checkpoint"):
        load_pretrained(tmp_path / "pytorch_model.bin")


def test_missing_things_are_named(checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a directory nor one of"):
        load_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_pretrained(tmp_path)
    shutil.copy(checkpoints["small"][0] / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        load_pretrained(tmp_path)


def test_config_overrides(checkpoints):
    path, model = checkpoints["small"]
    with pytest.raises(ValueError, match="cannot override n_layers=2"):
        load_pretrained(path, n_layers=2)
    with pytest.raises(ValueError, match="exceeds the checkpoint's 23 positions"):
        load_pretrained(path, context_length=24)
    config, params = load_pretrained(path, tie_embeddings=False, context_length=11, drop_rate=0.1,
                                     dtype="float32")
    assert (config.tie_embeddings, config.context_length, config.drop_rate) == (False, 11, 0.1)
    assert params["wpe"]["embedding"].shape == (11, 20)
    np.testing.assert_array_equal(params["lm_head"], params["wte"]["embedding"].T)  # untied copy
    ids = _ids(config, (2, 11), seed=6)
    np.testing.assert_allclose(_logits(config, params, ids), _torch_logits(model, ids), atol=1e-4)
    untied_path, _ = checkpoints["medium_untied"]
    with pytest.raises(ValueError, match="cannot override tie_embeddings=True"):
        load_pretrained(untied_path, tie_embeddings=True)


def test_a_differing_head_under_a_tied_config_stays_untied(checkpoints, tmp_path):
    src = checkpoints["medium_untied"][0]
    bad = _broken_copy(src, tmp_path / "mixed", lambda t, c: c.update(tie_word_embeddings=True))
    config, params = load_pretrained(bad)
    assert not config.tie_embeddings
    np.testing.assert_array_equal(params["lm_head"], _tensors(src)["lm_head.weight"].T)


def test_save_replaces_atomically(checkpoints, tmp_path, monkeypatch):
    config, params = load_pretrained(checkpoints["small"][0])
    save_pretrained(config, params, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("jaxgpt.weights.hf_files.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(config, jax.tree.map(lambda x: x + 1, params), tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_save_rejects_params_of_another_shape(checkpoints, tmp_path):
    config, params = load_pretrained(checkpoints["small"][0])
    with pytest.raises(ValueError, match=r"param h_0/attn/c_proj/bias has shape \(20,\), expected \(21,\)"):
        save_pretrained(config.replace(emb_dim=21, n_heads=3), params, tmp_path)
    with pytest.raises(ValueError, match=r"unexpected \['lm_head'\]"):
        save_pretrained(config, dict(params, lm_head=params["wte"]["embedding"].T), tmp_path)
