"""Everything a training run does besides stepping: each is a hook the Trainer calls.

A hook is a callable `hook(info: StepInfo)`, added with `trainer.add_hook(hook, every=N)`; it
runs after every N-th step (counting from `offset`), and after the last step of the run when
added with `final=True` (the last planned step, or the step at which a stop was requested).
A hook sees plain values of the step, never the Trainer: what it needs from the run (the
checkpointer, the config, the evaluation) it is given when it is made, and a hook that ends the
run early says so with `info.stop.request()`. Hooks run in the order they were added, so a hook
that requests a stop (preemption) runs before the checkpoint hook that saves because of it.
`jaxgpt.training.fit.standard_hooks` adds the standard ones, in one place.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import signal
import time
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from jaxgpt.training.checkpoint import Checkpointer
from jaxgpt.training.metrics import MetricsLog, plot_losses


class TrainingHalted(RuntimeError):
    """The run stopped itself (too many non-finite updates in a row)."""


class StopFlag:
    """Set by a hook that ends the run after this step's hooks (final hooks run for this step)."""

    def __init__(self):
        self.requested = False

    def request(self) -> None:
        self.requested = True


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a hook sees after a step: the step count (1-based), the new state, its record."""

    step: int
    state: Any
    record: dict  # the train record of this step (loss, learning_rate, grad_norm, tokens_seen...)
    duration: float  # seconds since the previous step's hooks ended (or since the loop started)
    steps: int  # the run's planned last step
    stop: StopFlag

    @property
    def loss(self) -> float:
        return self.record["loss"]

    @property
    def tokens_seen(self) -> int:
        return self.record["tokens_seen"]

    @property
    def final(self) -> bool:
        """The last step of the run: the planned last one, or one at which a stop was requested."""
        return self.step == self.steps or self.stop.requested


def log_metrics(log: MetricsLog) -> Callable[[StepInfo], None]:
    """Append each step's record to metrics.jsonl and TensorBoard (process 0 only)."""
    return lambda info: log.write(info.record)


class Progress:
    """A tqdm bar over the run's steps with the loss and tokens/s; also prints evaluations."""

    def __init__(self, name: str, steps: int, start_step: int, tokens_seen: int, enabled: bool):
        self.bar = tqdm(total=steps, initial=start_step, desc=name, disable=not enabled,
                        dynamic_ncols=True)
        self._last = (time.perf_counter(), tokens_seen)

    def __call__(self, info: StepInfo) -> None:
        now, tokens = time.perf_counter(), info.tokens_seen
        rate = (tokens - self._last[1]) / max(now - self._last[0], 1e-9)
        self._last = (now, tokens)
        self.bar.set_postfix(loss=f"{info.loss:.3f}", tok_s=f"{rate:,.0f}")
        self.bar.update(1)

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


DIVERGED = "lower optim.learning_rate or set optim.grad_clip"  # what to change, by its key


def halt_on_nonfinite(max_skips: int, remedy: str = DIVERGED) -> Callable[[StepInfo], None]:
    """Stop the run once `max_skips` updates in a row were skipped as non-finite."""

    def hook(info: StepInfo) -> None:
        skips = int(info.state.skips)
        if skips >= max_skips:
            raise TrainingHalted(
                f"stopping at step {info.step}: {skips} consecutive non-finite losses or "
                f"gradients: training diverged ({remedy})"
            )

    return hook


def evaluation(log: MetricsLog, evaluate: Callable[[Any], dict], history: list[dict],
               write: Callable[[str], None] | None = None,
               sample: Callable[[Any, int], dict | None] | None = None,
               remedy: str = DIVERGED) -> Callable[[StepInfo], None]:
    """Losses (and the task's metrics) from `evaluate(params)`, plus an optional sample
    (`sample(params, step) -> extra fields`), written as an "eval" record, appended to
    `history` and shown through `write` (None: not shown). A loss that is no longer finite
    stops the run, naming the divergence and `remedy`, before any sample is drawn from it."""

    def hook(info: StepInfo) -> None:
        record = {"kind": "eval", "step": info.step, "tokens_seen": info.tokens_seen,
                  **evaluate(info.state.params)}
        bad = {k: v for k, v in record.items()
               if k.endswith("loss") and isinstance(v, numbers.Real) and not math.isfinite(v)}
        if bad:
            log.write(record)
            name, value = next(iter(bad.items()))
            raise TrainingHalted(f"stopping at step {info.step}: the {name.replace('_', ' ')} is "
                                 f"{value}: training diverged ({remedy})")
        if sample is not None:
            record.update(sample(info.state.params, info.step) or {})
        log.write(record)
        history.append(record)
        if write is not None:
            write(format_eval(record))

    return hook


class Preemption:
    """Turns SIGTERM into a stop request at the next step boundary (the checkpoint hook added
    after this one then saves that step)."""

    def __init__(self):
        self.requested = False
        self._old = None

    def install(self) -> "Preemption":
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._old = None
        return self

    def _handle(self, *_):
        self.requested = True

    def __call__(self, info: StepInfo) -> None:
        if self.requested and info.step < info.steps:
            info.stop.request()

    def close(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None


def checkpoint(checkpointer: Checkpointer, config: dict) -> Callable[[StepInfo], None]:
    """Save the state (asynchronously) with the data position and the run's config (a dict)."""

    def hook(info: StepInfo) -> None:
        checkpointer.save(info.step, info.state, {
            "step": info.step, "tokens_seen": info.tokens_seen, "config": config})

    return hook


def plot(log: MetricsLog, path: Path, is_lead: bool) -> Callable[[StepInfo], None]:
    """Draw loss.png from metrics.jsonl (process 0)."""

    def hook(info: StepInfo) -> None:
        if is_lead and log.path.exists():
            plot_losses(log.path, path)

    return hook


def format_eval(ev: dict) -> str:
    parts = [f"step {ev['step']:>6}", f"train loss {ev['train_loss']:.3f}",
             f"val loss {ev['val_loss']:.3f}"]
    parts += [f"{k} {v:.3f}" for k, v in ev.items()
              if isinstance(v, float) and k not in ("train_loss", "val_loss") and math.isfinite(v)]
    text = " | ".join(parts)
    return text + (f"\n  sample: {ev['sample']!r}" if "sample" in ev else "")
