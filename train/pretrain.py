"""Pretrain a GPT (the book's chapter 5 and appendix D).

    python train/pretrain.py [--config configs/NAME.yaml] [key=value ...]

With no arguments it trains a small GPT on the documentation that ships with CPython (no network
needed) for a few minutes on a CPU, printing samples as it goes, and leaves checkpoints, metrics
and the loss plot in runs/default/. Running it again in the same run directory resumes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from jaxgpt.entrypoint import USER_ERRORS, enable_compile_cache, fail, setup_process  # noqa: E402

setup_process()  # malloc retention, quiet library logs; before any JAX computation
enable_compile_cache()  # reruns load compiled programs (JAXGPT_COMPILE_CACHE=0: off)

from jaxgpt.distributed import is_lead, maybe_initialize  # noqa: E402
from jaxgpt.tasks.pretraining import pretrain  # noqa: E402
from jaxgpt.training.runconfig import load_config  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--config", default=None, help="YAML run config (default: configs/default.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=10")
    args = parser.parse_args(argv)
    try:
        config_path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
        cfg = load_config(config_path, args.overrides)
        maybe_initialize(cfg)  # before any JAX computation: a multi-process run joins here
        result = pretrain(cfg)
    except USER_ERRORS as e:  # one line; JAXGPT_DEBUG=1 for the trace
        return fail(e, 2)
    status = "preempted; rerun to resume" if result.preempted else "done"
    if is_lead():
        print(f"{status}: checkpoints, metrics.jsonl and loss.png in {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
