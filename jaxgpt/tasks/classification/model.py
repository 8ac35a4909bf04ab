"""Text classification (chapter 6): a class head on a GPT's pooled hidden states, and its use.

The classifier's parameters are the GPT's minus `lm_head`, plus `cls_head` {kernel [D, C], bias
[C]}; the GPT runs with `return_hidden=True`, one position per row is pooled and the head maps it
to C class logits. Padding sits on the right and attention is causal, so real tokens never attend
to padding and the default pooling, the last real token, sees the whole text. The book pools the
last position, which for a padded row is a padding token (it still works: that position attends
to the whole text); "mean" averages the real tokens.

What trains ("trainable"): "book", the last block, the final norm and the head (GPT-2's h_<L-1>,
ln_f; Llama 3 / Qwen3's layers_<L-1>, norm), everything else frozen (passed to `fit` as
`frozen`, so it gets no gradients and no optimizer state); with scanned layers the stack is
sliced, its last layer training as "<stack>_last" and put back on top of the frozen ones in the
loss (a copy of the stack per step); "all"; or "lora", rank-r adapters (`jaxgpt.lora.transform`) plus the
head trained in full.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgpt.lora import transform as lora
from jaxgpt.checks import NON_EMPTY, check_fields, one_of
from jaxgpt.config import GPTConfig
from jaxgpt.weights.loader import is_run_dir, read_run_yaml
from jaxgpt.lora.transform import LoRAConfig
from jaxgpt.models.model import GPT
from jaxgpt.weights.runs import (  # save_tree: finetune.py imports it from here
    CheckpointError,
    read_latest_verified,
    restore_tree,
    save_tree,  # noqa: F401
    verify,
)
from jaxgpt.tasks.classification.data import (
    ClassifierDataConfig,
    default_pad_id,
    encode_texts,
    load_labels,
    pad_batch,
)
from jaxgpt.training.runconfig import RunConfig, config_from_yaml

POOLINGS = ("last_real", "last_position", "mean")
TRAINABLE = ("book", "all", "lora")
HEAD = "cls_head"


@dataclass(frozen=True)
class ClassifierConfig:
    # "scratch", a GPT-2 name (gpt2, gpt2-medium, ...), a local Hugging Face directory (GPT-2,
    # Llama 3 or Qwen3), or a jaxgpt pretraining or instruction run directory
    init_from: str = "scratch"
    pooling: str = "last_real"  # "last_real" | "last_position" (the book's) | "mean"
    trainable: str = "book"  # "book" | "all" | "lora"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    eval_each_epoch: bool = True  # evaluate once per epoch (sets train.eval_freq to an epoch)

    def __post_init__(self):
        check_fields(self, {"init_from": NON_EMPTY, "pooling": one_of(*POOLINGS),
                            "trainable": one_of(*TRAINABLE)})


@dataclass(frozen=True)
class ClassifierRunConfig(RunConfig):
    """A RunConfig whose `data` is labelled text, plus the `classifier` section."""

    data: ClassifierDataConfig = field(default_factory=ClassifierDataConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)


# ---- the model -----------------------------------------------------------------------------


def pool(hidden: jax.Array, mask: jax.Array, pooling: str = "last_real") -> jax.Array:
    """One vector per row [B, D] from hidden states [B, T, D] and the real-token mask [B, T]."""
    if pooling == "last_position":
        return hidden[:, -1]
    if pooling == "last_real":
        last = jnp.sum(mask, axis=1) - 1  # [B]: padding is on the right
        return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
    if pooling == "mean":
        w = mask.astype(hidden.dtype)[..., None]  # [B, T, 1]
        return jnp.sum(hidden * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def head_boxed(emb_dim: int, num_classes: int) -> dict:
    """The head's abstract leaves with logical axes (kernel ("embed", None), bias (None,))."""
    box = lambda shape, names: nn.LogicallyPartitioned(  # noqa: E731
        jax.ShapeDtypeStruct(shape, jnp.float32), names)
    return {"kernel": box((emb_dim, num_classes), ("embed", None)), "bias": box((num_classes,), (None,))}


def init_head(key: jax.Array, emb_dim: int, num_classes: int) -> dict:
    """A fresh head: kernel N(0, 0.02) like the GPT's matrices, zero bias."""
    kernel = 0.02 * jax.random.normal(key, (emb_dim, num_classes), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}


def with_head(gpt_params: dict, head: dict) -> dict:
    """Classifier params: the GPT's without `lm_head`, plus `cls_head`."""
    return {**{k: v for k, v in gpt_params.items() if k != "lm_head"}, HEAD: head}


def classifier_logits(config: GPTConfig, pooling: str = "last_real"):
    """`apply(params, ids, mask, deterministic=True, rng=None) -> logits [B, C]` in float32."""
    model = GPT(config)

    def apply(params, ids, mask, deterministic=True, rng=None):
        backbone = {k: v for k, v in params.items() if k != HEAD}
        rngs = {} if rng is None else {"dropout": rng}
        hidden = model.apply({"params": backbone}, ids, deterministic, return_hidden=True,
                             rngs=rngs)  # [B, T, D]
        head = params[HEAD]
        return pool(hidden, mask, pooling) @ head["kernel"] + head["bias"]  # [B, C]

    return apply


def classification_loss_fn(config: GPTConfig, pooling: str = "last_real"):
    """fit's loss: summed cross-entropy over examples; aux = per-example correctness [B]."""
    apply = classifier_logits(config, pooling)

    def loss_fn(params, frozen, batch, rng, deterministic):
        full = params if frozen is None else _join(params, frozen)
        logits = apply(full, batch["inputs"], batch["mask"], deterministic, rng)
        labels = batch["targets"][:, 0]  # [B]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
        return jnp.sum(losses), correct

    return loss_fn


def accuracy(results: list[dict]) -> dict:
    """fit's eval_metrics: the fraction of examples classified right over eval_step outputs."""
    correct = sum(float(np.sum(r["aux"])) for r in results)
    count = sum(int(r["count"]) for r in results)
    return {"accuracy": correct / max(count, 1)}


# ---- what trains ---------------------------------------------------------------------------


def _lora_config(cfg: ClassifierConfig) -> lora.LoRAConfig:
    return dataclasses.replace(cfg.lora, trainable=cfg.lora.trainable + (f"^{HEAD}/",))


def _book_names(config: GPTConfig) -> tuple[str, str]:
    """(block prefix or scanned stack, final norm): GPT-2's h / ln_f, Llama 3 / Qwen3's layers /
    norm (their Hugging Face names)."""
    return ("h", "ln_f") if config.family == "gpt2" else ("layers", "norm")


def _book_keys(config: GPTConfig) -> set[str]:
    """The top-level keys "book" trains whole: the last block, the final norm and the head (a
    scanned stack of several layers is sliced instead, see split_trainable)."""
    block, norm = _book_names(config)
    if config.scan_layers:
        return {block, norm, HEAD} if config.n_layers == 1 else {norm, HEAD}
    return {f"{block}_{config.n_layers - 1}", norm, HEAD}


LAST = "_last"  # "book" with a scanned stack trains its last layer as "<stack>_last" [1, ...]


def _slice(leaf, part: slice):
    """leaf[part] along the stacked L axis, for values, abstract leaves and their boxes."""
    if isinstance(leaf, nn.LogicallyPartitioned):
        return leaf.replace_boxed(_slice(leaf.value, part))
    if isinstance(leaf, jax.ShapeDtypeStruct):
        n = len(range(*part.indices(leaf.shape[0])))
        return jax.ShapeDtypeStruct((n, *leaf.shape[1:]), leaf.dtype)
    return leaf[part]


def _is_box(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def split_trainable(params, config: GPTConfig, cfg: ClassifierConfig, key=None):
    """(trainable, frozen) of classifier params (or boxed abstract ones when key is None)."""
    if cfg.trainable == "all":
        return params, None
    if cfg.trainable == "lora":
        if key is None:
            return lora.boxed_trees(params, _lora_config(cfg))
        return lora.partition(params, _lora_config(cfg), key)
    keys = _book_keys(config)
    trainable = {k: v for k, v in params.items() if k in keys}
    frozen = {k: v for k, v in params.items() if k not in keys}
    stack = _book_names(config)[0]
    if config.scan_layers and config.n_layers > 1:  # layers [L-1] frozen, the last [1] trains
        frozen[stack] = jax.tree.map(lambda x: _slice(x, slice(None, -1)), params[stack], is_leaf=_is_box)
        trainable[stack + LAST] = jax.tree.map(lambda x: _slice(x, slice(-1, None)), params[stack],
                                               is_leaf=_is_box)
    return trainable, frozen


def _join(trainable, frozen):
    """The book split's full params: a scanned stack's last layer put back under its frozen ones."""
    full = {**frozen, **{k: v for k, v in trainable.items() if not k.endswith(LAST)}}
    for k in trainable:
        if k.endswith(LAST):
            stack = k[:-len(LAST)]
            full[stack] = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), frozen[stack], trainable[k])
    return full


def merge_trainable(trainable, frozen, cfg: ClassifierConfig):
    """The full classifier params of a (trainable, frozen) pair."""
    if frozen is None:
        return trainable
    if cfg.trainable == "lora":
        return lora.combine(trainable, frozen, _lora_config(cfg))
    return _join(trainable, frozen)


def loss_for(config: GPTConfig, cfg: ClassifierConfig):
    """The loss fit trains with for the chosen trainable split."""
    base = classification_loss_fn(config, cfg.pooling)
    return lora.lora_loss_fn(base, _lora_config(cfg)) if cfg.trainable == "lora" else base


# ---- saved classifiers ---------------------------------------------------------------------


@dataclass(frozen=True)
class Classifier:
    """A trained classifier ready for `classify`."""

    config: GPTConfig
    params: Any
    labels: tuple[str, ...]
    pooling: str
    max_length: int
    tokenizer: str = "gpt2"  # or the directory of a Llama/Qwen3 tokenizer.json (the run's copy)
    pad_id: int = 50256


def load_classifier(run_dir: str | Path) -> Classifier:
    """The classifier of a `finetune` run directory (latest checkpoint, label mapping, settings)."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    if "classifier" not in read_run_yaml(run_dir):  # before the schema names keys it lacks
        raise CheckpointError(f"{run_dir} is not a classifier run; its model predicts tokens "
                              "(load it with jaxgpt.load_model)")
    cfg = config_from_yaml(run_dir / "config.yaml", ClassifierRunConfig)
    tokenizer = cfg.data.tokenizer  # "gpt2" (also runs saved before "auto"), or the run's copy
    if (run_dir / "tokenizer" / "tokenizer.json").is_file():
        tokenizer = str(run_dir / "tokenizer")
    elif tokenizer == "auto":
        tokenizer = "gpt2"
    trainable, _ = read_latest_verified(run_dir / "checkpoints")
    frozen = None
    if (run_dir / "frozen").is_dir():
        frozen = restore_tree(run_dir / "frozen")
        verify(frozen, None, f"the frozen base in {run_dir / 'frozen'}")
    params = merge_trainable(trainable, frozen, cfg.classifier)
    return Classifier(cfg.model, params, tuple(load_labels(run_dir / "labels.json")),
                      cfg.classifier.pooling, cfg.data.max_length or cfg.model.context_length,
                      tokenizer, default_pad_id(tokenizer) if cfg.data.pad_id is None else cfg.data.pad_id)


@functools.lru_cache(maxsize=8)
def _log_probabilities_fn(config: GPTConfig, pooling: str):
    apply = classifier_logits(config, pooling)
    return jax.jit(lambda p, ids, mask: jax.nn.log_softmax(apply(p, ids, mask), axis=-1))


def predict_log_proba(model: Classifier, ids: np.ndarray, mask: np.ndarray,
                      batch_size: int = 32) -> np.ndarray:
    """Class log-probabilities [N, C] of padded token rows, in fixed-size batches (one compile)."""
    fn = _log_probabilities_fn(model.config, model.pooling)
    out = []
    for start in range(0, len(ids), batch_size):
        chunk, m = ids[start:start + batch_size], mask[start:start + batch_size]
        short = batch_size - len(chunk)  # fill the last batch with copies of its first row
        chunk, m = (np.concatenate([x, np.repeat(x[:1], short, 0)]) for x in (chunk, m))
        out.append(np.asarray(fn(model.params, chunk, m))[:batch_size - short])
    return np.concatenate(out) if out else np.zeros((0, len(model.labels)), np.float32)


def classify(model: Classifier, texts: list[str], batch_size: int = 32) -> tuple[list[str], np.ndarray]:
    """(label per text, class probabilities [N, C]); texts longer than the model's are truncated."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    empty = next((i for i, t in enumerate(texts) if not t.strip()), None)
    if empty is not None:
        raise ValueError(f"text {empty} is empty")
    ids = encode_texts(texts, model.tokenizer)
    if any(max(x) >= model.config.vocab_size for x in ids):
        raise ValueError(f"a token id does not fit the model's vocab_size={model.config.vocab_size}")
    ids, mask = pad_batch(ids, model.max_length, model.pad_id, "input")
    probs = np.exp(predict_log_proba(model, ids, mask, batch_size))
    return [model.labels[i] for i in probs.argmax(-1)], probs
