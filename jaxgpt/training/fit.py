"""`fit`: a Trainer with the standard hooks, run to the end (or to a preemption).

`standard_hooks` is the one place the default hooks are made and ordered: log, progress, halt on
non-finite updates, evaluation, the caller's extra hooks, preemption, checkpoint, plot. Each is
given what it needs from the run when it is made; none sees the Trainer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from jaxgpt.training import hooks as H
from jaxgpt.training.hooks import StepInfo
from jaxgpt.training.runconfig import RunConfig
from jaxgpt.training.trainer import FitResult, Trainable, Trainer


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """What a caller may add to a run besides its config and data."""

    tx: Any = None  # an optax transformation; None: make_optimizer(cfg.optim, steps)
    # sample(params, step) -> extra fields (e.g. generated text) of each evaluation
    sample: Callable[[Any, int], dict | None] | None = None
    # extra (hook, every) pairs, run after the standard per-step ones and before the checkpoint
    hooks: Sequence[tuple[Callable[[StepInfo], None], int]] = ()


def standard_hooks(trainer: Trainer, options: FitOptions, progress: H.Progress,
                   preemption: H.Preemption) -> list[tuple[Callable[[StepInfo], None], dict]]:
    """(hook, add_hook keywords) in the order they run after a step."""
    t, log = trainer.cfg.train, trainer.log
    optim = trainer.cfg.optim
    remedy = (f"lower optim.learning_rate, now {optim.learning_rate:g}"
              + ("" if optim.grad_clip else ", or set optim.grad_clip"))
    out = [(H.log_metrics(log), {}), (progress, {}),
           (H.halt_on_nonfinite(t.max_consecutive_skips, remedy), {})]
    if t.eval_freq > 0:  # the book's timing: after the first step, then every eval_freq steps
        write = progress.write if trainer.is_lead else None
        evaluation = H.evaluation(log, trainer.evaluate, trainer.history, write, options.sample,
                                  remedy)
        out.append((evaluation, dict(every=t.eval_freq, offset=1)))
    out += [(hook, dict(every=every)) for hook, every in options.hooks]
    out.append((preemption, {}))  # before the checkpoint, which then saves the stopping step
    out.append((H.checkpoint(trainer.checkpointer, trainer.cfg.to_dict()),
                dict(every=t.checkpoint_every, final=True)))
    out.append((H.plot(log, trainer.run_dir / "loss.png", trainer.is_lead), dict(every=0, final=True)))
    return out


def fit(cfg: RunConfig, trainable: Trainable, train_data, val_data,
        options: FitOptions = FitOptions()) -> FitResult:
    """Train `trainable` on `train_data` with the standard hooks, resuming if the run can."""
    trainer = Trainer(cfg, trainable, train_data, val_data, tx=options.tx)
    t = cfg.train
    progress = H.Progress(cfg.name, trainer.steps, trainer.start_step, trainer.tokens_seen,
                          enabled=t.progress and trainer.is_lead)
    preemption = H.Preemption().install()
    for hook, when in standard_hooks(trainer, options, progress, preemption):
        trainer.add_hook(hook, **when)
    try:
        if t.report:
            trainer.print_report()
        result = trainer.run()
    finally:
        preemption.close()
        progress.close()
        trainer.close()  # also on errors: pending writes finish and the run directory is free
    if result.preempted and trainer.is_lead:
        progress.write(f"SIGTERM: saved checkpoint at step {int(result.state.step)}; exiting")
    return result
