"""Finetuning a classifier as a library call: labelled text -> `trainer.fit` -> a saved classifier.

The run directory holds what `load_classifier` needs: config.yaml (with the resolved model shape
and max_length), labels.json (class names, id = position), the trainable parameters in fit's
Orbax checkpoints, and, when part of the model is frozen, that part once in `frozen/` (so the run
does not depend on where its base weights came from, and a resumed run uses the same ones); a
Llama 3 / Qwen3 base's tokenizer files are copied into `tokenizer/`. It also holds results.json
(loss and accuracy on every split after training) and the loss and accuracy plots.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.data.windows import num_batches
from jaxgpt.distributed import host_copy, is_lead
from jaxgpt.weights.huggingface import is_family_dir
from jaxgpt.weights.loader import load_model, start_overrides
from jaxgpt.models.model import abstract_params, init_params
from jaxgpt.sharding import with_axes
from jaxgpt.tasks.classification.data import (
    ClassificationData,
    build_datasets,
    default_pad_id,
    load_labels,
    resolve_tokenizer,
    save_labels,
)
from jaxgpt.tasks.classification.model import (
    Classifier,
    ClassifierRunConfig,
    accuracy,
    head_boxed,
    init_head,
    loss_for,
    merge_trainable,
    predict_log_proba,
    restore_tree,
    save_tree,
    split_trainable,
    with_head,
)
from jaxgpt.data.tokenizer import copy_tokenizer_files
from jaxgpt.training.checkpoint import complete_steps
from jaxgpt.training.metrics import read_metrics
from jaxgpt.training.runconfig import ConfigError, config_from_yaml
from jaxgpt.training.rundir import prepare_run_dir, release
from jaxgpt.training.fit import FitOptions, fit
from jaxgpt.training.trainer import FitResult, Trainable


@dataclass
class ClassifierResult:
    fit: FitResult
    classifier: Classifier | None  # None when the run was preempted
    scores: dict  # {split: {"loss", "accuracy", "count"}}


def init_backbone(cfg: ClassifierRunConfig) -> tuple[GPTConfig, dict | None]:
    """(model config, GPT params or None for scratch) from `classifier.init_from`."""
    source = cfg.classifier.init_from
    if source == "scratch":
        return cfg.model, None
    # a Llama/Qwen3 directory also takes the config's layout (scan_layers, tie_embeddings)
    family = is_family_dir(Path(source).expanduser())
    config, params = load_model(source, **(start_overrides(source, cfg.model) if family
                                            else cfg.model.runtime()))
    return config, jax.device_get(params)  # host arrays: fit places them on its mesh


def evaluate(model: Classifier, dataset, limit: int | None = None) -> dict:
    """Mean cross-entropy and accuracy over a dataset's first `limit` examples (all by default)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    logp = predict_log_proba(model, dataset.ids[:n], dataset.mask[:n])  # [N, C]
    labels = dataset.labels[:n]
    return {"loss": float(-np.mean(logp[np.arange(n), labels])),
            "accuracy": float(np.mean(logp.argmax(-1) == labels)), "count": int(n)}


def _check_run_dir(cfg: ClassifierRunConfig, classes: list[str]) -> None:
    """A run directory may only be resumed with the same classes and the same trainable split."""
    saved_cfg, saved_labels = cfg.run_dir / "config.yaml", cfg.run_dir / "labels.json"
    if saved_labels.exists() and load_labels(saved_labels) != classes:
        raise ConfigError(f"run directory {cfg.run_dir} was trained on classes "
                          f"{load_labels(saved_labels)}, not {classes}")
    if saved_cfg.exists():
        old = config_from_yaml(saved_cfg, ClassifierRunConfig).classifier
        for name in ("trainable", "pooling", "lora"):
            if getattr(old, name) != getattr(cfg.classifier, name):
                raise ConfigError(f"run directory {cfg.run_dir} has classifier.{name}="
                                  f"{getattr(old, name)!r}; choose another name or runs_dir")


def _resolve_text_side(cfg: ClassifierRunConfig, model_cfg: GPTConfig):
    """cfg.data with its tokenizer ("gpt2" or the directory of a tokenizer.json) and pad id fixed."""
    tokenizer = resolve_tokenizer(cfg.data.tokenizer, cfg.classifier.init_from, model_cfg.family)
    if tokenizer == "gpt2" and model_cfg.family != "gpt2" and cfg.classifier.init_from != "scratch":
        raise ConfigError(f"classifier.init_from={cfg.classifier.init_from} is a {model_cfg.family} "
                          "model; it reads text with its own tokenizer.json (data.tokenizer=auto "
                          "finds it beside the weights), not GPT-2's")
    pad_id = default_pad_id(tokenizer) if cfg.data.pad_id is None else cfg.data.pad_id
    return dataclasses.replace(cfg.data, tokenizer=tokenizer, pad_id=pad_id)


def _check_vocab(data: ClassificationData, pad_id: int, vocab_size: int) -> None:
    top = max(int(d.ids.max()) for d in (data.train, data.validation, data.test))
    if max(top, pad_id) >= vocab_size:
        raise ValueError(f"token id {max(top, pad_id)} (data.pad_id or a text token) does not fit "
                         f"model.vocab_size={vocab_size}")


def finetune(cfg: ClassifierRunConfig, options: FitOptions = FitOptions()) -> ClassifierResult:
    """Train a classifier on cfg.data from cfg.classifier.init_from (resuming if it can)."""
    model_cfg, gpt_params = init_backbone(cfg)
    data_cfg = _resolve_text_side(cfg, model_cfg)
    data = build_datasets(data_cfg, model_cfg.context_length)
    _check_vocab(data, data_cfg.pad_id, model_cfg.vocab_size)
    per_epoch = num_batches(len(data.train), cfg.train.batch_size)
    train = cfg.train
    if cfg.classifier.eval_each_epoch and per_epoch:
        train = dataclasses.replace(train, eval_freq=per_epoch)
    cfg = dataclasses.replace(cfg, model=model_cfg, train=train,
                              data=dataclasses.replace(data_cfg, max_length=data.max_length))
    _check_run_dir(cfg, data.classes)
    run_dir = prepare_run_dir(cfg)
    try:  # this process writes the run directory until it is done
        if is_lead():
            save_labels(data.classes, run_dir / "labels.json")
            if data_cfg.tokenizer != "gpt2":  # load_classifier reads the run's own copy
                (run_dir / "tokenizer").mkdir(exist_ok=True)
                copy_tokenizer_files(data_cfg.tokenizer, run_dir / "tokenizer")

        k_init, k_head, k_lora = jax.random.split(jax.random.key(cfg.train.seed), 3)
        if gpt_params is None:
            gpt_params = init_params(model_cfg, k_init)
        head = with_axes(init_head(k_head, model_cfg.emb_dim, len(data.classes)),
                         head_boxed(model_cfg.emb_dim, len(data.classes)))
        params = with_head(with_axes(gpt_params, abstract_params(model_cfg)), head)  # boxed: values + axes
        trainable, frozen = split_trainable(params, model_cfg, cfg.classifier, k_lora)
        if frozen is not None:
            if complete_steps(run_dir / "frozen"):  # resuming: exactly the base trained on
                frozen = with_axes(restore_tree(run_dir / "frozen"), frozen)
            else:
                save_tree(nn.meta.unbox(frozen), run_dir / "frozen")
        trainable = Trainable(loss_for(model_cfg, cfg.classifier), params=trainable, frozen=frozen,
                              eval_metrics=accuracy)
        result = fit(cfg, trainable, data.train, data.validation, options)
        if result.preempted:
            return ClassifierResult(result, None, {})

        frozen = None if frozen is None else host_copy(nn.meta.unbox(frozen))
        full = merge_trainable(host_copy(result.state.params), frozen, cfg.classifier)
        model = Classifier(model_cfg, full, tuple(data.classes), cfg.classifier.pooling,
                           data.max_length, data_cfg.tokenizer, data_cfg.pad_id)
        splits = {"train": data.train, "validation": data.validation, "test": data.test}
        scores = {name: evaluate(model, d) for name, d in splits.items()}
        if is_lead():
            (run_dir / "results.json").write_text(json.dumps(scores, indent=1) + "\n")
            # The last point of the curves: the final model on the rows fit evaluates on.
            rows = cfg.train.eval_iter * (cfg.train.batch_size // cfg.optim.accum_steps)
            last = {f"{s}_{k}": v for s, d in (("train", data.train), ("val", data.validation))
                    for k, v in evaluate(model, d, rows).items() if k != "count"}
            steps = int(jax.device_get(result.state.step))
            plot_curves(run_dir, per_epoch, {"step": steps, "tokens_seen": steps * cfg.train.batch_size, **last})
        return ClassifierResult(result, model, scores)
    finally:
        release(run_dir)


def plot_curves(run_dir: str | Path, steps_per_epoch: int, last: dict | None = None) -> list[Path]:
    """The book's figures: loss.png and accuracy.png, train and validation against epochs, with
    examples seen on the top axis (fit counts one target per example)."""
    evals = [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r.get("kind") == "eval"]
    if last is not None and (not evals or evals[-1]["step"] < last["step"]):
        evals.append(last)
    if not evals or steps_per_epoch <= 0:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["step"] / steps_per_epoch for r in evals]
    out = []
    for metric, label in (("loss", "Loss"), ("accuracy", "Accuracy")):
        if f"train_{metric}" not in evals[0]:
            continue
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(epochs, [r[f"train_{metric}"] for r in evals], label=f"Training {metric}")
        ax.plot(epochs, [r[f"val_{metric}"] for r in evals], linestyle="-.",
                label=f"Validation {metric}")
        ax.set_xlabel("Epochs")
        ax.set_ylabel(label)
        ax.legend()
        top = ax.twiny()  # examples seen, aligned with the epochs
        top.plot([r["tokens_seen"] for r in evals], [r[f"train_{metric}"] for r in evals], alpha=0)
        top.set_xlabel("Examples seen")
        fig.tight_layout()
        path = Path(run_dir) / f"{metric}.png"
        fig.savefig(path)
        plt.close(fig)
        out.append(path)
    return out
