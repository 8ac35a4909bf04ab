"""Classify texts with a finetuned classifier run directory.

    python -m jaxgpt.cli.classify --model RUN_DIR "text" ["another text" ...]

Prints one line per text: the label, its probability, and the text.
"""

from __future__ import annotations

import argparse
import sys

from jaxgpt.entrypoint import USER_ERRORS, fail, setup_process


def main(argv: list[str] | None = None) -> int:
    setup_process()  # this process's settings (jaxgpt/entrypoint.py), before any JAX computation
    parser = argparse.ArgumentParser(prog="python -m jaxgpt.cli.classify", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="run directory of train/finetune_classifier.py")
    parser.add_argument("texts", nargs="+", help="texts to classify")
    args = parser.parse_args(argv)
    from jaxgpt.tasks.classification.model import classify, load_classifier

    try:
        model = load_classifier(args.model)
        labels, probs = classify(model, args.texts)
    except USER_ERRORS as e:  # CheckpointError (not a classifier run, no checkpoint) included
        return fail(e, 2)
    for text, label, p in zip(args.texts, labels, probs):
        print(f"{label}\t{p.max():.3f}\t{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
