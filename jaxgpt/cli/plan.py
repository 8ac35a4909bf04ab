"""Plan a run for a chip that is not here: compile its real steps for it and print what they need.

    python -m jaxgpt.cli.plan --config configs/gpt2_124m_fineweb.yaml --target h100x8
    python -m jaxgpt.cli.plan --config configs/default.yaml --target v5e-4 train.batch_size=64 --search

--target is one of h100, h100x8, h200, h200x8, v5e-1, v5e-4, v5e-8, v4-8, v5p-8, a count of
chips (h100x16x2: 16 GPUs on each of 2 hosts, v5e-16, v4-32) or a TPU topology (v5e:4x4);
`local` (the default) compiles for this machine's own devices. TPU targets need
`jaxgpt[tpu-plan]`, GPU targets `jaxgpt[gpu-plan]`. The library function is jaxgpt.plan.planner.plan.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jaxgpt.entrypoint import USER_ERRORS, fail, setup_process


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxgpt.cli.plan", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="a run config YAML (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides (train.batch_size=64)")
    p.add_argument("--target", default="local", help="the chips to plan for (see above)")
    p.add_argument("--json", metavar="PATH", help="also write the record as JSON ('-': stdout only)")
    p.add_argument("--search", action="store_true",
                   help="try the mesh shapes and micro-batches the chips allow; print those that fit")
    p.add_argument("--search-limit", type=int, default=24, help="at most this many shapes tried")
    p.add_argument("--decode-slots", type=int, default=32,
                   help="rows of the serving engine's decode step planned (0: none)")
    p.add_argument("--memory-gib", type=float, default=None,
                   help="memory per chip a step may use (default: the chip's usable HBM)")
    return p.parse_args(argv)


def load_run(path: str | None, overrides: list[str]):
    """The run config under the schema its sections name (classifier:, instruct:, preference:, or
    a plain run)."""
    from omegaconf import OmegaConf

    from jaxgpt.training.runconfig import RunConfig, load_config

    schema = RunConfig
    if path and os.path.isfile(path):
        keys = set(OmegaConf.load(path) or {}) | {o.split(".", 1)[0] for o in overrides}
        if "classifier" in keys:
            from jaxgpt.tasks.classification.model import ClassifierRunConfig as schema
        elif "instruct" in keys:
            from jaxgpt.tasks.instruct.finetune import InstructRunConfig as schema
        elif "preference" in keys:  # planned as its model's LM step (not yet the DPO step)
            from jaxgpt.tasks.preference.finetune import PreferenceRunConfig as schema
    return load_config(path, overrides, schema=schema)


def main(argv=None) -> int:
    setup_process()
    args = parse_args(argv)
    try:  # everything that can be refused is refused here, before any compilation
        from jaxgpt.plan.planner import Shape, check_shape, usable_bytes
        from jaxgpt.plan.targets import local_target, parse_target, target_devices

        target = parse_target(args.target)
        target = local_target() if target.name == "local" else target
        run = load_run(args.config, args.overrides)
        shape = Shape(run.train.batch_size, run.optim.accum_steps, run.mesh, run.model.remat_policy)
        devices = target_devices(target)
        check_shape(shape, len(devices))
        if args.decode_slots < 0 or args.search_limit < 1:
            raise ValueError("--decode-slots must be >= 0 and --search-limit >= 1")
    except USER_ERRORS as err:
        return fail(err, 2)
    limit = None if args.memory_gib is None else int(args.memory_gib * (1 << 30))
    return run_plan(args, run, shape, target, devices, usable_bytes(target, limit), limit)


def run_plan(args, run, shape, target, devices, budget, limit) -> int:
    from jaxgpt.plan import advice, report
    from jaxgpt.plan.planner import plan

    try:
        record = plan(run.model, run.optim, shape, target, decode_slots=args.decode_slots,
                      memory_limit=limit, devices=devices)
        if not record["train"]["memory"].get("fits", True):
            record["advice"] = advice.fit_advice(run.model, run.optim, shape, target, devices, budget)
        if args.search:
            record["search"] = advice.search(run.model, run.optim, shape, target, devices,
                                             budget, args.search_limit)
    except USER_ERRORS as err:
        return fail(err, 1)
    if args.json != "-":
        print(report.text(record))
        if args.search:
            print(f"shapes that fit ({len(record['search'])}), fastest roofline first:")
            print(report.search_lines(record["search"]))
    if args.json:
        out = json.dumps(record, indent=1, default=str)
        if args.json == "-":
            print(out)
        else:
            with open(args.json, "w") as f:
                f.write(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
