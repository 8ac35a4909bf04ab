"""Run metrics: `metrics.jsonl` (one JSON record a line), TensorBoard events, and the loss plot.

A run killed mid-write leaves a partial last line. Readers drop it (a resumed run says so once
on stderr, and cuts it off before appending, so the next record starts a line of its own); any
other line that is not a JSON object is an error naming the file and line.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import jax

from jaxgpt.fsutil import write_text_atomic


class MetricsLog:
    """Appends records to run_dir/metrics.jsonl and TensorBoard; silent off process 0."""

    def __init__(self, run_dir: str | Path, enabled: bool | None = None, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        if self.enabled and self.path.exists():
            self._drop_partial_line()
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            # A diverged run's NaN is said once, by the hook that stops it; tensorboardX would
            # warn about it on every scalar first.
            logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)

    def _drop_partial_line(self) -> None:
        """Cut off a last line with no newline, so the next record starts a line of its own."""
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        try:
            json.loads(data[cut:])
        except ValueError:
            line = data.count(b"\n") + 1
            print(f"{self.path}: dropped a partial last line (line {line}, left by a run "
                  "stopped mid-write)", file=sys.stderr)
            with self.path.open("r+b") as f:
                f.truncate(cut)
            return
        with self.path.open("ab") as f:  # a whole record that only lacks its newline
            f.write(b"\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (left by a run that died after its last checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            prefix = record.get("kind", "train")
            for k, v in record.items():
                if k not in ("kind", "step") and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; a partial last line (a run killed mid-write) is dropped."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").split("\n")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):  # no newline after it: the write was cut short
                break
            raise ValueError(f"{path} line {n} is not a JSON record ({e.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {n} is not a JSON object")
        records.append(record)
    return records


def plot_losses(metrics_path: str | Path, out_png: str | Path, key: str = "loss",
                label: str = "Loss") -> Path | None:
    """The book's loss plot: train and validation `key` (loss, or e.g. a preference run's
    reward margin) against steps, tokens seen on top."""
    evals = [r for r in read_metrics(metrics_path)
             if r.get("kind") == "eval" and f"train_{key}" in r and f"val_{key}" in r]
    if not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in evals]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r[f"train_{key}"] for r in evals], label=f"Training {label.lower()}")
    ax.plot(steps, [r[f"val_{key}"] for r in evals], linestyle="-.", label=f"Validation {label.lower()}")
    ax.set_xlabel("Steps")
    ax.set_ylabel(label)
    ax.legend(loc="upper right" if key == "loss" else "lower right")
    top = ax.twiny()  # a second x axis for tokens seen, aligned with the steps
    top.plot([r["tokens_seen"] for r in evals], [r[f"train_{key}"] for r in evals], alpha=0)
    top.set_xlabel("Tokens seen")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
