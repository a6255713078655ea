"""Every local data file, read and checked in this one place: the shared data sets
($TABP_VLLM_DATA, else ../shared/data), the demo set shipped with the package and a user's JSONL
file, each as rows (plain dicts).

The rows of ARC, BoolQ and PIQA have the layout of lm-eval's own hub data sets (`ai2_arc`,
`super_glue/boolq`, `piqa`), so the YAML next to this file is lm-eval's YAML with only the data
source changed: the functions at the bottom are those tasks' `custom_dataset` (lm-eval calls them
with the task's `metadata` and `dataset_kwargs` as keywords; they return a `datasets.DatasetDict`).
`tabp_vllm.data` turns the same rows (`read_rows`) into calibration items, so the documents lm-eval
evaluates and the items a mask is calibrated on come from one reader. GSM8K and WikiText-2 have no
offline task (lm-eval's own are generation and rolling-perplexity tasks), but their files are read
here too, so that one module knows the shared folder's formats.

BoolQ, PIQA and the demo set ship one split: a seeded half of it (`half`, `SPLIT_SEED`) is `train`,
the other half `validation` (a mask calibrated on `train` is scored on items it never saw), and
`dev` is the whole file.

A user's file is JSONL, one JSON object a line, blank lines ignored, in one of two schemas:

MCQA (multiple choice)::

    {"question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide"], "gold": 1}

  - ``question`` (string, required), ``choices`` (list of >= 2 strings, required),
  - ``gold`` (required): the 0-based index of the right choice, or its exact text,
  - ``context`` (string, optional): text put before the question (e.g. a BoolQ passage),
  - ``id`` (optional).

Free text (perplexity / full-vocabulary calibration)::

    {"text": "Any passage of text ..."}

Any fault in a file stops with a `TabpError` of one line: ``FILE:LINE: message``. Imports neither
lm-eval (but `datasets` for the task data) nor the rest of tabp_vllm, but its errors.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from tabp_vllm.errors import TabpError

PACKAGE_DATA = Path(__file__).resolve().parents[1] / "demo_data"
REPO_ROOT = PACKAGE_DATA.parents[1]
SPLIT_SEED = 1234  # fixed: the train/validation halves of one-split sets never move

Row = dict[str, Any]


def data_root() -> Path:
    env = os.environ.get("TABP_VLLM_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def fail(where: str, line: int | None, msg: str) -> TabpError:
    return TabpError(f"{where}:{line}: {msg}" if line is not None else f"{where}: {msg}")


def half(rows: list, split: str) -> list:
    """The seeded half of a one-split set that is `split`: train, or validation (the rest), each
    in file order."""
    idx = list(range(len(rows)))
    random.Random(SPLIT_SEED).shuffle(idx)
    cut = len(idx) // 2
    chosen = sorted(idx[:cut]) if split == "train" else sorted(idx[cut:])
    return [rows[i] for i in chosen]


# --------------------------------------------------------------------------- reading files

def _read_lines(path: Path) -> list[tuple[int, str]]:
    """The non-blank lines of a text file with their 1-based numbers."""
    where = str(path)
    if not path.exists():
        raise fail(where, None, "data file not found")
    if path.is_dir():
        raise fail(where, None, "is a directory, not a data file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise fail(where, None, "not UTF-8 text") from None
    lines = [(i, ln) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    if not lines:
        raise fail(where, None, "empty file (no records)")
    return lines


def _json_line(where: str, lineno: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise fail(where, lineno, f"malformed JSON ({exc.msg} at column {exc.colno})") from None


def _shared(*parts: str) -> Path:
    """A file of the shared data folder, which must be there."""
    path = data_root().joinpath(*parts)
    if not path.exists():
        raise fail(str(path), None, f"data file not found (set TABP_VLLM_DATA to the folder that "
                                    f"holds {'/'.join(parts)})")
    return path


# --------------------------------------------------------------------------- a user's JSONL

def check_record(obj: Any, where: str, line: int | None) -> Row:
    """One record of the MCQA or free-text schema, validated: {question, choices, gold (the
    index), context, id} or {text, id}."""
    if not isinstance(obj, dict):
        raise fail(where, line, "expected a JSON object")
    if "text" in obj and "question" not in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise fail(where, line, "'text' must be a non-empty string")
        return {"text": obj["text"], "id": str(obj.get("id", ""))}
    for key in ("question", "choices", "gold"):
        if key not in obj:
            raise fail(where, line, f"missing field '{key}' (MCQA needs question, choices, "
                                    f"gold; free text needs text)")
    q, choices, gold = obj["question"], obj["choices"], obj["gold"]
    if not isinstance(q, str) or not q.strip():
        raise fail(where, line, "'question' must be a non-empty string")
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)):
        raise fail(where, line, "'choices' must be a list of at least 2 non-empty strings")
    if isinstance(gold, bool):
        raise fail(where, line, f"gold answer {gold!r} is not among the choices")
    if isinstance(gold, int):
        if not 0 <= gold < len(choices):
            raise fail(where, line, f"gold answer index {gold} is not among the choices "
                                    f"(0..{len(choices) - 1})")
        gi = gold
    elif isinstance(gold, str) and gold in choices:
        gi = choices.index(gold)
    else:
        raise fail(where, line, f"gold answer {gold!r} is not among the choices")
    ctx = obj.get("context", "")
    if not isinstance(ctx, str):
        raise fail(where, line, "'context' must be a string")
    return {"question": q, "choices": list(choices), "gold": gi, "context": ctx,
            "id": str(obj.get("id", ""))}


def jsonl_rows(path: str | Path) -> tuple[str, list[Row]]:
    """A JSONL file in the MCQA or the free-text schema (one kind per file): (kind, rows), kind
    "mcqa" or "text"."""
    path = Path(path)
    where = str(path)
    rows: list[Row] = []
    kind = None
    for lineno, line in _read_lines(path):
        row = check_record(_json_line(where, lineno, line), where, lineno)
        k = "text" if "text" in row else "mcqa"
        if kind is None:
            kind = k
        elif k != kind:
            raise fail(where, lineno, f"{k} record in a {kind} file (one schema per file)")
        rows.append(row)
    return kind or "mcqa", rows


# --------------------------------------------------------------------------- the shared sets

def _arc_row(obj: Any, where: str, line: int) -> Row:
    """An ARC record, official AI2 layout or Hugging Face `ai2_arc`'s, in `ai2_arc`'s."""
    try:
        q = obj["question"]
        if isinstance(q, dict):  # official AI2 layout
            stem, ch = q["stem"], q["choices"]
            texts, labels = [c["text"] for c in ch], [c["label"] for c in ch]
        else:
            stem, texts, labels = q, obj["choices"]["text"], obj["choices"]["label"]
        key = obj["answerKey"]
    except (KeyError, TypeError) as exc:
        raise fail(where, line, f"missing field {exc}") from None
    if key not in labels:
        raise fail(where, line, f"gold answer {key!r} is not among the choices {labels}")
    check_record({"question": stem, "choices": texts, "gold": labels.index(key)}, where, line)
    return {"id": str(obj.get("id", "")), "question": stem, "answerKey": key,
            "choices": {"text": list(texts), "label": list(labels)}}


def _arc_easy(split: str) -> tuple[list[Row], Path]:
    path = _shared("arc_easy", f"{split}.json")
    where = str(path)
    try:
        arr = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise fail(where, exc.lineno, f"malformed JSON ({exc.msg})") from None
    if not isinstance(arr, list) or not arr:
        raise fail(where, None, "expected a non-empty JSON array")
    # A JSON array has no record lines: report the record's position (1-based) as the "line".
    return [_arc_row(o, where, i) for i, o in enumerate(arr, 1)], path


def _arc_challenge(split: str) -> tuple[list[Row], Path]:
    fname = {"train": "Train", "validation": "Dev", "test": "Test"}[split]
    path = _shared("arc_challenge", f"ARC-Challenge-{fname}.jsonl")
    where = str(path)
    return [_arc_row(_json_line(where, n, ln), where, n) for n, ln in _read_lines(path)], path


def _boolq(split: str) -> tuple[list[Row], Path]:
    """super_glue/boolq's layout: label 1 = yes (the answer "True")."""
    path = _shared("boolq", "dev.jsonl")
    where = str(path)
    rows: list[Row] = []
    for i, (n, ln) in enumerate(_read_lines(path)):
        o = _json_line(where, n, ln)
        try:
            ans = str(o["answer"]).strip().lower()
            q, passage = o["question"], o["passage"]
        except (KeyError, TypeError) as exc:
            raise fail(where, n, f"missing field {exc}") from None
        if ans not in ("true", "false"):
            raise fail(where, n, f"gold answer {o['answer']!r} is not among the choices")
        if not isinstance(q, str) or not q.strip():
            raise fail(where, n, "'question' must be a non-empty string")
        if not isinstance(passage, str):
            raise fail(where, n, "'passage' must be a string")
        rows.append({"idx": i, "question": q, "passage": passage, "label": int(ans == "true")})
    return rows, path


def _piqa(split: str) -> tuple[list[Row], Path]:
    """piqa's layout (goal, sol1, sol2, label) and the record's id; the labels file holds line
    by line the gold index of the item on the same line of dev.jsonl."""
    path, lab_path = _shared("piqa", "dev.jsonl"), _shared("piqa", "dev-labels.lst")
    where = str(path)
    lines, labels = _read_lines(path), _read_lines(lab_path)
    if len(labels) != len(lines):
        raise fail(str(lab_path), None, f"{len(labels)} labels for {len(lines)} items in {path}")
    rows: list[Row] = []
    for (n, ln), (ln2, lab) in zip(lines, labels):
        o = _json_line(where, n, ln)
        try:
            gold = int(lab.strip())
        except ValueError:
            raise fail(str(lab_path), ln2, f"label {lab.strip()!r} is not 0 or 1") from None
        if not isinstance(o, dict) or not all(k in o for k in ("goal", "sol1", "sol2")):
            raise fail(where, n, "missing field (PIQA needs goal, sol1, sol2)")
        check_record({"question": o["goal"], "choices": [o["sol1"], o["sol2"]], "gold": gold},
                     where, n)
        rows.append({"id": str(o.get("id", "")), "goal": o["goal"], "sol1": o["sol1"],
                     "sol2": o["sol2"], "label": gold})
    return rows, path


def _gsm8k(split: str) -> tuple[list[Row], Path]:
    path = _shared("gsm8k", f"{split}.jsonl")
    where = str(path)
    rows: list[Row] = []
    for n, ln in _read_lines(path):
        o = _json_line(where, n, ln)
        if not isinstance(o, dict) or "question" not in o or "answer" not in o:
            raise fail(where, n, "missing field (GSM8K needs question, answer)")
        rows.append({"question": o["question"], "answer": o["answer"]})
    return rows, path


WIKITEXT2_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}


def _wikitext2(split: str) -> tuple[list[Row], Path]:
    """One row {text} per paragraph of the split's raw file (headings and short lines left out)."""
    folder = data_root() / "wikitext2"
    path = folder / WIKITEXT2_FILES[split]
    if not path.exists():  # the shared folder ships only the test split
        have = [s for s, f in WIKITEXT2_FILES.items() if (folder / f).exists()]
        raise TabpError(f"task 'wikitext2' has no {split!r} split here: {path} not found "
                        f"(present: {', '.join(have) or 'none'})")
    rows: list[Row] = []
    for _, ln in _read_lines(path):
        s = ln.strip()
        if len(s) >= 200 and not s.startswith("="):  # a paragraph, not a heading
            rows.append({"text": s})
    return rows, path


def _demo(split: str) -> tuple[list[Row], Path]:
    """The generated demo set (MCQA schema) shipped with the package."""
    path = PACKAGE_DATA / "demo_mcqa.jsonl"
    return jsonl_rows(path)[1], path


_READERS = {"arc_easy": _arc_easy, "arc_challenge": _arc_challenge, "boolq": _boolq,
            "piqa": _piqa, "gsm8k": _gsm8k, "wikitext2": _wikitext2, "demo": _demo}
ONE_SPLIT = {"boolq", "piqa", "demo"}  # one file: train and validation are its seeded halves
SPLITS: dict[str, tuple[str, ...]] = {
    "arc_easy": ("train", "validation", "test"),
    "arc_challenge": ("train", "validation", "test"),
    "boolq": ("train", "validation", "dev"),
    "piqa": ("train", "validation", "dev"),
    "gsm8k": ("train", "test"),
    "wikitext2": tuple(WIKITEXT2_FILES),
    "demo": ("train", "validation"),
}


def read_rows(name: str, split: str) -> tuple[list[Row], str]:
    """The rows of a local set's split (a name and split of `SPLITS`) and the file they came
    from."""
    rows, path = _READERS[name](split)
    if name in ONE_SPLIT and split != "dev":
        rows = half(rows, split)
    return rows, str(path)


# --------------------------------------------------------------------------- lm-eval's custom_dataset

def _dict(name: str, splits: tuple[str, ...]):
    import datasets

    if name in ONE_SPLIT:  # the file read once for both halves
        rows = read_rows(name, "dev")[0]
        by_split = {s: half(rows, s) for s in splits}
    else:
        by_split = {s: read_rows(name, s)[0] for s in splits}
    return datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in by_split.items()})


def arc_easy(**_: Any):
    return _dict("arc_easy", ("train", "validation", "test"))


def arc_challenge(**_: Any):
    return _dict("arc_challenge", ("train", "validation", "test"))


def boolq(**_: Any):
    return _dict("boolq", ("train", "validation"))


def piqa(**_: Any):
    return _dict("piqa", ("train", "validation"))


def demo(**_: Any):
    return _dict("demo", ("train", "validation"))


def mcqa_jsonl(data_files: str | None = None, **_: Any):
    """A user's MCQA JSONL file as its one split."""
    import datasets

    if not data_files:
        raise TabpError("it needs a file: tabp-vllm eval --data FILE.jsonl")
    kind, rows = jsonl_rows(data_files)
    if kind != "mcqa":
        raise TabpError(f"{data_files}: eval needs MCQA data (question, choices, gold)")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
