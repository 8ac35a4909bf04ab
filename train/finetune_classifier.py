"""Finetune a GPT as a text classifier (the book's chapter 6).

    python train/finetune_classifier.py --config configs/cls_spam_book.yaml [key=value ...]

The config names the base model (classifier.init_from: scratch, gpt2, a Hugging Face directory or
a jaxgpt pretraining run directory), the labelled data and what trains. The run directory gets
checkpoints, labels.json, results.json (train/validation/test loss and accuracy) and the loss and
accuracy plots; `python -m jaxgpt.cli.classify --model RUN_DIR "text"` then classifies. Running it
again in the same run directory resumes.
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
from jaxgpt.tasks.classification.finetune import finetune  # noqa: E402
from jaxgpt.tasks.classification.model import ClassifierRunConfig  # noqa: E402
from jaxgpt.training.runconfig import load_config  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "cls_spam_book.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=1")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, schema=ClassifierRunConfig)
        maybe_initialize(cfg)  # before any JAX computation: a multi-process run joins here
        result = finetune(cfg)
    except USER_ERRORS as e:  # one line; JAXGPT_DEBUG=1 for the trace
        return fail(e, 2)
    if not is_lead():
        return 0
    if result.classifier is None:
        print(f"preempted; rerun to resume: {result.fit.run_dir}")
        return 0
    for split, s in result.scores.items():
        print(f"{split:>10} accuracy {s['accuracy'] * 100:6.2f}%  loss {s['loss']:.3f}  ({s['count']} examples)")
    print(f"done: checkpoints, labels.json, results.json and plots in {result.fit.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
