"""Score a finetuned model's test responses with a judge model over an OpenAI-style chat API.

  python -m jaxgpt.cli.judge runs/NAME/test_responses.json --model llama3

Scores are saved as they come in (OUT.progress.json beside --out, else
RESPONSES.judge-progress.json); a run that stops midway continues when rerun with the same
arguments, and the progress file is removed once the result is written.
See jaxgpt/tasks/instruct/judge.py for the servers it works with.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jaxgpt.fsutil import write_json_atomic
from jaxgpt.tasks.instruct.judge import (
    DEFAULT_BASE_URL,
    ChatClient,
    JudgeError,
    redact,
    score_responses,
    url_secrets,
)


def read_records(path: str, response_key: str = "model_response") -> list[dict]:
    """The records of a test_responses.json, each checked to hold what the judge needs."""
    try:
        records = json.loads(Path(path).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path} holds {type(records).__name__}, not a JSON array of records")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {i} is {type(record).__name__}, not an object")
        bad = [k for k in ("instruction", "output", response_key) if not isinstance(record.get(k), str)]
        if bad or not isinstance(record.get("input", ""), str):
            raise ValueError(f"{path}: record {i} lacks text for {', '.join(bad or ['input'])}")
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxgpt.cli.judge", description=__doc__.split("\n")[0])
    p.add_argument("responses", help="a test_responses.json written by finetuning")
    p.add_argument("--model", required=True, help="the judge model's name on the server")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL)
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable with a key")
    p.add_argument("--template", default="alpaca", help="the prompt format the records used")
    p.add_argument("--out", default=None, help="write the records with their scores here")
    args = p.parse_args(argv)
    api_key = os.environ.get(args.api_key_env)
    secrets = [api_key, *url_secrets(args.base_url)]  # never echoed, whatever fails
    progress = Path(f"{args.out}.progress.json" if args.out else f"{args.responses}.judge-progress.json")
    try:
        records = read_records(args.responses)
        client = ChatClient(args.base_url, args.model, api_key=api_key)
        result = score_responses(records, client, template=args.template, progress=progress)
        if args.out:
            scored = [{**r, "score": s} for r, s in zip(records, result["scores"])]
            write_json_atomic(Path(args.out), scored)
    except (OSError, ValueError, KeyError, JudgeError) as err:
        kept = f" (scores so far are kept in {progress}: rerun to continue)" if progress.is_file() else ""
        print(redact(f"error: {err}{kept}", secrets), file=sys.stderr)
        return 1
    progress.unlink(missing_ok=True)  # the result is kept: nothing left to resume
    mean = "n/a" if result["mean"] is None else f"{result['mean']:.2f}"
    resumed = f"; {result['resumed']} scored by an earlier run" if result["resumed"] else ""
    print(f"judge {args.model}: mean score {mean} over {len(records) - result['unparsed']} of "
          f"{len(records)} responses ({result['unparsed']} replies held no usable score{resumed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
