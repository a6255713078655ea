"""Accuracy of a variant through lm-evaluation-harness, one engine per child process.

lm-eval is the evaluator: its tasks (the offline `tabp_*` tasks of `lmeval.TASKS_DIR`, lm-eval's
own when its data can be had), its prompts, its metrics and its results document. The model is
`lmeval.TabpVLLM`, lm-eval's vLLM backend on the engine `engine_args_for(model, mask)` builds.
What this module adds is robustness: each variant (dense, one per mask) runs in a fresh Python
process, which writes its result file only once lm-eval is done, shuts the engine down and skips
interpreter teardown (where vLLM's engine stack now and then aborts); a child killed by a signal
before it finished runs once more; every failure is one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tabp_vllm.errors import TabpError
from tabp_vllm.lmeval_tasks import JSONL_TASK, TASKS_DIR, load_task_object, task_manager
from tabp_vllm.process import ManagedProcess

# A custom MCQA JSONL file (`--data`, the schema of tabp_vllm.data) becomes a task including
# lmeval_tasks/tabp_jsonl.yaml with its file as data_files, in a temporary task folder.


def jsonl_task_folder(name: str, data: str | Path, folder: str | Path) -> str:
    """A task folder holding one task `name` over a user's MCQA JSONL file (our schema)."""
    import yaml

    from tabp_vllm.data import load_jsonl

    ds = load_jsonl(data, name=name)  # every fault in the file: one line, before any engine
    if ds.kind != "mcqa":
        raise TabpError(f"{data}: eval needs MCQA data (question, choices, gold)")
    Path(folder).mkdir(parents=True, exist_ok=True)
    doc = {"include": str(TASKS_DIR / f"{JSONL_TASK}.yaml"), "task": name,
           "dataset_kwargs": {"data_files": str(Path(data).resolve())}}
    (Path(folder) / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    return str(folder)


def check_tasks(tasks: list[str], include: list[str] | None = None) -> dict[str, int]:
    """Every task known and its data at hand (number of evaluation documents per task), checked
    before any engine starts; a task that cannot be had is one line saying how to fix it."""
    return {t: len(load_task_object(t, include).eval_docs) for t in tasks}


def compact_samples(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per document: its id, gold index, each choice's (context, continuation), log-likelihood
    and the document's metric values (acc, acc_norm, ...: what `eval --router` pools)."""
    rows = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        rows.append({"doc_id": s["doc_id"], "target": s["target"],
                     "arguments": [list(a[:2]) for a in s["arguments"]],
                     "loglik": [float(r[0]) for r in s["filtered_resps"]],
                     "metrics": {m: float(s[m]) for m in s.get("metrics", []) if m in s}})
    return rows


def evaluate_in_process(model: str, tasks: list[str], mask_path: str | None,
                        limit: int | None = None, kv_cache_gib: float | None = None,
                        include: list[str] | None = None,
                        samples: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` on the engine of (model, mask); needs the __main__ guard.
    `samples`: only these document ids per task (instead of `limit`)."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    from tabp_vllm.lmeval import TabpVLLM

    lm = TabpVLLM(pretrained=model, task_mask=mask_path, kv_cache_gib=kv_cache_gib)
    try:
        out = simple_evaluate(model=lm, tasks=list(tasks), limit=None if samples else limit,
                              samples=samples or None, log_samples=True,
                              task_manager=task_manager(include, list(tasks)))
    finally:  # stop the engine core now rather than in interpreter teardown
        lm.shutdown()
    mask = lm.task_mask
    res = {key: out[key] for key in ("results", "configs", "versions", "n-shot", "higher_is_better",
                                     "n-samples") if key in out}
    res = json.loads(json.dumps(res, default=handle_non_serializable))
    res["samples"] = {t: compact_samples(s) for t, s in out["samples"].items()}
    res["blocks_kept"] = mask.num_kept if mask else None
    res["removed_layers"] = mask.removed_layers if mask else []
    res["requests"] = sum(len(r["loglik"]) for s in res["samples"].values() for r in s)
    return res


def _last_line(text: str) -> str:
    return next((ln for ln in reversed(text.strip().splitlines()) if ln.strip()), "")


def _run_once(spec: str, out: str, err: str, log_path: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tabp_vllm.evaluation.evaluate", spec, out, err]
    # Leaving the block stops what is left of the child's family: its engine core, when the
    # child was killed; the child too, when we are interrupted (it has its own session).
    with ManagedProcess(cmd, log_path, name="evaluation process") as proc:
        return subprocess.CompletedProcess(cmd, proc.wait())


def evaluate_variant(model: str, tasks: list[str], mask_path: str | None, *,
                     limit: int | None = None, kv_cache_gib: float | None = None,
                     include: list[str] | None = None,
                     samples: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Run `evaluate_in_process` in a fresh Python process (one engine per process).

    The child writes its result file only once every task is scored; a result that exists is
    complete and kept even if the child dies after writing it. A child killed by a signal before
    it finished is run once more; its output is kept under the cache directory and named in the
    error.
    """
    from tabp_vllm.models import cache_dir

    logs = cache_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    label = mask_path or "dense"
    with tempfile.TemporaryDirectory(prefix="tabp-eval-") as tmp:
        spec, out, err = (os.path.join(tmp, n) for n in ("spec.json", "out.json", "error.txt"))
        with open(spec, "w") as f:
            json.dump({"model": model, "tasks": list(tasks), "mask": mask_path, "limit": limit,
                       "kv_cache_gib": kv_cache_gib, "include": include, "samples": samples}, f)
        for attempt in (1, 2):
            log_path = str(logs / f"eval-{os.getpid()}-{Path(label).stem}-{attempt}.log")
            proc = _run_once(spec, out, err, log_path)
            if os.path.exists(out):
                if proc.returncode == 0:
                    os.remove(log_path)
                else:
                    print(f"note: the evaluation process of {label} exited with code "
                          f"{proc.returncode} after writing its results (log: {log_path})",
                          file=sys.stderr)
                with open(out) as f:
                    return json.load(f)
            if os.path.exists(err):  # the child caught the error and said what it was
                with open(err) as f:
                    raise TabpError(f"evaluation of {label} failed: {f.read().strip()}")
            if proc.returncode >= 0 or attempt == 2:
                with open(log_path) as f:
                    msg = _last_line(f.read()) or f"exit code {proc.returncode}"
                raise TabpError(f"evaluation of {label} failed (exit code {proc.returncode}): "
                                f"{msg} (log: {log_path})")
            print(f"note: the evaluation process of {label} was killed by signal "
                  f"{-proc.returncode} (log: {log_path}); running it once more", file=sys.stderr)
    raise AssertionError("unreachable")


def _main(argv: list[str]) -> int:
    spec_path, out_path, err_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    try:
        res = evaluate_in_process(spec["model"], spec["tasks"], spec["mask"], spec["limit"],
                                  spec["kv_cache_gib"], spec["include"], spec.get("samples"))
    except TabpError as exc:
        with open(err_path, "w") as f:
            f.write(str(exc))
        return 2
    except Exception as exc:  # the parent shows one line; the traceback goes to the log
        import traceback

        traceback.print_exc()
        with open(err_path, "w") as f:
            f.write(" ".join(f"{type(exc).__name__}: {exc}".split()))
        return 1
    # write then rename: the parent treats an existing result file as complete
    with open(out_path + ".tmp", "w") as f:
        json.dump(res, f)
    os.replace(out_path + ".tmp", out_path)
    return 0


if __name__ == "__main__":
    code = _main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # The engine core is already shut down; skip interpreter teardown, where a C++ thread of the
    # engine stack now and then aborts the process ("terminate called without an active exception").
    os._exit(code)
