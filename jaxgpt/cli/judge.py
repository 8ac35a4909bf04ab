"""Score a finetuned model's test responses with a judge model over an OpenAI-style chat API.

  python -m jaxgpt.cli.judge runs/NAME/test_responses.json --model llama3

See jaxgpt/tasks/instruct/judge.py for the servers it works with.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jaxgpt.tasks.instruct.judge import (
    DEFAULT_BASE_URL,
    ChatClient,
    JudgeError,
    score_responses,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxgpt.cli.judge", description=__doc__.split("\n")[0])
    p.add_argument("responses", help="a test_responses.json written by finetuning")
    p.add_argument("--model", required=True, help="the judge model's name on the server")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL)
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable with a key")
    p.add_argument("--template", default="alpaca", help="the prompt format the records used")
    p.add_argument("--out", default=None, help="write the records with their scores here")
    args = p.parse_args(argv)
    try:
        records = json.loads(open(args.responses, encoding="utf-8").read())
        client = ChatClient(args.base_url, args.model, api_key=os.environ.get(args.api_key_env))
        result = score_responses(records, client, template=args.template)
    except (OSError, ValueError, KeyError, JudgeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.out:
        scored = [{**r, "score": s} for r, s in zip(records, result["scores"])]
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(scored, f, indent=2, ensure_ascii=False)
    mean = "n/a" if result["mean"] is None else f"{result['mean']:.2f}"
    print(f"judge {args.model}: mean score {mean} over {len(records) - result['unparsed']} of "
          f"{len(records)} responses ({result['unparsed']} replies held no usable score)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
