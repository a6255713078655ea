"""The offline tasks' data: the shared data sets read from disk, in the layout of lm-eval's own
hub data sets, so the YAML next to this file is lm-eval's YAML with only the data source changed.

Each function is a task's `custom_dataset` (lm-eval calls it with the task's `metadata` and
`dataset_kwargs` as keywords) and returns a `datasets.DatasetDict`. Files come from
`tabp_vllm.data.data_root()` ($TABP_VLLM_DATA, else ../shared/data). BoolQ and PIQA ship only a
dev split here: as everywhere in the project (`data._half`, seed `data.SPLIT_SEED`), a seeded half
of it is `train` and the other half `validation`, so a mask calibrated on `train` is scored on
items it never saw.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tabp_vllm.data import PACKAGE_DATA, _half, data_root
from tabp_vllm.errors import TabpError


def _need(path: Path, task: str) -> Path:
    if not path.exists():
        raise TabpError(f"task {task!r}: {path} not found; set TABP_VLLM_DATA to the folder that "
                        f"holds {path.parent.name}/{path.name} (see docs/eval.md)")
    return path


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def _dict(splits: dict[str, list[dict[str, Any]]]):
    import datasets

    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})


def _arc_hf(o: dict[str, Any]) -> dict[str, Any]:
    """An AI2-layout ARC record in the Hugging Face `ai2_arc` layout (what lm-eval's YAML reads)."""
    q = o["question"]
    if isinstance(q, dict):
        return {"id": o.get("id", ""), "question": q["stem"], "answerKey": o["answerKey"],
                "choices": {"text": [c["text"] for c in q["choices"]],
                            "label": [c["label"] for c in q["choices"]]}}
    return {"id": o.get("id", ""), "question": q, "answerKey": o["answerKey"],
            "choices": {"text": list(o["choices"]["text"]), "label": list(o["choices"]["label"])}}


def arc_easy(**_: Any):
    root = data_root() / "arc_easy"
    return _dict({s: [_arc_hf(o) for o in json.loads(_need(root / f"{s}.json", "tabp_arc_easy").read_text())]
                  for s in ("train", "validation", "test")})


def arc_challenge(**_: Any):
    root = data_root() / "arc_challenge"
    files = {"train": "Train", "validation": "Dev", "test": "Test"}
    return _dict({s: [_arc_hf(o) for o in _jsonl(_need(root / f"ARC-Challenge-{f}.jsonl",
                                                       "tabp_arc_challenge"))]
                  for s, f in files.items()})


def boolq(**_: Any):
    rows = []
    for i, o in enumerate(_jsonl(_need(data_root() / "boolq" / "dev.jsonl", "tabp_boolq"))):
        # super_glue/boolq layout: label 1 = yes (the answer "True")
        rows.append({"idx": i, "question": o["question"], "passage": o["passage"],
                     "label": int(str(o["answer"]).strip().lower() == "true")})
    return _dict({"train": _half(rows, "train"), "validation": _half(rows, "validation")})


def piqa(**_: Any):
    root = data_root() / "piqa"
    docs = _jsonl(_need(root / "dev.jsonl", "tabp_piqa"))
    labels = _need(root / "dev-labels.lst", "tabp_piqa").read_text().split()
    if len(labels) != len(docs):
        raise TabpError(f"task 'tabp_piqa': {len(labels)} labels for {len(docs)} items in {root}")
    rows = [{"goal": o["goal"], "sol1": o["sol1"], "sol2": o["sol2"], "label": int(lab)}
            for o, lab in zip(docs, labels)]
    return _dict({"train": _half(rows, "train"), "validation": _half(rows, "validation")})


def demo(**_: Any):
    """The generated demo set shipped with the package (MCQA schema), halves as for `demo`."""
    rows = _jsonl(PACKAGE_DATA / "demo_mcqa.jsonl")
    return _dict({"train": _half(rows, "train"), "validation": _half(rows, "validation")})


def mcqa_jsonl(data_files: str | None = None, **_: Any):
    """A user's MCQA JSONL file (tabp_vllm.data's schema, validated there) as its one split."""
    from dataclasses import asdict

    from tabp_vllm.data import load_jsonl

    if not data_files:
        raise TabpError("task 'tabp_jsonl' needs a file: tabp-vllm eval --data FILE.jsonl")
    return _dict({"test": [asdict(i) for i in load_jsonl(data_files).items]})
