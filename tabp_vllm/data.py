"""Calibration and evaluation data: two JSONL schemas and loaders for the shared data sets.

User files are JSONL, one JSON object a line, blank lines ignored. Two schemas:

MCQA (multiple choice)::

    {"question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide"], "gold": 1}

  - ``question`` (string, required), ``choices`` (list of >= 2 strings, required),
  - ``gold`` (required): the 0-based index of the right choice, or its exact text,
  - ``context`` (string, optional): text put before the question (e.g. a BoolQ passage),
  - ``id`` (optional).

Free text (perplexity / full-vocabulary calibration)::

    {"text": "Any passage of text ..."}

Known data sets (read from ``../shared/data`` relative to the repository, or ``$TABP_VLLM_DATA``):
arc_easy, arc_challenge (train / validation / test), boolq, piqa (only a dev split exists: a seeded
half of it is ``train``, the other half ``validation``), gsm8k (train / test, free text: question +
worked answer), wikitext2 (free text, one paragraph per sample; the split's
``wiki.{train,valid,test}.raw`` file, of which the shared folder has only test).

Any fault in a file stops with a `TabpError` of one line: ``FILE:LINE: message``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

from tabp_vllm.errors import TabpError

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DATA = Path(__file__).resolve().parent / "demo_data"
SPLIT_SEED = 1234  # fixed: the train/validation halves of dev-only sets never move


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


def data_root() -> Path:
    env = os.environ.get("TABP_VLLM_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


# --------------------------------------------------------------------------- user JSONL

def _fail(where: str, line: int | None, msg: str) -> TabpError:
    return TabpError(f"{where}:{line}: {msg}" if line is not None else f"{where}: {msg}")


def parse_item(obj: Any, where: str, line: int | None) -> Item:
    """One record of the MCQA or free-text schema, validated."""
    if not isinstance(obj, dict):
        raise _fail(where, line, "expected a JSON object")
    if "text" in obj and "question" not in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise _fail(where, line, "'text' must be a non-empty string")
        return TextItem(obj["text"], str(obj.get("id", "")))
    for key in ("question", "choices", "gold"):
        if key not in obj:
            raise _fail(where, line, f"missing field '{key}' (MCQA needs question, choices, "
                                     f"gold; free text needs text)")
    q, choices, gold = obj["question"], obj["choices"], obj["gold"]
    if not isinstance(q, str) or not q.strip():
        raise _fail(where, line, "'question' must be a non-empty string")
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)):
        raise _fail(where, line, "'choices' must be a list of at least 2 non-empty strings")
    if isinstance(gold, bool):
        raise _fail(where, line, f"gold answer {gold!r} is not among the choices")
    if isinstance(gold, int):
        if not 0 <= gold < len(choices):
            raise _fail(where, line, f"gold answer index {gold} is not among the choices "
                                     f"(0..{len(choices) - 1})")
        gi = gold
    elif isinstance(gold, str) and gold in choices:
        gi = choices.index(gold)
    else:
        raise _fail(where, line, f"gold answer {gold!r} is not among the choices")
    ctx = obj.get("context", "")
    if not isinstance(ctx, str):
        raise _fail(where, line, "'context' must be a string")
    return MCQAItem(q, list(choices), gi, ctx, str(obj.get("id", "")))


def _read_lines(path: Path) -> list[tuple[int, str]]:
    where = str(path)
    if not path.exists():
        raise _fail(where, None, "data file not found")
    if path.is_dir():
        raise _fail(where, None, "is a directory, not a data file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _fail(where, None, "not UTF-8 text") from None
    lines = [(i, ln) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    if not lines:
        raise _fail(where, None, "empty file (no records)")
    return lines


def _json_line(where: str, lineno: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise _fail(where, lineno, f"malformed JSON ({exc.msg} at column {exc.colno})") from None


def load_jsonl(path: str | Path, name: str | None = None, split: str = "user") -> Dataset:
    """A user's JSONL file in the MCQA or the free-text schema (one kind per file)."""
    path = Path(path)
    where = str(path)
    items: list[Item] = []
    kind = None
    for lineno, line in _read_lines(path):
        item = parse_item(_json_line(where, lineno, line), where, lineno)
        k = "mcqa" if isinstance(item, MCQAItem) else "text"
        if kind is None:
            kind = k
        elif k != kind:
            raise _fail(where, lineno, f"{k} record in a {kind} file (one schema per file)")
        items.append(item)
    return Dataset(name or path.stem, split, kind or "mcqa", items, str(path))


# --------------------------------------------------------------------------- shared data sets

def _arc_item(obj: Any, where: str, line: int) -> MCQAItem:
    try:
        q = obj["question"]
        if isinstance(q, dict):  # official AI2 layout
            stem, ch = q["stem"], q["choices"]
            texts, labels = [c["text"] for c in ch], [c["label"] for c in ch]
        else:
            stem, texts, labels = q, obj["choices"]["text"], obj["choices"]["label"]
        key = obj["answerKey"]
    except (KeyError, TypeError) as exc:
        raise _fail(where, line, f"missing field {exc}") from None
    if key not in labels:
        raise _fail(where, line, f"gold answer {key!r} is not among the choices {labels}")
    return parse_item({"question": stem, "choices": texts, "gold": labels.index(key),
                       "id": obj.get("id", "")}, where, line)


def _load_arc_easy(split: str) -> tuple[list[Item], str]:
    path = data_root() / "arc_easy" / f"{split}.json"
    where = str(path)
    if not path.exists():
        raise _fail(where, None, "data file not found (set TABP_VLLM_DATA to the data folder)")
    try:
        arr = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise _fail(where, exc.lineno, f"malformed JSON ({exc.msg})") from None
    if not isinstance(arr, list) or not arr:
        raise _fail(where, None, "expected a non-empty JSON array")
    # A JSON array has no record lines: report the record's position (1-based) as the "line".
    return [_arc_item(o, where, i) for i, o in enumerate(arr, 1)], where


def _load_arc_challenge(split: str) -> tuple[list[Item], str]:
    fname = {"train": "Train", "validation": "Dev", "dev": "Dev", "test": "Test"}[split]
    path = data_root() / "arc_challenge" / f"ARC-Challenge-{fname}.jsonl"
    where = str(path)
    return [_arc_item(_json_line(where, n, ln), where, n) for n, ln in _read_lines(path)], where


def _half(items: list[Item], split: str) -> list[Item]:
    idx = list(range(len(items)))
    random.Random(SPLIT_SEED).shuffle(idx)
    cut = len(idx) // 2
    chosen = sorted(idx[:cut]) if split == "train" else sorted(idx[cut:])
    return [items[i] for i in chosen]


def _load_boolq(split: str) -> tuple[list[Item], str]:
    path = data_root() / "boolq" / "dev.jsonl"
    where = str(path)
    items: list[Item] = []
    for n, ln in _read_lines(path):
        o = _json_line(where, n, ln)
        try:
            ans = str(o["answer"]).strip().lower()
            q, passage = o["question"], o["passage"]
        except (KeyError, TypeError) as exc:
            raise _fail(where, n, f"missing field {exc}") from None
        if ans not in ("true", "false"):
            raise _fail(where, n, f"gold answer {o['answer']!r} is not among the choices")
        q = q.strip()
        items.append(parse_item({"question": q[:1].upper() + q[1:] + "?", "choices": ["no", "yes"],
                                 "gold": int(ans == "true"), "context": passage}, where, n))
    return (items if split == "dev" else _half(items, split)), where


def _load_piqa(split: str) -> tuple[list[Item], str]:
    path = data_root() / "piqa" / "dev.jsonl"
    lab_path = data_root() / "piqa" / "dev-labels.lst"
    where = str(path)
    rows = _read_lines(path)
    labels = _read_lines(lab_path)
    if len(labels) != len(rows):
        raise _fail(str(lab_path), None, f"{len(labels)} labels for {len(rows)} items in {path}")
    items: list[Item] = []
    for (n, ln), (ln2, lab) in zip(rows, labels):
        o = _json_line(where, n, ln)
        try:
            gold = int(lab.strip())
        except ValueError:
            raise _fail(str(lab_path), ln2, f"label {lab.strip()!r} is not 0 or 1") from None
        if not isinstance(o, dict) or not all(k in o for k in ("goal", "sol1", "sol2")):
            raise _fail(where, n, "missing field (PIQA needs goal, sol1, sol2)")
        items.append(parse_item({"question": o["goal"], "choices": [o["sol1"], o["sol2"]],
                                 "gold": gold, "id": o.get("id", "")}, where, n))
    return (items if split == "dev" else _half(items, split)), where


def _load_gsm8k(split: str) -> tuple[list[Item], str]:
    path = data_root() / "gsm8k" / f"{'train' if split == 'train' else 'test'}.jsonl"
    where = str(path)
    items: list[Item] = []
    for n, ln in _read_lines(path):
        o = _json_line(where, n, ln)
        if not isinstance(o, dict) or "question" not in o or "answer" not in o:
            raise _fail(where, n, "missing field (GSM8K needs question, answer)")
        items.append(TextItem(f"Question: {o['question']}\nAnswer: {o['answer']}"))
    return items, where


WIKITEXT2_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}


def _load_wikitext2(split: str) -> tuple[list[Item], str]:
    folder = data_root() / "wikitext2"
    path = folder / WIKITEXT2_FILES[split]
    if not path.exists():  # the shared folder ships only the test split
        have = [s for s, f in WIKITEXT2_FILES.items() if (folder / f).exists()]
        raise TabpError(f"task 'wikitext2' has no {split!r} split here: {path} not found "
                        f"(present: {', '.join(have) or 'none'})")
    where = str(path)
    items: list[Item] = []
    for _, ln in _read_lines(path):
        s = ln.strip()
        if len(s) >= 200 and not s.startswith("="):  # a paragraph, not a heading
            items.append(TextItem(s))
    return items, where


KNOWN: dict[str, tuple[str, Any, tuple[str, ...]]] = {
    "arc_easy": ("mcqa", _load_arc_easy, ("train", "validation", "test")),
    "arc_challenge": ("mcqa", _load_arc_challenge, ("train", "validation", "test")),
    "boolq": ("mcqa", _load_boolq, ("train", "validation", "dev")),
    "piqa": ("mcqa", _load_piqa, ("train", "validation", "dev")),
    "gsm8k": ("text", _load_gsm8k, ("train", "test")),
    "wikitext2": ("text", _load_wikitext2, tuple(WIKITEXT2_FILES)),
    "demo": ("mcqa", None, ("train", "validation")),
}


LMEVAL_PREFIX = "lmeval:"  # --task lmeval:NAME reads lm-eval's task NAME (tabp_arc_easy, ...)


def _load_lmeval(name: str, split: str) -> Dataset:
    """An lm-eval task's documents as calibration items, in the task's own prompt format:
    doc_to_text as the prompt, doc_to_choice, doc_to_target; free text (prompt, delimiter,
    target) for a task that is not multiple choice."""
    from tabp_vllm.lmeval_tasks import task_docs

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
            raise _fail(where, None, f"target_delimiter {delim!r}: only ' ' is supported")
        choices = [str(c) for c in task.doc_to_choice(doc)]
        gold = target[0] if isinstance(target, list) else target
        if isinstance(gold, str) and not gold.isdigit():
            if gold not in choices:
                raise _fail(where, n, f"gold answer {gold!r} is not among the choices")
            gold = choices.index(gold)
        gold = int(gold)
        if not 0 <= gold < len(choices):
            raise _fail(where, n, f"gold answer index {gold} is not among the choices")
        items.append(TaskPromptItem(question=prompt, choices=choices, gold=gold, id=str(n - 1),
                                    prompt=prompt))
    if not items:
        raise _fail(where, None, f"no documents in split {split!r}")
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
    kind, fn, splits = KNOWN[task]
    if split not in splits:
        raise TabpError(f"task {task!r} has no split {split!r} (splits: {', '.join(splits)})")
    if fn is None:  # the generated demo set shipped with the package
        ds = load_jsonl(PACKAGE_DATA / "demo_mcqa.jsonl", name="demo", split=split)
        ds.items = _half(ds.items, split)
        return ds
    items, source = fn(split)
    if not items:
        raise _fail(source, None, "no usable records")
    return Dataset(task, split, kind, items, source)


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
