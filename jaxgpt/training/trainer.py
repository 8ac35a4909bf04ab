"""The training loop shared by pretraining and finetuning: batches, steps, eval, checkpoints.

The loop is the only impure part: it reads batches (a pure function of seed and step), calls
the jitted step, and writes metrics and checkpoints. Everything it needs to resume is the train
state plus the step, so a run killed at any point restarts from its latest complete checkpoint
and continues exactly as if it had never stopped.

A dataset is anything with `__len__` and `rows(indices) -> dict[str, np.ndarray]` (each array
[n, ...]); the loss function decides which keys it reads.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
from tqdm.auto import tqdm

from jaxgpt.data import batch_indices, num_batches
from jaxgpt.sharding import (
    boxed_shardings,
    data_parallel_size,
    make_global_batch,
    make_mesh,
    process_rows,
)
from jaxgpt.training.checkpoint import (
    Checkpointer,
    abstract_with_shardings,
    model_config_diff,
)
from jaxgpt.training.metrics import MetricsLog, plot_losses
from jaxgpt.training.optim import make_optimizer, schedule
from jaxgpt.training.report import sharding_report
from jaxgpt.training.runconfig import (
    ConfigError,
    RunConfig,
    config_from_yaml,
    save_config,
)
from jaxgpt.training.state import abstract_state, init_state
from jaxgpt.training.step import compile_steps


class TrainingHalted(RuntimeError):
    """The run stopped itself (too many non-finite updates in a row)."""


@dataclasses.dataclass
class FitResult:
    state: Any
    history: list[dict]
    run_dir: Path
    preempted: bool = False


def total_steps(cfg: RunConfig, n_train: int) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return cfg.train.epochs * num_batches(n_train, cfg.train.batch_size)


def validate_run(cfg: RunConfig, n_train: int, n_val: int, mesh) -> None:
    """Host-side checks that would otherwise fail late or inside XLA; one line each."""
    t = cfg.train
    if n_train < t.batch_size:
        raise ConfigError(
            f"training data has {n_train} examples, fewer than train.batch_size={t.batch_size}"
        )
    if t.batch_size % cfg.optim.accum_steps:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by optim.accum_steps={cfg.optim.accum_steps}"
        )
    micro = t.batch_size // cfg.optim.accum_steps
    dp = data_parallel_size(mesh)
    if micro % dp:
        raise ConfigError(
            f"micro-batch of {micro} rows is not divisible by the {dp} data-parallel devices "
            "(mesh.data x mesh.fsdp)"
        )
    if t.eval_freq > 0 and n_val == 0:
        raise ConfigError("validation data is empty; lower data.train_ratio or add text")


def _local_rows(dataset, cfg: RunConfig, step: int, seed_offset: int = 0, *, mesh) -> dict:
    """This process's share of the step's global batch, shaped [A, b_local, ...]."""
    a = cfg.optim.accum_steps
    idx = batch_indices(len(dataset), batch_size=cfg.train.batch_size, step=step,
                        seed=cfg.train.seed + seed_offset)
    idx = idx.reshape(a, -1)  # [A, b]: micro-batch i is rows i*b .. (i+1)*b - 1
    # [A, b_local]: only the rows this process's devices hold (all of them when one process).
    idx = idx[:, process_rows(mesh, idx.shape[1])]
    rows = dataset.rows(idx.reshape(-1))
    return {k: v.reshape(idx.shape + v.shape[1:]) for k, v in rows.items()}


def _eval_batches(dataset, cfg: RunConfig, n: int, *, mesh) -> list[dict]:
    """The first `n` unshuffled batches (fixed, so evaluations are comparable over time)."""
    bs = cfg.train.batch_size // cfg.optim.accum_steps
    mine = process_rows(mesh, bs)
    return [dataset.rows(i * bs + mine) for i in range(min(n, len(dataset) // bs))]


def prepare_run_dir(cfg: RunConfig) -> Path:
    """Create the run directory, refusing one that belongs to a different model."""
    run_dir = cfg.run_dir
    saved = run_dir / "config.yaml"
    if saved.exists():
        diff = model_config_diff(config_from_yaml(saved, type(cfg)).model.to_dict(), cfg.model)
        if diff:
            raise ConfigError(
                f"run directory {run_dir} holds a different model ({'; '.join(diff)}); "
                "choose another name or runs_dir"
            )
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, saved)
    return run_dir


class _Preemption:
    """Turns SIGTERM into a flag the loop checks at each step boundary."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._old = None
        return self

    def _handle(self, *_):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def fit(
    cfg: RunConfig,
    train_data,
    val_data,
    *,
    loss_fn: Callable,
    boxed_params: Any,
    init_fn: Callable[[jax.Array], Any] | None = None,
    params: Any = None,
    frozen: Any = None,
    frozen_boxed: Any = None,
    tx=None,
    on_eval: Callable[[Any, int], dict | None] | None = None,
    on_step: Callable[[int], None] | None = None,
    eval_metrics: Callable[[list[dict]], dict] | None = None,
) -> FitResult:
    """Train `params` (or fresh ones from `init_fn`) on `train_data` by `loss_fn`.

    `boxed_params`/`frozen_boxed` are abstract trees with logical axis boxes (for shardings).
    `on_eval(params, step)` may return extra fields for the eval record (e.g. a sample).
    """
    mesh = make_mesh(cfg.mesh)
    validate_run(cfg, len(train_data), len(val_data), mesh)
    steps = total_steps(cfg, len(train_data))
    tx = make_optimizer(cfg.optim, steps) if tx is None else tx
    lr_fn = schedule(cfg.optim, steps)
    run_dir = prepare_run_dir(cfg)

    abstract = abstract_state(boxed_params, tx)
    state_sh = boxed_shardings(abstract, mesh)
    frozen_sh = None if frozen is None else boxed_shardings(frozen_boxed, mesh)
    if frozen is not None:
        frozen = jax.device_put(frozen, frozen_sh)
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
    log = MetricsLog(run_dir)
    start = ckpt.latest_step()
    if start is not None:
        state, meta = ckpt.restore(start, abstract_with_shardings(_unbox(abstract), state_sh))
        tokens_seen = meta["tokens_seen"]
        log.truncate_after(start)
    else:
        start, tokens_seen = 0, 0
        if params is None:
            params = jax.jit(init_fn, out_shardings=state_sh.params)(jax.random.key(cfg.train.seed))
        params = jax.device_put(params, state_sh.params)
        state = jax.jit(lambda p: init_state(p, tx, cfg.train.seed), out_shardings=state_sh)(params)
    train_step, eval_step = compile_steps(loss_fn, tx, lr_fn, state_sh, mesh, frozen_sh)

    def global_batch(local: dict, lead: tuple) -> dict:
        shapes = {k: lead + v.shape[len(lead):] for k, v in local.items()}
        return make_global_batch(local, mesh, shapes, batch_axis=len(lead) - 1)

    a, bs = cfg.optim.accum_steps, cfg.train.batch_size

    def batch_at(step):  # the global [A, B/A, T] batch of a step
        return global_batch(_local_rows(train_data, cfg, step, mesh=mesh), (a, bs // a))

    if cfg.train.report and start < steps:
        # Compiling here is no extra work: jit reuses this executable for the first step.
        compiled = train_step.lower(state, batch_at(start), frozen).compile()
        if jax.process_index() == 0:
            print(sharding_report(cfg.model, mesh, tx, compiled=compiled,
                                  boxed_params=boxed_params), flush=True)

    eval_sets = {"train": _eval_batches(train_data, cfg, cfg.train.eval_iter, mesh=mesh),
                 "val": _eval_batches(val_data, cfg, cfg.train.eval_iter, mesh=mesh)}

    def evaluate(params) -> dict:
        out = {}
        for name, batches in eval_sets.items():
            results = [jax.device_get(eval_step(
                params, global_batch(b, (bs // a,)), frozen))
                for b in batches]
            total = sum(float(r["loss_sum"]) for r in results)
            count = sum(int(r["count"]) for r in results)
            out[f"{name}_loss"] = total / max(count, 1)
            if eval_metrics is not None:
                out.update({f"{name}_{k}": v for k, v in eval_metrics(results).items()})
        return out

    history = []
    preempted = False
    lead = jax.process_index() == 0
    bar = tqdm(total=steps, initial=start, disable=not cfg.train.progress or not lead,
               desc=cfg.name, dynamic_ncols=True)
    t_last = time.perf_counter()
    with _Preemption() as preemption:
        batch = batch_at(start) if start < steps else None
        for step in range(start, steps):
            state, m = train_step(state, batch, frozen)  # dispatched; runs while we go on
            # The next batch is built on the host while the step runs on the device (batches
            # are a pure function of the step, so one built and then not used costs nothing).
            batch = batch_at(step + 1) if step + 1 < steps else None
            m = jax.device_get(m)
            tokens_seen += int(m["tokens"])
            now = time.perf_counter()
            record = {"kind": "train", "step": step + 1, "tokens_seen": tokens_seen,
                      "loss": float(m["loss"]), "learning_rate": float(m["learning_rate"]),
                      "grad_norm": float(m["grad_norm"]), "skipped": int(m["skipped"])}
            log.write(record)
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}",
                            tok_s=f"{m['tokens'] / max(now - t_last, 1e-9):,.0f}")
            bar.update(1)
            t_last = now
            if int(state.skips) >= cfg.train.max_consecutive_skips:
                raise TrainingHalted(
                    f"stopping at step {step + 1}: {int(state.skips)} consecutive non-finite "
                    "losses or gradients (lower optim.learning_rate or set optim.grad_clip)"
                )
            if cfg.train.eval_freq > 0 and step % cfg.train.eval_freq == 0:
                ev = {"kind": "eval", "step": step + 1, "tokens_seen": tokens_seen,
                      **evaluate(state.params)}
                if on_eval is not None:
                    ev.update(on_eval(state.params, step + 1) or {})
                log.write(ev)
                history.append(ev)
                if lead:
                    bar.write(_format_eval(ev))
            if on_step is not None:
                on_step(step + 1)
            done = step + 1 == steps
            if done or preemption.requested or (step + 1) % cfg.train.checkpoint_every == 0:
                ckpt.save(step + 1, state, {"step": step + 1, "tokens_seen": tokens_seen,
                                            "config": cfg.to_dict()})
            if preemption.requested and not done:
                preempted = True
                if lead:
                    bar.write(f"SIGTERM: saved checkpoint at step {step + 1}; exiting")
                break
    bar.close()
    ckpt.close()
    log.close()
    if lead and log.path.exists():
        plot_losses(log.path, run_dir / "loss.png")
    return FitResult(state=state, history=history, run_dir=run_dir, preempted=preempted)


def _unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


def _format_eval(ev: dict) -> str:
    parts = [f"step {ev['step']:>6}", f"train loss {ev['train_loss']:.3f}",
             f"val loss {ev['val_loss']:.3f}"]
    parts += [f"{k} {v:.3f}" for k, v in ev.items()
              if isinstance(v, float) and k not in ("train_loss", "val_loss") and math.isfinite(v)]
    text = " | ".join(parts)
    return text + (f"\n  sample: {ev['sample']!r}" if "sample" in ev else "")
