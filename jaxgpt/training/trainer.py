"""The Trainer: set-up or restore, the jitted steps and evaluation; everything periodic is a hook.

The loop is the only impure part: it reads batches (a pure function of seed and step), calls
the jitted step, and hands each step to the hooks (jaxgpt/training/hooks.py), which log,
evaluate, sample, checkpoint, plot, halt on non-finite updates and honour SIGTERM; `fit`
(jaxgpt/training/fit.py) adds the standard ones. Everything
a run needs to resume is the train state plus the step, so a run killed at any point restarts
from its latest complete checkpoint and continues exactly as if it had never stopped.

What trains is a `Trainable`: the loss, the initial parameters (or an init function) and an
optional frozen tree, each leaf boxed with its logical axis names (nn.LogicallyPartitioned, as
`init_params(..., boxed=True)` returns, or `sharding.with_axes` attaches), so one tree carries
both the values and how they shard. A dataset is anything with `__len__` and
`rows(indices) -> dict[str, np.ndarray]` (each array [n, ...]); the loss decides which keys it reads.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax

from jaxgpt.data.windows import batch_indices, num_batches
from jaxgpt.sharding import (
    boxed_shardings,
    data_parallel_size,
    make_global_batch,
    make_mesh,
    process_rows,
)
from jaxgpt.training.checkpoint import Checkpointer, abstract_with_shardings
from jaxgpt.training.hooks import StepInfo, StopFlag
from jaxgpt.training.metrics import MetricsLog
from jaxgpt.training.optim import make_optimizer, schedule
from jaxgpt.training.report import ReportOptions, sharding_report
from jaxgpt.training.runconfig import (
    ConfigError,
    RunConfig,
)
from jaxgpt.training.rundir import prepare_run_dir, release
from jaxgpt.training.state import abstract_state, init_state
from jaxgpt.training.step import compile_steps


@dataclasses.dataclass
class Trainable:
    """What a task trains. Trees are boxed with logical axes (see the module docstring).

    loss_fn(params, frozen, batch, rng, deterministic) -> (sum of losses, aux);
    eval_metrics(list of eval_step outputs) -> extra eval fields (e.g. accuracy);
    units(batch) -> what the summed loss is a mean over (None: the counted target tokens)."""

    loss_fn: Callable
    params: Any = None  # initial trainable parameters; None: `init(key)`
    init: Callable[[jax.Array], Any] | None = None
    frozen: Any = None  # used by the loss, never trained (sharded, not donated, no optimizer state)
    eval_metrics: Callable[[list[dict]], dict] | None = None
    units: Callable[[dict], jax.Array] | None = None

    def abstract(self) -> Any:
        """The trainable tree's boxed shapes (nothing allocated)."""
        if self.params is not None:
            return jax.eval_shape(lambda: self.params)
        return jax.eval_shape(self.init, jax.random.key(0))


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


def _eval_batches(dataset, bs: int, n: int, *, mesh) -> list[dict]:
    """The first `n` unshuffled batches of `bs` rows (fixed, so evaluations compare over time)."""
    mine = process_rows(mesh, bs)
    return [dataset.rows(i * bs + mine) for i in range(min(n, len(dataset) // bs))]


class Trainer:
    """One run: set up (or restore) on the configured mesh, then `run()` the steps and hooks."""

    def __init__(self, cfg: RunConfig, trainable: Trainable, train_data, val_data, *, tx=None):
        self.cfg, self.trainable = cfg, trainable
        self.mesh = make_mesh(cfg.mesh)
        validate_run(cfg, len(train_data), len(val_data), self.mesh)
        self.train_data, self.val_data = train_data, val_data
        self.steps = total_steps(cfg, len(train_data))
        self.tx = make_optimizer(cfg.optim, self.steps) if tx is None else tx
        self.run_dir = prepare_run_dir(cfg)
        self.is_lead = jax.process_index() == 0
        self.hooks: list[tuple[Callable, int, int, bool]] = []
        self.history: list[dict] = []
        self.stop = StopFlag()  # a hook's info.stop: set to end the run after this step
        self._closed = False

        boxed = trainable.abstract()
        self.abstract = abstract_state(boxed, self.tx)
        self.state_sh = boxed_shardings(self.abstract, self.mesh)
        self.frozen, frozen_sh = None, None
        if trainable.frozen is not None:
            frozen_sh = boxed_shardings(jax.eval_shape(lambda: trainable.frozen), self.mesh)
            self.frozen = jax.device_put(nn.meta.unbox(trainable.frozen), frozen_sh)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
        self.log = MetricsLog(self.run_dir)
        self.state = self._init_or_restore()
        self.train_step, self.eval_step = compile_steps(
            trainable.loss_fn, self.tx, schedule(cfg.optim, self.steps), self.state_sh, self.mesh,
            frozen_sh, trainable.units)
        rows = cfg.train.batch_size // cfg.optim.accum_steps
        self.eval_sets = {name: _eval_batches(data, rows, cfg.train.eval_iter, mesh=self.mesh)
                          for name, data in (("train", train_data), ("val", val_data))}

    def _init_or_restore(self):
        target = abstract_with_shardings(nn.meta.unbox(self.abstract), self.state_sh)
        restored = self.checkpointer.restore_latest(target)
        if restored is not None:
            state, meta, start = restored
            self.start_step, self.tokens_seen = start, meta["tokens_seen"]
            self.log.truncate_after(start)
            return state
        self.start_step, self.tokens_seen = 0, 0
        t = self.trainable
        if t.params is not None:
            params = jax.device_put(nn.meta.unbox(t.params), self.state_sh.params)
        else:
            init = lambda key: nn.meta.unbox(t.init(key))  # noqa: E731
            params = jax.jit(init, out_shardings=self.state_sh.params)(jax.random.key(self.cfg.train.seed))
        seed = self.cfg.train.seed
        return jax.jit(lambda p: init_state(p, self.tx, seed), out_shardings=self.state_sh)(params)

    def add_hook(self, hook: Callable[[StepInfo], None], every: int = 1, *, offset: int = 0,
                 final: bool = False) -> None:
        """Call `hook` after steps offset, offset + every, ... (every=0: never periodically),
        and after the run's last step when `final`."""
        self.hooks.append((hook, every, offset, final))

    def batch_at(self, step: int) -> dict:
        """The global [A, B/A, T] batch of a step (this process reads only its rows)."""
        a, bs = self.cfg.optim.accum_steps, self.cfg.train.batch_size
        local = _local_rows(self.train_data, self.cfg, step, mesh=self.mesh)
        return self._global(local, (a, bs // a))

    def _global(self, local: dict, lead: tuple) -> dict:
        shapes = {k: lead + v.shape[len(lead):] for k, v in local.items()}
        return make_global_batch(local, self.mesh, shapes, batch_axis=len(lead) - 1)

    def evaluate(self, params) -> dict:
        """Token-mean losses (and the trainable's eval metrics) on the fixed eval batches."""
        rows = self.cfg.train.batch_size // self.cfg.optim.accum_steps
        out = {}
        for name, batches in self.eval_sets.items():
            results = [jax.device_get(self.eval_step(params, self._global(b, (rows,)), self.frozen))
                       for b in batches]
            count = sum(int(r["count"]) for r in results)
            out[f"{name}_loss"] = sum(float(r["loss_sum"]) for r in results) / max(count, 1)
            if self.trainable.eval_metrics is not None:
                metrics = self.trainable.eval_metrics(results)
                out.update({f"{name}_{k}": v for k, v in metrics.items()})
        return out

    def print_report(self) -> None:
        """The sharding and memory report of the compiled step (process 0)."""
        if self.start_step >= self.steps:
            return
        # Compiling here is no extra work: jit reuses this executable for the first step.
        compiled = self.train_step.lower(self.state, self.batch_at(self.start_step), self.frozen).compile()
        if self.is_lead:
            options = ReportOptions(table=True if self.cfg.train.report_table else None)
            print(sharding_report(self.cfg.model, self.mesh, self.tx, compiled=compiled,
                                  boxed_params=self.trainable.abstract(), options=options), flush=True)

    def close(self) -> None:
        """Wait for pending checkpoint writes, close the logs and give up the run directory."""
        if self._closed:
            return
        self._closed = True
        try:
            self.checkpointer.close()
        finally:
            self.log.close()
            release(self.run_dir)

    def run(self) -> FitResult:
        """Step from the start (or restored) step to the end, calling the hooks after each."""
        state, batch = self.state, None
        if self.start_step < self.steps:
            batch = self.batch_at(self.start_step)
        since = time.perf_counter()
        for step in range(self.start_step, self.steps):
            state, m = self.train_step(state, batch, self.frozen)  # dispatched; runs while we go on
            # The next batch is built on the host while the step runs (batches are a pure
            # function of the step, so one built and then not used costs nothing).
            batch = self.batch_at(step + 1) if step + 1 < self.steps else None
            m = jax.device_get(m)
            self.tokens_seen += int(m["tokens"])
            record = {"kind": "train", "step": step + 1, "tokens_seen": self.tokens_seen,
                      "loss": float(m["loss"]), "learning_rate": float(m["learning_rate"]),
                      "grad_norm": float(m["grad_norm"]), "skipped": int(m["skipped"])}
            self.history.append(record)
            self.state = state
            now = time.perf_counter()
            self._call_hooks(StepInfo(step + 1, state, record, now - since, self.steps, self.stop))
            since = time.perf_counter()
            if self.stop.requested:
                break
        self.close()
        return FitResult(state=state, history=self.history, run_dir=self.run_dir,
                         preempted=self.stop.requested)

    def _call_hooks(self, info: StepInfo) -> None:
        for hook, every, offset, final in self.hooks:
            periodic = every > 0 and info.step >= offset and (info.step - offset) % every == 0
            if periodic or (final and info.final):  # final: read after each hook (one may stop)
                hook(info)
