"""Score a model on lm-evaluation-harness tasks, offline.

  python -m jaxgpt.cli.eval --model runs/ch07 --tasks book_instruct,jaxgpt_hellaswag \\
      --metadata '{"hellaswag_file": "data/hellaswag_val.jsonl"}' --limit 100 --output eval.json

--model is anything `jaxgpt.load_model` takes. --tasks names the harness's tasks, jaxgpt's own
(jaxgpt_hellaswag, book_instruct, book_instruct_gen: local files) and those in --include-path
folders. The hub stays offline (HF_DATASETS_OFFLINE, HF_HUB_OFFLINE) unless --online: a task whose
data is not on this machine is named in one line. Prints the harness's table; --output writes its
results as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jaxgpt.entrypoint import USER_ERRORS, fail, setup_process


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxgpt.cli.eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="gpt2[-medium|-large|-xl], an export dir or a run dir")
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    p.add_argument("--include-path", action="append", default=[], help="a folder of task YAML files")
    p.add_argument("--metadata", default=None, help="JSON object passed to every task (e.g. data files)")
    p.add_argument("--output", default=None, help="write the results JSON here")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass; decode slots")
    p.add_argument("--dtype", default=None, help="compute dtype (float32, bfloat16; default: the model's)")
    p.add_argument("--step", type=int, default=None, help="a run directory's checkpoint step")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--bootstrap-iters", type=int, default=0, help="resamples for the stderr (0: none)")
    p.add_argument("--online", action="store_true", help="let the harness download task data")
    return p.parse_args(argv)


def _metadata(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--metadata is not JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise ValueError("--metadata must be a JSON object")
    return value


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.online:  # before datasets is imported: a hub task fails at once, not by timeout
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    setup_process()  # this process's settings (jaxgpt/entrypoint.py), before any JAX computation
    try:
        from jaxgpt.tasks.harness.lm import JaxgptLM
        from jaxgpt.tasks.harness.run import check_tasks, evaluate, task_manager
    except ImportError as err:
        return fail(RuntimeError(f"the evaluation harness is not installed ({err.name}): "
                                 "pip install 'jaxgpt[eval]'"), 1)
    from lm_eval.utils import handle_non_serializable, make_table

    from jaxgpt.fsutil import write_text_atomic

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        if args.limit is not None and not args.limit > 0:
            raise ValueError(f"--limit must be positive, got {args.limit:g}")
        limit = None if args.limit is None else int(args.limit) if args.limit >= 1 else args.limit
        metadata = _metadata(args.metadata)
        manager = task_manager(args.include_path, metadata, tasks)
        check_tasks(manager, tasks)  # every task and its data, before the model loads
        lm = JaxgptLM(args.model, step=args.step, dtype=args.dtype, batch_size=args.batch_size)
        results = evaluate(lm, tasks, limit=limit, manager=manager, num_fewshot=args.num_fewshot,
                           bootstrap_iters=args.bootstrap_iters)
        lm.close()
    except USER_ERRORS as err:
        return fail(err, 1)
    print(make_table(results))
    if args.output:
        write_text_atomic(args.output, json.dumps(results, indent=2, default=handle_non_serializable))
        print(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
