"""Preference tuning (DPO, the book's chapter 7 bonus) as a library call: pairs -> `fit`.

The policy starts from `preference.init_from` (an instruction-tuned run directory, an exported
model, a hub name: whatever `load_model` takes) and so does the reference, which stays frozen.
The reference is `live` (full finetuning: a frozen copy of the start weights beside the
policy; LoRA: the frozen base itself, i.e. the model with its adapters off, no extra weights)
or `stored` (its log-probabilities computed once before training and kept in the run
directory, so only one model is held). Evaluations log train and validation loss, chosen and
rejected rewards, their margin and the accuracy; the run is checkpointed and resumes exactly.

After training, in the run directory: `model/` (Hugging Face safetensors, LoRA merged; with
LoRA also `peft/`, the adapters for PEFT), `loss.png` and `reward_margin.png`,
`preference_samples.json` (greedy responses to a few validation prompts before and after) and
`preference_summary.json` (the first and last evaluation's metrics).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass, field
from typing import Optional

import flax.linen as nn
import jax

from jaxgpt.checks import (
    FRACTION,
    NON_EMPTY,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    Rule,
    check_fields,
    one_of,
    optional,
)
from jaxgpt.distributed import host_copy, is_lead
from jaxgpt.fsutil import write_json_atomic
from jaxgpt.lora import transform as lora
from jaxgpt.lora.adapters import export_peft
from jaxgpt.lora.transform import LoRAConfig
from jaxgpt.models.model import abstract_params, init_params
from jaxgpt.sharding import with_axes
from jaxgpt.data.tokenizer import EOT_ID, copy_tokenizer_files, tokenizer_dir
from jaxgpt.tasks.instruct.data import split_records
from jaxgpt.tasks.instruct.finetune import load_start, text_side
from jaxgpt.tasks.instruct.responses import generate_responses
from jaxgpt.tasks.preference import reference
from jaxgpt.tasks.preference.data import PreferenceDataset, load_pairs
from jaxgpt.tasks.preference.loss import LOSSES, REDUCTIONS, Objective, eval_metrics, pair_count, preference_loss_fn
from jaxgpt.training.fit import FitOptions, fit
from jaxgpt.training.metrics import plot_losses, read_metrics
from jaxgpt.training.runconfig import ConfigError, RunConfig
from jaxgpt.training.rundir import acquire, release
from jaxgpt.training.trainer import FitResult, Trainable
from jaxgpt.weights.huggingface import save_pretrained


@dataclass(frozen=True)
class PreferenceConfig:
    """Where pairs and weights come from, the prompt format, the objective and the reference."""

    init_from: str = "scratch"  # an instruction-tuned run directory, an HF directory, a GPT-2 name
    data: str = "instruction-data-with-preference"  # .json/.jsonl/.parquet, a named set, "hf:..."
    hf_split: str = "train"
    instruction_column: str = "instruction"
    input_column: Optional[str] = "input"  # null: the source has no input column
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    template: str = "alpaca"  # alpaca or phi3 (GPT-2's tokenizer), or chat (the model's own)
    train_frac: float = 0.85  # the book's 85/10/5 split, in file order
    test_frac: float = 0.10
    shuffle: bool = False
    split_seed: int = 123
    allowed_max_length: Optional[int] = None  # tokens per side; default the model's context
    truncate_prompts: bool = True  # cut too-long prompts from the left (false: refuse them)
    skip_bad_records: bool = False  # leave out bad records with a count (false: refuse them)
    loss: str = "sigmoid"  # sigmoid (DPO) or ipo
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO (sigmoid only)
    reduction: str = "sum"  # sequence log-probability: sum (paper, TRL) or mean (the book)
    reference: str = "live"  # live (a frozen copy, or LoRA's base) or stored (computed once)
    sample_records: int = 3  # validation prompts answered before and after
    max_new_tokens: int = 128
    response_batch_size: int = 8
    export: bool = True

    def __post_init__(self):
        check_fields(self, {
            "init_from": NON_EMPTY, "data": NON_EMPTY, "chosen_column": NON_EMPTY,
            "rejected_column": NON_EMPTY, "template": one_of("alpaca", "phi3", "chat"),
            "train_frac": Rule("a number in (0, 1]", lambda v: FRACTION.test(v) or v == 1),
            "test_frac": Rule("a number in [0, 1)", lambda v: v == 0 or FRACTION.test(v)),
            "split_seed": NON_NEGATIVE_INT, "allowed_max_length": optional(POSITIVE_INT),
            "loss": one_of(*LOSSES), "beta": POSITIVE, "reduction": one_of(*REDUCTIONS),
            "label_smoothing": Rule("a number in [0, 0.5)", lambda v: 0 <= v < 0.5),
            "reference": one_of("live", "stored"), "sample_records": NON_NEGATIVE_INT,
            "max_new_tokens": POSITIVE_INT, "response_batch_size": POSITIVE_INT})
        if self.train_frac + self.test_frac > 1:
            raise ValueError(f"PreferenceConfig.test_frac={self.test_frac} plus train_frac="
                             f"{self.train_frac} exceeds 1")
        if self.loss == "ipo" and self.label_smoothing:
            raise ValueError("PreferenceConfig.label_smoothing is for the sigmoid loss; ipo has none")

    @property
    def objective(self) -> Objective:
        return Objective(self.loss, self.beta, self.label_smoothing, self.reduction)


@dataclass(frozen=True)
class PreferenceRunConfig(RunConfig):
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    lora: Optional[LoRAConfig] = None  # set: train LoRA adapters; the base is the reference


@dataclass
class PreferenceResult:
    fit: FitResult
    params: dict | None  # the tuned parameters (LoRA merged) on the host; None if preempted
    summary: dict
    samples: list[dict]


def finetune(cfg: PreferenceRunConfig, options: FitOptions = FitOptions()) -> PreferenceResult:
    """Preference-tune on cfg.preference.data, then export the model and sample responses."""
    if jax.process_index() == 0:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        acquire(cfg.run_dir)
    try:
        return _finetune(cfg, options)
    finally:
        release(cfg.run_dir)


def _datasets(cfg: PreferenceRunConfig, tok, template, stop: int, max_length: int):
    pc = cfg.preference
    columns = {"instruction": pc.instruction_column, "input": pc.input_column,
               "chosen": pc.chosen_column, "rejected": pc.rejected_column}
    records = load_pairs(pc.data, columns, hf_split=pc.hf_split, skip_bad=pc.skip_bad_records)
    splits = split_records(records, pc.train_frac, pc.test_frac, shuffle=pc.shuffle,
                           seed=pc.split_seed)
    make = functools.partial(PreferenceDataset, template=template, tokenizer=tok, pad_id=stop,
                             max_length=max_length, truncate=pc.truncate_prompts)
    train, val = make(splits.train), make(splits.val)
    cut = (train.truncated_prompts + val.truncated_prompts, train.truncated_responses + val.truncated_responses)
    if cut[0] and is_lead():
        warnings.warn(f"{cut[0]} pair(s) had their prompt cut from the left to fit {max_length} "
                      f"tokens ({cut[1]} also lost the end of a response)", stacklevel=2)
    return train, val


def _start(cfg: PreferenceRunConfig):
    """(cfg with the start model, tokenizer, template, stop ids, start params, max length)."""
    pc = cfg.preference
    tok, template, stops = text_side(pc.template, pc.init_from, cfg.data.tokenizer, "preference")
    model, base = load_start(pc.init_from, cfg.model)
    if pc.template != "chat" and model.vocab_size <= EOT_ID:
        raise ConfigError(f"model.vocab_size={model.vocab_size} cannot hold GPT-2's end-of-text "
                          f"token {EOT_ID}")
    max_length = pc.allowed_max_length or model.context_length
    if max_length > model.context_length:
        raise ConfigError(f"preference.allowed_max_length={max_length} exceeds the model's "
                          f"context_length={model.context_length}")
    if cfg.lora is not None and cfg.lora.trainable and pc.reference == "live":
        raise ConfigError("lora.trainable leaves are trained in full, so the base with its adapters "
                          "off is no longer the reference; set preference.reference=stored")
    if base is None:
        base = jax.device_get(init_params(model, jax.random.key(cfg.train.seed)))
    return dataclasses.replace(cfg, model=model), tok, template, stops, base, max_length


def _samples(params, cfg, records, template, tok, stops) -> list[dict]:
    pc = cfg.preference
    if not records:
        return []
    return generate_responses(params, cfg.model, records, template, max_new_tokens=pc.max_new_tokens,
                              batch_size=min(pc.response_batch_size, len(records)), tokenizer=tok,
                              eos_id=stops)


def _finetune(cfg: PreferenceRunConfig, options: FitOptions) -> PreferenceResult:
    pc = cfg.preference
    cfg, tok, template, stops, base, max_length = _start(cfg)
    model = cfg.model
    train, val = _datasets(cfg, tok, template, stops[0], max_length)
    stored = pc.reference == "stored"
    micro = cfg.train.batch_size // cfg.optim.accum_steps
    if stored:
        reference.attach(cfg.run_dir, base, model, {"train": train, "val": val}, rows=micro,
                         reduction=pc.reduction, mesh_config=cfg.mesh)
    boxed = with_axes(base, abstract_params(model))
    loss_fn = preference_loss_fn(model, pc.objective, stored=stored, lora=cfg.lora)
    if cfg.lora is None:
        params, frozen, effective = boxed, None if stored else boxed, lambda p: p
    else:
        params, frozen = lora.partition(boxed, cfg.lora, jax.random.key(cfg.train.seed))
        plain = nn.meta.unbox(frozen)
        effective = lambda p: lora.combine(p, plain, cfg.lora)  # noqa: E731
    trainable = Trainable(loss_fn, params=params, frozen=frozen, eval_metrics=eval_metrics,
                          units=pair_count)
    shown = val.records[: pc.sample_records]
    before = _samples(base, cfg, shown, template, tok, stops)
    if cfg.train.sample_tokens > 0 and len(val) and options.sample is None:
        def sample(p, step):  # the first validation prompt's response, at each evaluation
            [r] = generate_responses(effective(host_copy(p)), model, val.records[:1], template,
                                     max_new_tokens=cfg.train.sample_tokens, batch_size=1,
                                     tokenizer=tok, eos_id=stops)
            return {"sample": r["model_response"].replace("\n", " ")}

        options = dataclasses.replace(options, sample=sample)
    result = fit(cfg, trainable, train, val, options)
    if result.preempted:
        return PreferenceResult(result, None, {}, [])
    trained = host_copy(result.state.params)
    tuned = effective(trained)
    after = _samples(tuned, cfg, shown, template, tok, stops)
    samples = [{**r, "before": b["model_response"], "after": a["model_response"]}
               for r, b, a in zip(shown, before, after)]
    summary = _summary(result, pc)
    if is_lead():
        _write(result.run_dir, cfg, tuned, trained, samples, summary)
    return PreferenceResult(result, tuned, summary, samples)


def _summary(result: FitResult, pc: PreferenceConfig) -> dict:
    evals = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if r.get("kind") == "eval"]
    keys = ("train_loss", "val_loss", "val_chosen_reward", "val_rejected_reward", "val_margin",
            "val_accuracy", "train_margin", "train_accuracy")
    pick = lambda r: {k: r[k] for k in keys if k in r}  # noqa: E731
    return {"steps": int(result.state.step), "objective": dataclasses.asdict(pc.objective),
            "reference": pc.reference, "rewards": "beta * (log pi - log ref) of the response, "
            f"its token log-probabilities reduced by {pc.reduction}",
            "first_eval": pick(evals[0]) if evals else {}, "last_eval": pick(evals[-1]) if evals else {},
            "first_eval_step": evals[0]["step"] if evals else None,
            "last_eval_step": evals[-1]["step"] if evals else None}


def _write(run_dir, cfg: PreferenceRunConfig, tuned, trained, samples, summary) -> None:
    pc = cfg.preference
    if pc.export:
        save_pretrained(cfg.model, tuned, run_dir / "model")
        if pc.template == "chat":
            copy_tokenizer_files(tokenizer_dir(pc.init_from), run_dir / "model")
        if cfg.lora is not None:
            export_peft(run_dir / "peft", trained, cfg.lora, cfg.model)
    plot_losses(run_dir / "metrics.jsonl", run_dir / "reward_margin.png", key="margin",
                label="Reward margin")
    write_json_atomic(run_dir / "preference_samples.json", samples)
    write_json_atomic(run_dir / "preference_summary.json", summary)
