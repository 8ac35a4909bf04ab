"""Preference-tune an instruction-tuned GPT with DPO (the book's chapter 7 bonus).

    python train/finetune_preference.py [--config configs/NAME.yaml] [key=value ...]

With no arguments it runs the book's recipe (configs/preference_book.yaml: from the run of
configs/instruct_book.yaml in runs/instruct_book). The run directory gets checkpoints, metrics,
loss.png and reward_margin.png, the exported model/ (and peft/ with LoRA),
preference_samples.json and preference_summary.json; then
`python -m jaxgpt.cli.chat --model RUN_DIR` talks to the tuned model.
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
from jaxgpt.tasks.preference.finetune import PreferenceRunConfig, finetune  # noqa: E402
from jaxgpt.training.runconfig import load_config  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "preference_book.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--config", default=None,
                        help="YAML run config (default: configs/preference_book.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. preference.beta=0.2")
    args = parser.parse_args(argv)
    try:
        config_path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
        cfg = load_config(config_path, args.overrides, schema=PreferenceRunConfig)
        maybe_initialize(cfg)  # before any JAX computation: a multi-process run joins here
        result = finetune(cfg)
    except USER_ERRORS as e:  # one line; JAXGPT_DEBUG=1 for the trace
        return fail(e, 2)
    if is_lead() and result.fit.preempted:
        print(f"preempted; rerun to resume in {result.fit.run_dir}")
    elif is_lead():
        s, last = result.summary, result.summary["last_eval"]
        seen = ", ".join(f"{k} {last[k]:.3f}" for k in ("val_loss", "val_margin", "val_accuracy") if k in last)
        print(f"done: {s['steps']} steps; last evaluation: {seen or 'none'}; model/, "
              f"preference_samples.json and preference_summary.json in {result.fit.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
