"""Zero-shot task accuracy from EleutherAI's lm-evaluation-harness, on a model held in memory.

lm-eval's Hugging Face wrapper (HFLM) takes the model object itself, so nothing is reloaded or copied;
`simple_evaluate` runs the tasks. Task definitions come from lm-eval's own folder and, optionally, from a
folder of the user's YAML files (its include path), so local tasks with local data work offline.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

# the dataset builders of `datasets` that read local files: a task built on one of them needs no network
LOCAL_BUILDERS = frozenset({"json", "csv", "text", "parquet", "arrow", "pandas"})
REPORTED_METRICS = ("acc", "acc_norm")


class TaskError(Exception):
    """A task that cannot be evaluated: unknown, or its definition or data is broken."""


@dataclass
class TaskSuite:
    """The requested tasks, resolved against lm-eval's task index: the ones that can run, and those whose data needs
    a network that cannot be reached (name -> why)."""

    manager: Any  # lm_eval.tasks.TaskManager
    names: list[str]
    unavailable: dict[str, str] = field(default_factory=dict)


def task_manager(include_path: Path | None, names: list[str]) -> Any:
    """lm-eval's task index: the tasks defined in `include_path`, and lm-eval's own unless every name is defined there
    (indexing lm-eval's thousands of task files takes seconds)."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(name in local.task_index for name in names):
            return local
    return TaskManager(include_path=str(include_path) if include_path is not None else None)


def leaf_configs(manager: Any, name: str) -> list[dict]:
    """The configs of the tasks a name stands for: itself, or the members of a group or tag."""
    entry = manager.task_index[name]
    kind = getattr(entry.kind, "name", str(entry.kind))
    if kind == "TASK":
        return [entry.cfg or {}]
    if kind == "TAG":
        return [config for other in manager.task_index.values() if name in (other.tags or ()) for config in [other.cfg or {}]]
    members = (entry.cfg or {}).get("task", [])
    members = [members] if isinstance(members, (str, dict)) else members
    configs = []
    for member in members:
        if isinstance(member, dict):
            configs.append(member)
        elif member in manager.task_index:
            configs.extend(leaf_configs(manager, member))
    return configs


def needs_network(config: dict) -> bool:
    """Whether a task's data comes from the hub (not a local builder over local files, nor a local folder)."""
    path = config.get("dataset_path")
    return path is not None and path not in LOCAL_BUILDERS and not Path(str(path)).expanduser().exists()


def resolve_tasks(names: list[str], include_path: Path | None, hub_problem: Callable[[], str | None]) -> TaskSuite:
    """Check the task names and load each task's data once (so that a broken task fails before any model work).
    With the hub out of reach (`hub_problem()` says why, None when it can be reached; asked only when a task needs
    it), tasks whose data lives there are set aside as unavailable."""
    manager = task_manager(include_path, names)
    unknown = [name for name in names if name not in manager.task_index]
    if unknown:
        where = f"lm-eval's tasks or {include_path}" if include_path is not None else "lm-eval's tasks"
        raise TaskError(f"unknown task(s) {', '.join(unknown)}: not in {where}")
    suite = TaskSuite(manager, [])
    problem: list[str | None] = []  # asked once
    for name in names:
        if any(needs_network(config) for config in leaf_configs(manager, name)):
            if not problem:
                problem.append(hub_problem())
            if problem[0] is not None:
                suite.unavailable[name] = f"its data comes from the Hugging Face hub, which cannot be reached ({problem[0]}); it needs a network"
                continue
        try:
            manager.load([name])
        except Exception as error:  # lm-eval and datasets raise many kinds of errors
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise TaskError(f"task {name} cannot be loaded: {message[:300]}") from None
        suite.names.append(name)
    return suite


def task_figures(results: dict, samples: dict) -> dict[str, dict]:
    """Per task: accuracy (and normalised accuracy where the task has it), their standard errors, and the number of
    examples scored, from simple_evaluate's output."""
    figures = {}
    for task, metrics in results.items():
        row: dict[str, Any] = {}
        for metric in REPORTED_METRICS:
            value = metrics.get(f"{metric},none")
            if value is not None:
                row[metric] = value
                stderr = metrics.get(f"{metric}_stderr,none")
                row[f"{metric}_stderr"] = stderr if isinstance(stderr, float) else None
        if row:
            row["samples"] = samples.get(task, {}).get("effective")
            figures[task] = row
    return figures


@contextlib.contextmanager
def only_errors_from(logger_name: str) -> Iterator[None]:
    """Let the named logger report only errors for the enclosed work, then restore its level."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def evaluate_tasks(model: nn.Module, tokenizer: Any, suite: TaskSuite, *, limit: int | None, batch_size: int, seed: int = 0) -> dict[str, dict]:
    """Zero-shot figures of `model` (as it is, on its own device) on the suite's tasks."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if not suite.names:
        return {}
    with only_errors_from("lm_eval"):  # its warnings about being handed a model object are expected here
        wrapper = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = lm_eval.simple_evaluate(model=wrapper, tasks=suite.names, task_manager=suite.manager, limit=limit, num_fewshot=0,
                                         log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                         fewshot_random_seed=seed)
    return task_figures(output["results"], output.get("n-samples", {}))
