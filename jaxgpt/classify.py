"""Classify texts with a finetuned classifier run directory.

    python -m jaxgpt.classify --model RUN_DIR "text" ["another text" ...]

Prints one line per text: the label, its probability, and the text.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxgpt.classify", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="run directory of train/finetune_classifier.py")
    parser.add_argument("texts", nargs="+", help="texts to classify")
    args = parser.parse_args(argv)
    from jaxgpt.checkpoint import CheckpointError
    from jaxgpt.classification import classify, load_classifier

    try:
        model = load_classifier(args.model)
        labels, probs = classify(model, args.texts)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for text, label, p in zip(args.texts, labels, probs):
        print(f"{label}\t{p.max():.3f}\t{text}")
    return 0


def _as_function() -> None:
    # `jaxgpt.classify(...)` keeps calling the API function after this module is imported.
    from jaxgpt._callable_module import make_callable
    from jaxgpt.classification import classify as _classify

    make_callable(__name__, _classify)


if __name__ == "__main__":
    sys.exit(main())
else:
    _as_function()
