"""Score a model on HellaSwag (completion scoring, as llm.c and nanoGPT do).

  python -m jaxgpt.cli.hellaswag --model gpt2 --data hellaswag_val.jsonl [--limit N]

--model is anything `jaxgpt.load_model` takes: a GPT-2 name, a directory with config.json and
model.safetensors, or a jaxgpt run directory. --data is a HellaSwag-format JSONL file (the
official validation file is hellaswag_val.jsonl from github.com/rowanz/hellaswag, data/).
"""

from __future__ import annotations

import argparse
import json
import sys

from jaxgpt.entrypoint import USER_ERRORS, fail, setup_process


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxgpt.cli.hellaswag", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="gpt2[-medium|-large|-xl], an export dir or a run dir")
    p.add_argument("--data", required=True, help="HellaSwag-format JSONL (ctx, endings, label)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    p.add_argument("--rows-per-call", type=int, default=32, help="endings scored per forward pass")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p.parse_args(argv)


def main(argv=None) -> int:
    setup_process()  # this process's settings (jaxgpt/entrypoint.py), before any JAX computation
    args = parse_args(argv)
    from jaxgpt.weights.loader import load_model
    from jaxgpt.tasks.hellaswag import read_examples, score

    try:
        if args.limit is not None and args.limit <= 0:
            raise ValueError(f"--limit must be positive, got {args.limit}")
        examples = read_examples(args.data, args.limit)  # the file is checked before the model loads
        config, params = load_model(args.model)
        result = score(params, config, examples, rows_per_call=args.rows_per_call)
    except USER_ERRORS as err:
        return fail(err, 1)
    summary = {"acc": result["acc"], "acc_norm": result["acc_norm"], "examples": result["examples"]}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"HellaSwag ({summary['examples']} examples): acc {summary['acc']:.4f}  "
              f"acc_norm {summary['acc_norm']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
