"""Run a tiny pretraining job in its own process (for kill/resume and signal tests).

    python tests/e2e/workers/train_run.py RUNS_DIR CORPUS [--kill-at N] [--term-at N]
        [--kill-after-save N MS] [key=value ...]

--kill-after-save N MS: SIGKILL the process MS milliseconds after the asynchronous checkpoint
of step N was dispatched, so the kill lands somewhere inside that write.
"""

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from jaxgpt.tasks.pretraining import pretrain  # noqa: E402
from jaxgpt.training.fit import FitOptions  # noqa: E402
from jaxgpt.training.runconfig import load_config  # noqa: E402

TINY_RUN = [
    "model.vocab_size=50257", "model.context_length=16", "model.emb_dim=12", "model.n_heads=3",
    "model.n_layers=2", "model.drop_rate=0.1", "train.batch_size=4", "train.max_steps=8",
    "train.eval_freq=3", "train.eval_iter=2", "train.sample_tokens=0", "train.checkpoint_every=2",
    "train.progress=false", "optim.learning_rate=0.01", "optim.warmup_steps=2",
    "optim.decay=cosine", "optim.grad_clip=1.0",
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("runs_dir")
    p.add_argument("corpus")
    p.add_argument("--kill-at", type=int)
    p.add_argument("--term-at", type=int)
    p.add_argument("--kill-after-save", type=int, nargs=2, metavar=("STEP", "MS"))
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg = load_config(None, TINY_RUN + [f"runs_dir={a.runs_dir}", f"data.source={a.corpus}"]
                      + a.overrides)

    def on_step(info):  # a hook: runs after each step's metrics are written, before its checkpoint
        step = info.step
        if step == a.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final save: a hard crash
        if step == a.term_at:
            os.kill(os.getpid(), signal.SIGTERM)

    if a.kill_after_save:
        from jaxgpt.training.checkpoint import Checkpointer

        save, (at, ms) = Checkpointer.save, a.kill_after_save

        def save_then_die(self, step, state, meta):
            save(self, step, state, meta)
            if step == at:
                kill = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
                threading.Timer(ms / 1000, kill).start()
                time.sleep(10)  # the main thread stops here; the write goes on until the kill

        Checkpointer.save = save_then_die

    result = pretrain(cfg, FitOptions(hooks=[(on_step, 1)]))
    print("PREEMPTED" if result.preempted else "DONE", result.state.step)


if __name__ == "__main__":
    main()
