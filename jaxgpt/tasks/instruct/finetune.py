"""Instruction finetuning (chapter 7) as a library call: records -> prompts -> batches -> `fit`.

`instruct.init_from` picks the starting weights: a GPT-2 hub name or a local Hugging Face
directory (`load_pretrained`), a jaxgpt run directory (its exported `model/` if it has one, else
its latest checkpoint), or "scratch". The model's shape comes from that source; the `model`
section contributes only what does not change the weights' layout (dropout, dtype, attention
kernel, remat), plus scan_layers and tie_embeddings for Hugging Face weights (the default
untied head is a copy of the embedding, as in the book). A `lora` section trains adapters only.

After training, in the run directory: `model/` (config.json + model.safetensors, LoRA merged, so
`python -m jaxgpt.cli.chat --model RUN_DIR` and `load_pretrained` read it), `test_responses.json`
(each test record with `model_response` and `ended`: whether it emitted end-of-text in time)
and `instruct_summary.json` (validation loss before and after, the share of responses that ended).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Optional

import flax.linen as nn
import jax
import numpy as np

from jaxgpt.lora import transform as lora
from jaxgpt.checks import (
    FRACTION,
    NON_EMPTY,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    Rule,
    check_fields,
    one_of,
    optional,
)
from jaxgpt.config import GPTConfig
from jaxgpt.distributed import host_copy, is_lead
from jaxgpt.fsutil import write_json_atomic
from jaxgpt.weights.huggingface import save_pretrained
from jaxgpt.weights.loader import load_model, start_overrides
from jaxgpt.lora.transform import LoRAConfig
from jaxgpt.models.model import abstract_params, init_params
from jaxgpt.sharding import with_axes
from jaxgpt.tasks.instruct.data import (
    IGNORE,
    InstructDataset,
    load_records,
    split_records,
)
from jaxgpt.data.prompts import TEMPLATES, ChatTemplate, get_template
from jaxgpt.tasks.instruct.responses import generate_responses
from jaxgpt.data.tokenizer import (
    EOT_ID,
    copy_tokenizer_files,
    get_tokenizer,
    load_family_tokenizer,
    tokenizer_dir,
)
from jaxgpt.training.losses import lm_loss_fn
from jaxgpt.training.runconfig import ConfigError, RunConfig
from jaxgpt.training.rundir import acquire, release
from jaxgpt.training.step import eval_step
from jaxgpt.training.fit import FitOptions, fit
from jaxgpt.training.trainer import FitResult, Trainable


@dataclass(frozen=True)
class InstructConfig:
    """Where the data and weights come from, the prompt format, collation and responses."""

    init_from: str = "scratch"  # a GPT-2 name, an HF directory, a jaxgpt run directory, "scratch"
    data: str = "instruction-data"  # a .json/.jsonl file, a named data set, or "hf:<path>[:<config>]"
    hf_split: str = "train"  # the split of an hf: source
    instruction_column: str = "instruction"
    input_column: Optional[str] = "input"  # null: the source has no input column
    output_column: str = "output"
    # alpaca or phi3 (GPT-2's tokenizer), or chat: a Llama 3 / Qwen3 model's own chat template
    # and tokenizer, read from init_from's directory (tokenizer.json, chat_template.jinja)
    template: str = "alpaca"
    train_frac: float = 0.85  # the book's split: train, then test, then the rest for validation
    test_frac: float = 0.10
    shuffle: bool = False  # split after a seeded shuffle instead of in file order
    split_seed: int = 123
    allowed_max_length: Optional[int] = None  # tokens per example; default the model's context
    mask_prompt: bool = False  # learn only the response (targets in the prompt are ignored)
    bucket: Optional[int] = None  # pad batches to multiples of this, not all to the longest
    max_new_tokens: int = 256  # per test response
    response_batch_size: int = 8
    max_test_records: Optional[int] = None  # answer only the first n test records
    export: bool = True  # write the finetuned (merged) model to RUN_DIR/model

    def __post_init__(self):
        check_fields(self, {
            "init_from": NON_EMPTY, "data": NON_EMPTY, "template": one_of(*TEMPLATES, "chat"),
            "train_frac": Rule("a number in (0, 1]", lambda v: FRACTION.test(v) or v == 1),
            "test_frac": Rule("a number in [0, 1)", lambda v: v == 0 or FRACTION.test(v)),
            "split_seed": NON_NEGATIVE_INT, "allowed_max_length": optional(POSITIVE_INT),
            "bucket": optional(POSITIVE_INT), "max_new_tokens": POSITIVE_INT,
            "response_batch_size": POSITIVE_INT,
            "max_test_records": optional(NON_NEGATIVE_INT)})  # 0: answer none
        if self.train_frac + self.test_frac > 1:
            raise ValueError(f"InstructConfig.test_frac={self.test_frac} plus train_frac="
                             f"{self.train_frac} exceeds 1")


@dataclass(frozen=True)
class InstructRunConfig(RunConfig):
    """A run configuration with the instruction-tuning section and an optional LoRA section."""

    instruct: InstructConfig = field(default_factory=InstructConfig)
    lora: Optional[LoRAConfig] = None  # set: train LoRA adapters instead of every weight


@dataclass
class InstructResult:
    """What `finetune` leaves besides the run directory's files."""

    fit: FitResult
    model: GPTConfig
    params: dict | None  # the finetuned parameters (LoRA merged) on the host; None if preempted
    summary: dict
    responses: list[dict]


def load_start(init_from: str, model: GPTConfig) -> tuple[GPTConfig, dict | None]:
    """(config, params) to finetune; params is None for "scratch" (model is used as it is)."""
    if init_from == "scratch":
        return model, None
    config, params = load_model(init_from, **start_overrides(init_from, model))
    return config, jax.device_get(params)  # host arrays: fit places them on its mesh


def _datasets(cfg: InstructRunConfig, max_length: int):
    ic = cfg.instruct
    columns = {"instruction": ic.instruction_column, "input": ic.input_column,
               "output": ic.output_column}
    records = load_records(ic.data, columns, hf_split=ic.hf_split)
    splits = split_records(records, ic.train_frac, ic.test_frac, shuffle=ic.shuffle,
                           seed=ic.split_seed)
    tok, template, stops = _text_side(cfg)
    make = functools.partial(InstructDataset, template=template, tokenizer=tok,
                             allowed_max_length=max_length, mask_prompt=ic.mask_prompt,
                             bucket=ic.bucket, pad_id=stops[0])
    return make(splits.train), make(splits.val), splits.test


def text_side(template: str, init_from: str, tokenizer: str = "gpt2", section: str = "instruct"):
    """(tokenizer, template, stop ids): GPT-2's with alpaca/phi3, the model's own with chat
    (read from `init_from`; `section` names the config section in errors)."""
    if template != "chat":
        return get_tokenizer(tokenizer), get_template(template), (EOT_ID,)
    directory = tokenizer_dir(init_from)
    if directory is None:
        raise ConfigError(f"{section}.template=chat needs a tokenizer.json in {section}.init_from "
                          f"({init_from}) or its model/ directory")
    tok = load_family_tokenizer(directory)
    if not tok.stop_ids:
        raise ConfigError(f"{directory}'s tokenizer names no end-of-turn token (eos_token)")
    return tok, ChatTemplate(tok), tok.stop_ids


def _text_side(cfg: InstructRunConfig):
    ic = cfg.instruct
    return text_side(ic.template, ic.init_from, cfg.data.tokenizer)


def mean_loss(params, config: GPTConfig, dataset: InstructDataset, batch_size: int) -> float:
    """Token-mean loss over every row of `dataset` (deterministic), one compiled shape."""
    step = jax.jit(functools.partial(eval_step, loss_fn=lm_loss_fn(config)))
    params = jax.device_put(params)  # once, not with every batch
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        idx = np.arange(start, start + batch_size)
        batch = dataset.rows(np.minimum(idx, len(dataset) - 1))
        batch["targets"][idx >= len(dataset)] = IGNORE  # repeated rows only keep the shape
        out = step(params, batch)
        total, count = total + float(out["loss_sum"]), count + int(out["count"])
    return total / max(count, 1)


def finetune(cfg: InstructRunConfig, options: FitOptions = FitOptions()) -> InstructResult:
    """Finetune on cfg.instruct.data, then export the model and answer the test split."""
    run_dir = cfg.run_dir
    if jax.process_index() == 0:  # this process writes the run directory until it is done
        run_dir.mkdir(parents=True, exist_ok=True)
        acquire(run_dir)
    try:
        return _finetune(cfg, options)
    finally:
        release(run_dir)


def _finetune(cfg: InstructRunConfig, options: FitOptions) -> InstructResult:
    ic = cfg.instruct
    tok, template, stops = _text_side(cfg)
    model, base = load_start(ic.init_from, cfg.model)
    if ic.template != "chat" and model.vocab_size <= EOT_ID:
        raise ConfigError(f"model.vocab_size={model.vocab_size} cannot hold GPT-2's end-of-text "
                          f"token {EOT_ID}")
    max_length = ic.allowed_max_length or model.context_length
    if max_length > model.context_length:
        raise ConfigError(f"instruct.allowed_max_length={max_length} exceeds the model's "
                          f"context_length={model.context_length}")
    if ic.bucket is not None and jax.process_count() > 1:
        raise ConfigError("instruct.bucket sizes each process's rows on their own, so processes "
                          "could disagree on a batch's shape; leave it unset in multi-process runs")
    cfg = dataclasses.replace(cfg, model=model)
    train, val, test = _datasets(cfg, max_length)
    if base is None:
        base = init_params(model, jax.random.key(cfg.train.seed))

    boxed = with_axes(base, abstract_params(model))  # the weights with their logical axes
    if cfg.lora is None:
        trainable, effective = Trainable(lm_loss_fn(model), params=boxed), lambda p: p
    else:
        params, frozen = lora.partition(boxed, cfg.lora, jax.random.key(cfg.train.seed))
        trainable = Trainable(lora.lora_loss_fn(lm_loss_fn(model), cfg.lora), params=params,
                              frozen=frozen)
        frozen = nn.meta.unbox(frozen)
        effective = lambda p: lora.combine(p, frozen, cfg.lora)  # noqa: E731

    eval_rows = cfg.train.batch_size // cfg.optim.accum_steps
    before = mean_loss(base, model, val, eval_rows) if len(val) else float("nan")
    if cfg.train.sample_tokens > 0 and len(val):
        def sample(params, step):  # the book's generate_and_print_sample on the first val record
            [r] = generate_responses(effective(host_copy(params)), model, val.records[:1], template,
                                     max_new_tokens=cfg.train.sample_tokens, batch_size=1,
                                     tokenizer=tok, eos_id=stops)
            return {"sample": r["model_response"].replace("\n", " ")}

        if options.sample is None:
            options = dataclasses.replace(options, sample=sample)
    result = fit(cfg, trainable, train, val, options)
    if result.preempted:  # rerunning resumes; the answers come once training is complete
        return InstructResult(result, model, None, {}, [])

    params = effective(host_copy(result.state.params))
    test = test[: ic.max_test_records]
    responses = generate_responses(params, model, test, template, max_new_tokens=ic.max_new_tokens,
                                   batch_size=ic.response_batch_size, tokenizer=tok,
                                   eos_id=stops) if test else []
    ended = sum(r["ended"] for r in responses)
    summary = {
        "steps": int(result.state.step),
        "val_loss_before": before,
        "val_loss_after": mean_loss(params, model, val, eval_rows) if len(val) else float("nan"),
        "test_records": len(responses),
        "ended_with_eot": ended,
        "eot_fraction": ended / max(len(responses), 1),
    }
    if is_lead():
        if ic.export:
            save_pretrained(model, params, result.run_dir / "model")
            if ic.template == "chat":  # the chat CLI and a re-finetune read the tokenizer beside it
                copy_tokenizer_files(tokenizer_dir(ic.init_from), result.run_dir / "model")
        write_json_atomic(result.run_dir / "test_responses.json", responses)
        write_json_atomic(result.run_dir / "instruct_summary.json", summary)
    return InstructResult(result, model, params, summary, responses)


