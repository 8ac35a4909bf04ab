"""Pretraining as a library call: text -> token ids -> windows -> `fit`."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxgpt.data.corpus import load_text, tokenize_cached
from jaxgpt.data.windows import WindowDataset, Windows, split_ids
from jaxgpt.distributed import host_copy
from jaxgpt.models.model import init_params
from jaxgpt.data.shards import ShardDataset
from jaxgpt.data.tokenizer import get_tokenizer
from jaxgpt.training.losses import lm_loss_fn
from jaxgpt.training.runconfig import RunConfig
from jaxgpt.training.fit import FitOptions, fit
from jaxgpt.training.trainer import FitResult, Trainable


def window_datasets(cfg: RunConfig) -> tuple[Windows, Windows]:
    """Train and validation windows: read from token shards (`data.shards`), or of the
    configured text, tokenized once (cached) and held in memory."""
    length = cfg.model.context_length
    stride = cfg.data.stride or length
    if cfg.data.shards:
        return shard_datasets(cfg, length, stride)
    ids = tokenize_cached(load_text(cfg.data.source), cfg.data.tokenizer)
    if ids.size and int(ids.max()) >= cfg.model.vocab_size:
        raise ValueError(
            f"token id {int(ids.max())} from tokenizer {cfg.data.tokenizer!r} does not fit "
            f"model.vocab_size={cfg.model.vocab_size}"
        )
    train_ids, val_ids = split_ids(ids, cfg.data.train_ratio)
    for name, part in (("training", train_ids), ("validation", val_ids)):
        if len(part) < length + 1:
            raise ValueError(
                f"the {name} split has {len(part)} tokens, fewer than context_length + 1 = "
                f"{length + 1}; use more text or a smaller model.context_length"
            )
    return WindowDataset.from_ids(train_ids, length, stride), WindowDataset.from_ids(val_ids, length, stride)


def shard_datasets(cfg: RunConfig, length: int, stride: int) -> tuple[ShardDataset, ShardDataset]:
    """The shard directory's train and validation splits, checked against the model."""
    checks = dict(verify=cfg.data.verify_shards, vocab_size=cfg.model.vocab_size)
    train = ShardDataset(cfg.data.shards, "train", length, stride, **checks)
    val = ShardDataset(cfg.data.shards, "val", length, stride, **checks)
    made_with = train.manifest["tokenizer"]["name"]
    if made_with != cfg.data.tokenizer:
        raise ValueError(f"{cfg.data.shards} was tokenized with {made_with!r}, but "
                         f"data.tokenizer={cfg.data.tokenizer!r}")
    return train, val


def sampler(cfg: RunConfig):
    """fit's `sample`: text from the fixed prompt at each evaluation, drawn as the book's
    chapter 5 does (temperature and top-k; a fixed key per step), so it shows what was learned."""
    if cfg.train.sample_tokens <= 0:
        return None
    import jax

    from jaxgpt.inference.generate import generate

    tok = get_tokenizer(cfg.data.tokenizer)
    prompt = np.asarray([tok.encode(cfg.train.sample_prompt)], np.int32)
    t = cfg.train

    def sample(params, step):
        params = host_copy(params)  # every process gathers; each samples the same text
        out = generate(params, cfg.model, prompt, t.sample_tokens, temperature=t.sample_temperature,
                       top_k=t.sample_top_k, key=jax.random.fold_in(jax.random.key(t.seed), step))
        return {"sample": tok.decode(np.asarray(out)[0].tolist()).replace("\n", " ")}

    return sample


def evaluation_extras(cfg: RunConfig):
    """fit's `sample`: the text sample and, with `data.hellaswag`, the HellaSwag scores, added to
    each evaluation record (metrics.jsonl)."""
    parts = [sampler(cfg)]
    if cfg.data.hellaswag:
        from jaxgpt.tasks.hellaswag import evaluator

        parts.append(evaluator(cfg.data.hellaswag, cfg.model, cfg.data.hellaswag_examples))
    if cfg.data.harness_tasks:
        parts.append(harness_evaluator(cfg))
    parts = [p for p in parts if p is not None]
    if not parts:
        return None

    def extras(params, step):
        record = {}
        for part in parts:
            record.update(part(params, step) or {})
        return record

    return extras


def harness_evaluator(cfg: RunConfig):
    """The `data.harness_tasks` scores (lm-evaluation-harness) for each evaluation record; the
    jaxgpt_hellaswag task reads `data.hellaswag` when it is set."""
    from jaxgpt.tasks.harness.run import evaluator  # needs lm-eval (jaxgpt[eval]): only when asked

    d = cfg.data
    tasks = [t.strip() for t in d.harness_tasks.split(",") if t.strip()]
    metadata = {"hellaswag_file": d.hellaswag} if d.hellaswag else None
    return evaluator(tasks, cfg.model, tokenizer=d.tokenizer, limit=d.harness_limit,
                     include_path=[d.harness_include] if d.harness_include else [], metadata=metadata)


def pretrain(cfg: RunConfig, options: FitOptions = FitOptions()) -> FitResult:
    """Train cfg.model from scratch on cfg.data (resuming from the run directory if it can);
    the evaluations sample text unless `options` brings its own `sample`."""
    train, val = window_datasets(cfg)
    if options.sample is None:
        options = dataclasses.replace(options, sample=evaluation_extras(cfg))
    trainable = Trainable(lm_loss_fn(cfg.model), init=lambda key: init_params(cfg.model, key, boxed=True))
    return fit(cfg, trainable, train, val, options)
