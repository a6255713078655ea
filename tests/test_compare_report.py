"""bench/compare_methods.py --merge: runs made apart combine into one report, merges nest."""

import importlib.util
import json
import shutil
from pathlib import Path

RESULTS = Path(__file__).parents[1] / "bench" / "results"


def _compare_methods():
    spec = importlib.util.spec_from_file_location("compare_methods",
                                                  RESULTS.parent / "compare_methods.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_merge_flattens_runs_and_later_runs_win(tmp_path):
    cm = _compare_methods()
    boolq, piqa = RESULTS / "compare_boolq", RESULTS / "compare_piqa"
    first = tmp_path / "first"
    cm.merge([boolq, piqa], first, note="two runs")
    rep = json.loads((first / "report.json").read_text())
    assert [r["tasks"] for r in rep["runs"]] == [["boolq"], ["piqa"]]
    assert {r["task"] for r in rep["accuracy"]} == {"boolq", "piqa"}
    assert rep["note"] == "two runs" and "two runs" in (first / "report.md").read_text()
    assert (first / "accuracy_vs_k.png").stat().st_size > 10_000

    # a changed re-run of one task replaces that task's rows, and a merge of a merge keeps the
    # runs it was made of rather than nesting them
    rerun = tmp_path / "piqa-rerun"
    shutil.copytree(piqa, rerun)
    doc = json.loads((rerun / "report.json").read_text())
    for row in doc["accuracy"]:
        if row["method"] == "tabp" and row["k"] == 8:
            row["acc"] = 0.999
    (rerun / "report.json").write_text(json.dumps(doc))
    second = tmp_path / "second"
    cm.merge([first, rerun], second)
    rep2 = json.loads((second / "report.json").read_text())
    assert [r["dir"] for r in rep2["runs"]] == [str(boolq), str(piqa), str(rerun)]
    rows = [r for r in rep2["accuracy"] if (r["task"], r["method"], r["k"]) == ("piqa", "tabp", 8)]
    assert [r["acc"] for r in rows] == [0.999]
    assert len(rep2["accuracy"]) == len(rep["accuracy"])
