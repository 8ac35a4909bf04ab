"""Finetune a GPT to follow instructions (the book's chapter 7).

    python train/finetune_instruct.py [--config configs/NAME.yaml] [key=value ...]

With no arguments it runs the book's recipe (configs/instruct_book.yaml: GPT-2 medium, which
needs the Hugging Face hub or a local copy in instruct.init_from). The run directory gets
checkpoints, metrics, the exported model/, test_responses.json and instruct_summary.json;
then `python -m jaxgpt.cli.chat --model RUN_DIR` talks to the model.
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
from jaxgpt.tasks.instruct.finetune import InstructRunConfig, finetune  # noqa: E402
from jaxgpt.training.runconfig import load_config  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "instruct_book.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--config", default=None,
                        help="YAML run config (default: configs/instruct_book.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. instruct.init_from=gpt2")
    args = parser.parse_args(argv)
    try:
        config_path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
        cfg = load_config(config_path, args.overrides, schema=InstructRunConfig)
        maybe_initialize(cfg)  # before any JAX computation: a multi-process run joins here
        result = finetune(cfg)
    except USER_ERRORS as e:  # one line; JAXGPT_DEBUG=1 for the trace
        return fail(e, 2)
    if is_lead() and result.fit.preempted:
        print(f"preempted; rerun to resume in {result.fit.run_dir}")
    elif is_lead():
        s = result.summary
        print(f"done: val loss {s['val_loss_before']:.3f} -> {s['val_loss_after']:.3f}; "
              f"{s['ended_with_eot']}/{s['test_records']} test responses ended with end-of-text; "
              f"model/, test_responses.json and instruct_summary.json in {result.fit.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
