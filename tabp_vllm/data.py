"""Calibration data: the items a scorer reads, converted from the rows of the local data sets,
of an lm-eval task or of a user's JSONL file.

Files are read and checked in one place, `lmeval_tasks/datasets_local.py` (the same reader feeds
the offline lm-eval tasks, so calibration and evaluation see the same records); this module only
turns rows into items (`MCQAItem`, `TextItem`) and holds the prompt formats the scorers use.

Sources of `load_task`:
- a user's JSONL file (`--data FILE`): the MCQA schema (question, choices, gold, optional context
  and id) or free text (text), described in `datasets_local`;
- a local set by name (read from ``../shared/data`` relative to the repository, or
  ``$TABP_VLLM_DATA``): arc_easy, arc_challenge (train / validation / test), boolq, piqa (only a dev
  split exists: a seeded half of it is ``train``, the other half ``validation``), gsm8k
  (train / test, free text: question + worked answer), wikitext2 (free text, one paragraph per
  sample; the split's ``wiki.{train,valid,test}.raw`` file, of which the shared folder has only
  test), demo (the generated set shipped with the package);
- an lm-eval task (`lmeval:NAME`), in the task's own prompt format.

Any fault in a file stops with a `TabpError` of one line: ``FILE:LINE: message``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

from tabp_vllm.errors import TabpError
from tabp_vllm.lmeval_tasks import task_docs
from tabp_vllm.lmeval_tasks.datasets_local import (PACKAGE_DATA, SPLITS, Row, data_root, fail,
                                                   jsonl_rows, read_rows)


@dataclass
class MCQAItem:
    question: str
    choices: list[str]
    gold: int
    context: str = ""
    id: str = ""


@dataclass
class TextItem:
    text: str
    id: str = ""


@dataclass
class TaskPromptItem(MCQAItem):
    """An MCQA item from an lm-eval task: `prompt` is its doc_to_text, the context the task's
    evaluation scores; a choice follows it after one space (lm-eval's target_delimiter)."""

    prompt: str = ""


Item = Union[MCQAItem, TextItem]


@dataclass
class Dataset:
    name: str
    split: str
    kind: str  # "mcqa" | "text"
    items: list = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, n: int | None, seed: int = 0) -> "Dataset":
        """A seeded sample of n items (all, in a seeded order, when n is None or too large)."""
        idx = list(range(len(self.items)))
        random.Random(seed).shuffle(idx)
        if n is not None:
            idx = idx[:n]
        return Dataset(self.name, self.split, self.kind, [self.items[i] for i in idx], self.source)

    def first(self, n: int | None) -> "Dataset":
        items = self.items if n is None else self.items[:n]
        return Dataset(self.name, self.split, self.kind, list(items), self.source)

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for it in self.items:
            h.update(json.dumps(asdict(it), sort_keys=True).encode())
            h.update(b"\n")
        return h.hexdigest()[:16]

    def provenance(self, seed: int) -> dict[str, Any]:
        return {"data": self.name, "split": self.split, "source": portable_source(self.source),
                "kind": self.kind, "samples": len(self.items), "seed": seed,
                "sha256": self.content_hash()}


def portable_source(source: str) -> str:
    """A data file as a mask records it: relative to the data root (`data:arc/ARC-Easy.jsonl`) or
    to the package's demo data (`package:demo_mcqa.jsonl`); any other file by its name alone
    (`user:my.jsonl`; the sha256 beside it identifies the content). Never an absolute path: it
    means nothing on another machine and leaks the local layout."""
    if not source:
        return source
    path = Path(source).expanduser()
    path = path.resolve() if path.is_absolute() or path.exists() else path
    for label, root in (("data", data_root()), ("package", PACKAGE_DATA)):
        try:
            return f"{label}:{path.relative_to(Path(root).resolve()).as_posix()}"
        except ValueError:
            continue
    return f"user:{path.name}"


# --------------------------------------------------------------------------- rows to items

def _item(row: Row) -> Item:
    """A row of the user schema (`datasets_local.check_record`)."""
    return TextItem(**row) if "text" in row else MCQAItem(**row)


def _arc(row: Row) -> MCQAItem:
    labels = row["choices"]["label"]
    return MCQAItem(row["question"], list(row["choices"]["text"]), labels.index(row["answerKey"]),
                    id=row["id"])


def _boolq(row: Row) -> MCQAItem:
    # The question capitalised and closed with "?", the passage as context: the items masks were
    # calibrated on since the start (their recorded hashes depend on it). lm-eval's BoolQ prompt
    # (tabp_boolq) uses the question as written.
    q = row["question"].strip()
    return MCQAItem(q[:1].upper() + q[1:] + "?", ["no", "yes"], row["label"], row["passage"])


def _piqa(row: Row) -> MCQAItem:
    return MCQAItem(row["goal"], [row["sol1"], row["sol2"]], row["label"], id=row["id"])


def _gsm8k(row: Row) -> TextItem:
    return TextItem(f"Question: {row['question']}\nAnswer: {row['answer']}")


# name -> (kind, the conversion of its rows); the splits and files are datasets_local's
KNOWN: dict[str, tuple[str, Callable[[Row], Item]]] = {
    "arc_easy": ("mcqa", _arc),
    "arc_challenge": ("mcqa", _arc),
    "boolq": ("mcqa", _boolq),
    "piqa": ("mcqa", _piqa),
    "gsm8k": ("text", _gsm8k),
    "wikitext2": ("text", _item),
    "demo": ("mcqa", _item),
}


def load_jsonl(path: str | Path, name: str | None = None, split: str = "user") -> Dataset:
    """A user's JSONL file in the MCQA or the free-text schema (one kind per file)."""
    kind, rows = jsonl_rows(path)
    return Dataset(name or Path(path).stem, split, kind, [_item(r) for r in rows], str(path))


LMEVAL_PREFIX = "lmeval:"  # --task lmeval:NAME reads lm-eval's task NAME (tabp_arc_easy, ...)


def _load_lmeval(name: str, split: str) -> Dataset:
    """An lm-eval task's documents as calibration items, in the task's own prompt format:
    doc_to_text as the prompt, doc_to_choice, doc_to_target; free text (prompt, delimiter,
    target) for a task that is not multiple choice."""
    task, docs = task_docs(name, split)
    delim = task.config.target_delimiter
    items: list[Item] = []
    where = f"lm-eval task {name!r}"
    for n, doc in enumerate(docs, 1):
        prompt = task.doc_to_text(doc)
        target = task.doc_to_target(doc)
        if task.OUTPUT_TYPE != "multiple_choice":
            tgt = target[0] if isinstance(target, list) else target
            items.append(TextItem(f"{prompt}{delim}{tgt}", str(n - 1)))
            continue
        if delim != " ":  # mcqa_context's continuation is one space and the choice
            raise fail(where, None, f"target_delimiter {delim!r}: only ' ' is supported")
        choices = [str(c) for c in task.doc_to_choice(doc)]
        gold = target[0] if isinstance(target, list) else target
        if isinstance(gold, str) and not gold.isdigit():
            if gold not in choices:
                raise fail(where, n, f"gold answer {gold!r} is not among the choices")
            gold = choices.index(gold)
        gold = int(gold)
        if not 0 <= gold < len(choices):
            raise fail(where, n, f"gold answer index {gold} is not among the choices")
        items.append(TaskPromptItem(question=prompt, choices=choices, gold=gold, id=str(n - 1),
                                    prompt=prompt))
    if not items:
        raise fail(where, None, f"no documents in split {split!r}")
    kind = "mcqa" if isinstance(items[0], MCQAItem) else "text"
    return Dataset(name, split, kind, items, f"lm-eval:{name}")


def load_task(task: str, split: str = "train", data: str | Path | None = None) -> Dataset:
    """A known data set by name, an lm-eval task (`lmeval:NAME`), or the user's JSONL file
    (`data`) labelled `task`."""
    if data is not None:
        return load_jsonl(data, name=task, split=split)
    if task.startswith(LMEVAL_PREFIX):
        return _load_lmeval(task[len(LMEVAL_PREFIX):], split)
    if task not in KNOWN:
        raise TabpError(f"unknown task {task!r}: known are {', '.join(KNOWN)}; "
                        f"or pass a JSONL file with --data")
    if split not in SPLITS[task]:
        raise TabpError(f"task {task!r} has no split {split!r} (splits: {', '.join(SPLITS[task])})")
    kind, convert = KNOWN[task]
    rows, source = read_rows(task, split)
    if not rows:
        raise fail(source, None, "no usable records")
    return Dataset(task, split, kind, [convert(r) for r in rows], source)


def mcqa_context(item: MCQAItem) -> str:
    """lm-evaluation-harness style context; the continuation is ' {choice}'. An item from an
    lm-eval task has the task's own context."""
    if isinstance(item, TaskPromptItem):
        return item.prompt
    pre = f"{item.context}\n" if item.context else ""
    return f"{pre}Question: {item.question}\nAnswer:"


LETTERS = "ABCDEFGHIJ"


def mcqa_lettered_prompt(item: MCQAItem) -> str:
    """The scoring prompt: options listed with letters, ending with 'Answer:'. An item from an
    lm-eval task lists them after the task's prompt, before its closing 'Answer:'."""
    opts = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
    if isinstance(item, TaskPromptItem):
        head = item.prompt[:-len("Answer:")].rstrip("\n") if item.prompt.endswith("Answer:") else item.prompt
        return f"{head}\n{opts}\nAnswer:"
    pre = f"{item.context}\n" if item.context else ""
    return f"{pre}Question: {item.question}\n{opts}\nAnswer:"
