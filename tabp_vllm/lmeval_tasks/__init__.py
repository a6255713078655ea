"""lm-eval tasks: our offline task folder, and any lm-eval task read as calibration data.

The folder holds YAML tasks that mirror lm-eval 0.4.13's arc_easy, arc_challenge, piqa and boolq
(same doc_to_text, doc_to_choice, doc_to_target and metrics) on the local data sets
(`datasets_local.py`, the one reader of the local files, which `tabp_vllm.data` converts into
calibration items too), named `tabp_<task>` so that lm-eval's own tasks keep their names and,
with the hub reachable, work unchanged. Imports lm_eval (when a task is loaded), never vLLM, nor
the rest of tabp_vllm but its errors.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from tabp_vllm.errors import TabpError, first_line

TASKS_DIR = Path(__file__).resolve().parent
JSONL_TASK = "tabp_jsonl"  # the base of a user's MCQA JSONL file as a task (tabp_jsonl.yaml)


def task_manager(include: list[str] | None = None, tasks: list[str] | None = None):
    """lm-eval's TaskManager over its own tasks, ours, then `include` (later folders win).

    Given the `tasks` to be run, and each one a single task of ours or of `include` (no group or
    tag, which may name lm-eval's tasks), lm-eval's own thousands of YAML files are left out of
    the index: indexing them takes ~10 s of a 2-core box, in every evaluation process."""
    include = tuple(include or ())
    if tasks:
        ours = _task_manager(include, False)
        if set(tasks) <= set(ours.all_subtasks):
            return ours
    return _task_manager(include, True)


@lru_cache(maxsize=8)
def _task_manager(include: tuple[str, ...], defaults: bool):
    # once per process and folder set
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASKS_DIR)] + list(include), include_defaults=defaults)


def offline_tasks(tm=None) -> list[str]:
    tm = tm or task_manager()
    return sorted(t for t in tm.all_tasks if t.startswith("tabp_") and t != JSONL_TASK)


def _unavailable(task: str, exc: Exception) -> TabpError:
    return TabpError(f"task {task!r}: its data could not be loaded ({first_line(exc)[:200]}); offline, use the "
                     f"tabp_{task.removeprefix('tabp_')} task on the local files ($TABP_VLLM_DATA) "
                     f"or point a task YAML at local files (custom_dataset, or dataset_path: json "
                     f"with dataset_kwargs.data_files) in --include_path, or use --data FILE.jsonl")


def load_task_object(task: str, include: list[str] | None = None):
    """The lm-eval Task `task`, its data loaded; a task that is unknown or whose data cannot be
    had is one line saying how to fix it."""
    from lm_eval.tasks import get_task_dict

    tm = task_manager(include, [task])
    if task not in set(tm.all_tasks):
        raise TabpError(f"unknown lm-eval task {task!r}: the offline tasks are "
                        f"{', '.join(offline_tasks(tm))}; see `lm-eval ls tasks` for the rest")
    try:
        obj = get_task_dict([task], tm)[task]
    except TabpError as exc:  # datasets_local: a file missing or faulty, named with its line
        raise TabpError(f"task {task!r}: {exc}") from None
    except Exception as exc:  # the hub out of reach, a data set missing, ...
        raise _unavailable(task, exc) from None
    if isinstance(obj, dict):
        raise TabpError(f"lm-eval name {task!r} is a group of tasks: name one of its tasks")
    return obj


SPLIT_KEYS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}


def task_docs(task: str, split: str) -> tuple[Any, list[dict[str, Any]]]:
    """(Task, documents of `split`: train, validation or test, the task's own split names)."""
    obj = load_task_object(task)
    have = {s: getattr(obj.config, k) for s, k in SPLIT_KEYS.items() if getattr(obj.config, k)}
    if split not in have:
        raise TabpError(f"lm-eval task {task!r} has no {split!r} split "
                        f"(splits: {', '.join(have) or 'none'})")
    docs = {"train": obj.training_docs, "validation": obj.validation_docs,
            "test": obj.test_docs}[split]()
    return obj, list(docs)
