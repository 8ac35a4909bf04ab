"""LoRA adapters on disk: adapters-only Orbax checkpoints bound to their base, and PEFT export.

An adapters checkpoint holds only the trainable tree ({"lora": adapters, "full": leaves trained
in full}) plus `lora.json`: the LoRAConfig, a sha256 of the frozen base weights, which of the two
item directories holds the adapters, and the sha256 of each of that item's files. A save writes
the other item directory, then commits by replacing lora.json (a rename), then removes the old
item: a crash at any moment leaves lora.json naming a complete item, the old or the new. Loading
checks every file against its recorded sha256 before Orbax reads it, so a damaged or truncated
file is one line naming it. Adapters
trained on one base are meaningless on another, so loading hashes the base it is given and
refuses a different one. The hash copies every frozen leaf to the host once and runs sha256 over
its bytes in sorted path order (with names, dtypes and shapes), on one core: its time is linear
in the weights' bytes, plus the device-to-host copy on an accelerator (benchmarks/lora.py measures
it; figures in benchmarks/README.md). A scanned and an unrolled copy of the same weights hash
differently, as their adapters differ too.

PEFT export writes `adapter_config.json` + `adapter_model.safetensors` for transformers'
GPT2LMHeadModel, LlamaForCausalLM or Qwen3ForCausalLM (export its base with
`jaxgpt.save_pretrained`); the families' projections map one to one. GPT-2's Conv1D layers
store weights [in, out] (`fan_in_fan_out: true`); PEFT stores lora_A [r, in] and lora_B [out, r]
and scales by lora_alpha / r (rsLoRA: / sqrt(r)). GPT-2 computes query, key and value with one
fused c_attn [D, 3D], so jaxgpt's n adapted ones among them become one c_attn adapter of rank n r:
A = concat(A_q, A_k, A_v) [D, n r] and a block-diagonal B [n r, 3D] whose block j fills only its
projection's D columns, so A @ B = [A_q B_q | A_k B_k | A_v B_v] exactly (zero columns for a
projection without an adapter). `rank_pattern` records that rank and `alpha_pattern` sets that
module's alpha to n alpha (sqrt(n) alpha with rsLoRA) so PEFT's scale equals ours.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import save_file

from jaxgpt.config import GPTConfig
from jaxgpt.entrypoint import quiet_libraries
from jaxgpt.fsutil import sha256_file, write_text_atomic
from jaxgpt.lora.transform import LoRAConfig, adapter_pairs, init
from jaxgpt.models.model import count_params
from jaxgpt.trees import fingerprint, flatten, host_array, unflatten

ADAPTERS, META = "adapters", "lora.json"
ITEMS = (ADAPTERS, "adapters.next")  # a save writes the one lora.json does not name
FORMAT = "jaxgpt-lora"
# jaxgpt block paths -> GPT-2 module suffixes (query/key/value fuse into attn.c_attn).
_MODULES = {"attn/c_proj/kernel": "attn.c_proj", "mlp/c_fc/kernel": "mlp.c_fc",
            "mlp/c_proj/kernel": "mlp.c_proj"}
_QKV = ("query", "key", "value")


def base_fingerprint(params, config: LoRAConfig) -> str:
    """sha256 of the frozen base leaves (those trained in full are left out, present or not)."""
    return fingerprint(params, skip=lambda path: any(re.search(t, path) for t in config.trainable))


def _shapes(tree) -> dict[str, list]:
    return {p: [list(x.shape), str(np.dtype(x.dtype))] for p, x in flatten(tree).items()}


def save_adapters(directory: str | os.PathLike, trainable, config: LoRAConfig, base_params) -> Path:
    """Write the trainable tree and lora.json (config, base hash) to `directory`."""
    directory = Path(directory).absolute()
    # The adapters must be what this config makes of this base (leaves trained in full aside).
    adapters_only = dataclasses.replace(config, trainable=())
    expected = jax.eval_shape(lambda p: init(p, adapters_only, jax.random.key(0)), base_params)
    if _shapes(expected) != _shapes(trainable["lora"]):
        raise ValueError("the adapters do not match what the LoRA config makes of these base params")
    meta = {"format": FORMAT, "version": 1, "lora_config": config.to_dict(),
            "base_sha256": base_fingerprint(base_params, config),
            "num_trainable": count_params(trainable), "shapes": _shapes(trainable)}
    directory.mkdir(parents=True, exist_ok=True)
    old = _committed_item(directory)
    item = ITEMS[1] if old == ITEMS[0] else ITEMS[0]
    if jax.process_index() == 0 and (directory / item).exists():
        shutil.rmtree(directory / item)  # a save that died before its commit
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(directory / item, trainable, force=True)
    ckpt.wait_until_finished()
    ckpt.close()
    if jax.process_index() == 0:  # the commit: lora.json names the new, complete item
        meta.update(adapters=item, files=_file_sums(directory / item))
        write_text_atomic(directory / META, json.dumps(meta, indent=2) + "\n")
        if old is not None and old != item:
            shutil.rmtree(directory / old, ignore_errors=True)
    return directory


def _committed_item(directory: Path) -> str | None:
    """The item directory lora.json names (None: no committed adapters here yet)."""
    try:
        meta = json.loads((directory / META).read_bytes())
    except (OSError, ValueError):
        return None
    item = meta.get("adapters", ADAPTERS) if isinstance(meta, dict) else None
    return item if item in ITEMS else None


def _file_sums(item: Path) -> dict[str, str]:
    return {str(p.relative_to(item)): sha256_file(p) for p in sorted(item.rglob("*")) if p.is_file()}


def _check_files(item: Path, sums: dict) -> None:
    """Every file lora.json recorded, present and with its sha256; one line naming the first not."""
    for rel, digest in sums.items():
        path = item / rel
        if not path.is_file():
            raise ValueError(f"{path} is missing: the adapters checkpoint is incomplete")
        if sha256_file(path) != digest:
            raise ValueError(f"{path} is damaged (its sha256 differs from the one {META} recorded)")


def _read_meta(path: Path) -> tuple[dict, LoRAConfig]:
    """lora.json's checked contents and LoRAConfig; any damage is one line naming the file."""
    try:
        meta = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds {type(meta).__name__}, not a JSON object")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != 1:
        raise ValueError(f"{path} has version {meta.get('version')!r}; this jaxgpt reads version 1")
    lacking = [k for k in ("lora_config", "base_sha256", "shapes") if k not in meta]
    if lacking:
        raise ValueError(f"{path} lacks {', '.join(lacking)}")
    if not isinstance(meta["base_sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", meta["base_sha256"]):
        raise ValueError(f"{path} has base_sha256={meta['base_sha256']!r}; expected 64 hex digits")
    shapes = meta["shapes"]
    if not isinstance(shapes, dict) or not all(_is_shape_entry(v) for v in shapes.values()):
        raise ValueError(f"{path} has no shapes object of path -> [[dims...], dtype]")
    if not isinstance(meta["lora_config"], dict):
        raise ValueError(f"{path} has lora_config={meta['lora_config']!r}; expected an object")
    try:
        config = LoRAConfig.from_dict(meta["lora_config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None
    return meta, config


def _is_shape_entry(entry) -> bool:
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)
            and isinstance(entry[1], str)):
        return False
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry[0]):
        return False
    try:
        np.dtype(entry[1])
    except TypeError:
        return False
    return True


def load_adapters(directory: str | os.PathLike, base_params, shardings=None):
    """(trainable, LoRAConfig) from `save_adapters`; refuses a base other than the one trained on.

    `shardings` is one Sharding or a tree of them (default: the first device).
    """
    directory = Path(directory).absolute()
    meta_path = directory / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} is not a LoRA adapters checkpoint (no {META})")
    meta, config = _read_meta(meta_path)
    found = base_fingerprint(base_params, config)
    if found != meta["base_sha256"]:
        raise ValueError(f"{meta_path}: these adapters were trained on other base weights "
                         f"(sha256 {meta['base_sha256'][:12]}..., given {found[:12]}...)")
    # The recorded adapter shapes must be what the config makes of this (same) base.
    adapters_only = dataclasses.replace(config, trainable=())
    expected = jax.eval_shape(lambda p: init(p, adapters_only, jax.random.key(0)), base_params)
    recorded = {p.removeprefix("lora/"): v for p, v in meta["shapes"].items() if p.startswith("lora/")}
    if _shapes(expected) != recorded:
        raise ValueError(f"{meta_path} records adapter shapes that its LoRA config does not make "
                         "of these base params")
    item = meta.get("adapters", ADAPTERS)
    if item not in ITEMS:
        raise ValueError(f"{meta_path} names adapters={item!r}; expected one of {ITEMS}")
    adapters = directory / item
    if not adapters.is_dir():
        raise FileNotFoundError(f"{adapters} is missing: the adapters checkpoint is incomplete")
    if isinstance(meta.get("files"), dict):  # written by every save since checksums came in
        _check_files(adapters, meta["files"])
    shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0]) if shardings is None else shardings
    target = unflatten({p: jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))
                    for p, (shape, dtype) in meta["shapes"].items()})
    target.setdefault("full", {})  # an empty subtree leaves no paths behind
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, target)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          target, shardings)
    with quiet_libraries():  # a failed restore's asyncio and Orbax noise stays off stderr
        ckpt = ocp.StandardCheckpointer()
        try:
            trainable = ckpt.restore(adapters, target)
        except Exception as err:  # Orbax and tensorstore raise many kinds, each pages long
            lines = str(err).strip().splitlines() or [type(err).__name__]
            raise ValueError(f"{adapters} cannot be restored (missing or damaged files): "
                             f"{lines[0][:300]}") from None
        finally:
            ckpt.close()
    return trainable, config


def _per_layer(trainable, n_layers: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{path: (A [In, r], B [r, Out])} with scanned [L, ...] adapters split into h_<i>/..."""
    out = {}
    for path, (a, b) in adapter_pairs(trainable["lora"]).items():
        a, b = np.asarray(host_array(a), np.float32), np.asarray(host_array(b), np.float32)
        stack, _, rest = path.partition("/")
        layers = [(f"{stack}_{i}/{rest}", a[i], b[i]) for i in range(n_layers)] \
            if stack in ("h", "layers") else [(path, a, b)]
        for p, ai, bi in layers:
            out[p] = (ai.reshape(-1, ai.shape[-1]), bi.reshape(bi.shape[0], -1))
    return out


def peft_modules(trainable, model_config: GPTConfig, rank: int) -> dict[str, tuple]:
    """{GPT-2 module name: (A [in, rank_m], B [rank_m, out])}, q/k/v fused into c_attn."""
    if jax.tree.leaves(trainable["full"]):
        raise ValueError("leaves trained in full have no PEFT LoRA form; export the merged model "
                         "with jaxgpt.save_pretrained instead")
    if model_config.family != "gpt2":
        return _family_modules(trainable, model_config)
    D = model_config.emb_dim
    modules, qkv = {}, {}
    for path, (a, b) in _per_layer(trainable, model_config.n_layers).items():
        m = re.fullmatch(r"h_(\d+)/(.+)", path)
        if path == "lm_head":
            modules["lm_head"] = (a, b)
        elif m and m.group(2) in _MODULES:
            modules[f"transformer.h.{m.group(1)}.{_MODULES[m.group(2)]}"] = (a, b)
        elif m and m.group(2) in {f"attn/{n}/kernel" for n in _QKV}:
            qkv.setdefault(m.group(1), {})[m.group(2).split("/")[1]] = (a, b)
        else:
            raise ValueError(f"cannot export the adapter of {path} to PEFT: GPT-2 has no LoRA "
                             "module for it")
    for i, parts in qkv.items():
        names = [n for n in _QKV if n in parts]
        fused_a = np.concatenate([parts[n][0] for n in names], axis=1)  # [D, n r]
        fused_b = np.zeros((len(names) * rank, 3 * D), np.float32)  # [n r, 3D]
        for j, n in enumerate(names):
            col = _QKV.index(n) * D  # c_attn's columns are [q | k | v]
            fused_b[j * rank:(j + 1) * rank, col:col + D] = parts[n][1]
        modules[f"transformer.h.{i}.attn.c_attn"] = (fused_a, fused_b)
    return modules


def _family_modules(trainable, model_config: GPTConfig) -> dict[str, tuple]:
    """{Llama/Qwen3 module name: (A [in, r], B [r, out])}: nn.Linear modules one to one; the
    flattened (heads, K) axes of jaxgpt's kernels are HF's out (q/k/v) and in (o_proj) order."""
    modules = {}
    for path, (a, b) in _per_layer(trainable, model_config.n_layers).items():
        m = re.fullmatch(r"layers_(\d+)/(self_attn|mlp)/(\w+_proj)/kernel", path)
        if path == "lm_head":
            modules["lm_head"] = (a, b)
        elif m:
            modules[f"model.layers.{m.group(1)}.{m.group(2)}.{m.group(3)}"] = (a, b)
        else:
            raise ValueError(f"cannot export the adapter of {path} to PEFT: {model_config.family} "
                             "has no LoRA module for it")
    return modules


def _suffix(name: str) -> str:
    return name if name == "lm_head" else name.split(".", 3)[3]  # transformer.h.<i>.<suffix>


def export_peft(directory: str | os.PathLike, trainable, lora_config: LoRAConfig,
                model_config: GPTConfig, base_model_name_or_path: str | None = None) -> Path:
    """Write adapter_config.json and adapter_model.safetensors that `peft` loads onto GPT-2 (or
    LlamaForCausalLM / Qwen3ForCausalLM for those families)."""
    modules = peft_modules(trainable, model_config, lora_config.rank)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(a.T)  # [r, in]
        tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(b.T)  # [out, r]
    ranks = {name: a.shape[1] for name, (a, _) in modules.items()}
    per_suffix: dict[str, list[str]] = {}
    for name in sorted(ranks):
        per_suffix.setdefault(_suffix(name), []).append(name)
    targets, rank_pattern, alpha_pattern = [], {}, {}
    for suffix, names in per_suffix.items():
        # A suffix adapted in every block, at one rank, is written once; otherwise by full name.
        uniform = (suffix == "lm_head" or len(names) == model_config.n_layers) \
            and len({ranks[n] for n in names}) == 1
        for key in [suffix] if uniform else names:
            targets.append(key)
            rank_m = ranks[names[0] if uniform else key]
            if rank_m != lora_config.rank:
                n = rank_m // lora_config.rank  # fused c_attn: n adapted projections
                rank_pattern[key] = rank_m
                alpha_pattern[key] = lora_config.alpha * (math.sqrt(n) if lora_config.rank_stabilized else n)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora_config.rank, "lora_alpha": lora_config.alpha, "lora_dropout": lora_config.dropout,
        "use_rslora": lora_config.rank_stabilized, "target_modules": targets,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        # GPT-2's Conv1D stores [in, out]; the families' nn.Linear [out, in].
        "fan_in_fan_out": model_config.family == "gpt2", "bias": "none", "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True,
    }
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory
