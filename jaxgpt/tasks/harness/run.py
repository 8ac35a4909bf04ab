"""Running lm-evaluation-harness tasks on a jaxgpt model, offline: jaxgpt's own task files
(tasks/: HellaSwag and the book's instruction test split, from local files) beside the harness's
and any folder of the user's; a task whose data cannot be read (a hub data set, offline) is
named in one line, before any model runs.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Sequence

import jax
import lm_eval
from lm_eval.tasks import TaskManager, get_task_dict

from jaxgpt.config import GPTConfig
from jaxgpt.data.tokenizer import get_tokenizer
from jaxgpt.distributed import host_copy
from jaxgpt.tasks.harness.lm import JaxgptLM

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
HUB_HINT = ("download it once where the Hugging Face hub is reachable (the datasets cache keeps it), "
            f"or write a task that reads a local file, as {TASKS_DIR / 'jaxgpt_hellaswag.yaml'} "
            "does, and pass its folder with --include-path")


class TaskDataError(ValueError):
    """A task's data cannot be read here."""


def task_manager(include_path: Sequence[str | os.PathLike] = (), metadata: dict | None = None,
                 tasks: Sequence[str] = ()):
    """The harness's TaskManager over jaxgpt's tasks (tasks/), the `include_path` folders and,
    unless those hold every one of `tasks`, the harness's own (indexing its ~15,000 takes ~15 s)."""
    folders = [TASKS_DIR, *map(Path, include_path)]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise FileNotFoundError(f"task folder {missing[0]} does not exist")
    paths = [str(f) for f in folders]
    local = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    if tasks and set(tasks) <= set(local.all_tasks):
        return local
    return TaskManager(include_path=paths, metadata=metadata)


def check_tasks(manager, tasks: Sequence[str]) -> None:
    """Every task known and its data readable, else one line naming the first that is not."""
    if not tasks:
        raise ValueError("no tasks given")
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown task {name!r}{hint}")
    for name in tasks:
        try:
            get_task_dict([name], manager)
        except (FileNotFoundError, ValueError) as err:
            if "does not exist" in str(err):  # our task files' own message: the file to give
                raise TaskDataError(f"task {name}: {str(err).splitlines()[0]}") from None
            raise _data_error(manager, name, err) from None
        except Exception as err:  # a hub download, offline or unreachable: several libraries' types
            raise _data_error(manager, name, err) from None


def _data_error(manager, name: str, err: Exception) -> TaskDataError:
    entry = manager.task_index.get(name)
    cfg = (entry.cfg if entry is not None else None) or {}
    source = cfg.get("dataset_path")
    first = (str(err).splitlines() or [""])[0][:200]
    if source and "custom_dataset" not in cfg:
        return TaskDataError(f"task {name} reads the data set {source} from the Hugging Face hub, "
                             f"which could not be read here ({type(err).__name__}: {first}); {HUB_HINT}")
    return TaskDataError(f"task {name}: its data could not be read ({type(err).__name__}: {first})")


def evaluate(lm, tasks: Sequence[str], *, limit: int | float | None = None, manager=None,
             include_path: Sequence[str | os.PathLike] = (), metadata: dict | None = None,
             num_fewshot: int | None = None, bootstrap_iters: int = 0, log_samples: bool = False) -> dict:
    """The harness's results dict ("results", "configs", "versions", ...) for `tasks` on `lm`
    (an lm_eval LM, e.g. `JaxgptLM`); `limit` examples per task; stderr by `bootstrap_iters`.
    A `manager` given is taken as checked (`check_tasks`); else one is built and checked."""
    if limit is not None and not limit > 0:
        raise ValueError(f"limit must be positive, got {limit}")
    if manager is None:
        manager = task_manager(include_path, metadata, tasks)
        check_tasks(manager, list(tasks))
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                   num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters,
                                   log_samples=log_samples)


def metric_values(results: dict) -> dict[str, float]:
    """{"<task>/<metric>": value} of a results dict's numbers (stderr left out)."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric = key.split(",")[0]  # "acc,none": the metric and its filter
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if number and "_stderr" not in metric and metric != "sample_len":
                flat[f"{task}/{metric}"] = float(value)
    return flat


def evaluator(tasks: Sequence[str], config: GPTConfig, *, tokenizer: str = "gpt2",
              limit: int | None = None, include_path: Sequence[str | os.PathLike] = (),
              metadata: dict | None = None):
    """`extra(params, step) -> {"<task>/<metric>": value}` for the evaluation hook; the tasks and
    their data are checked now, not at the first evaluation."""
    tasks = list(tasks)
    manager = task_manager(include_path, metadata, tasks)
    check_tasks(manager, tasks)
    tok = get_tokenizer(tokenizer)
    stops = (tok.eot_token,) if tok.eot_token < config.vocab_size else ()

    def extra(params, step):
        if jax.process_count() > 1:  # every process gathers the sharded weights and scores
            params = jax.device_put(host_copy(params))
        lm = JaxgptLM.from_params(config, params, tok, stops)
        try:
            results = evaluate(lm, tasks, limit=limit, manager=manager)
        finally:
            lm.close()
        return {f"harness/{k}": v for k, v in metric_values(results).items()}

    return extra
