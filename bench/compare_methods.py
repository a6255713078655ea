"""Compare TaBP with the baselines on the demo model (issue 3, part 5).

For each MCQA task in ../shared/data: calibrate every method on the task's train split (BoolQ and
PIQA have only dev: a fixed seeded half is train, the other half validation), then measure zero-shot
accuracy of dense and of every mask on the validation split with the served engine
(`tabp_vllm.evaluate`: vLLM + the project's loader). Writes report.json, report.md and
accuracy_vs_k.png to --out.

    . .venv/bin/activate
    python bench/compare_methods.py --out bench/results/compare
    # quick smoke run:
    python bench/compare_methods.py --tasks arc_easy --k 2 --methods tabp last_k --samples 16 \
        --eval-limit 20 --out /tmp/cmp

Cost control, all recorded in the report:
- each method is scored once per task at the largest k when its scoring ranks the blocks for every
  k (`ScoringMethod.ranks_all_k`: a ranking of block scores, or SLEB's greedy removal order, whose
  first k rounds are exactly SLEB run at k); the masks for smaller k follow from that run. Angular
  distance depends on k and is rerun per k.
- methods that pass the calibration set more than once (SLEB and PPL: once per candidate block, per
  round for SLEB; `ScoringMethod.forward_passes`) get the smaller --sleb-samples calibration set.
- within a task every distinct set of removed blocks is evaluated once (one engine); dense and the
  task-independent masks (the floors, random and last-k, which read no data) are evaluated on all
  tasks in that same engine. Results
  are cached in eval_cache.json, and report.json/.md/.png are rewritten after every task, so an
  interrupted run keeps its finished tasks and a rerun skips the cached evaluations.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from tabp_vllm.scoring.registry import METHOD_NAMES, get_method

TASKS = ["arc_easy", "arc_challenge", "boolq", "piqa"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--methods", nargs="+", default=list(METHOD_NAMES), choices=METHOD_NAMES)
    ap.add_argument("--k", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--samples", type=int, default=256, help="calibration samples (TaBP, BI, angular)")
    ap.add_argument("--sleb-samples", type=int, default=32, help="calibration samples for the methods that pass it more than once (SLEB, PPL)")
    ap.add_argument("--eval-limit", type=int, default=200, help="validation items per task")
    ap.add_argument("--range", dest="block_range", default=None)
    ap.add_argument("--statistic", default="entropy")
    ap.add_argument("--aggregate", default="ssn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timing-samples", type=int, default=1024,
                    help="TaBP timing run on this many ARC-Easy train samples (0 = skip)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/compare"))
    ap.add_argument("--merge", nargs="+", type=Path, default=None, metavar="DIR",
                    help="only combine the report.json of earlier runs (e.g. one task run apart) into --out")
    ap.add_argument("--note", default=None, help="with --merge: a paragraph added to report.md")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.out, args.note)

    from tabp_vllm.models import resolve_model
    from tabp_vllm.scoring.probe import load_model

    model = resolve_model("llama")
    (args.out / "masks").mkdir(parents=True, exist_ok=True)
    report = {"model": "llama (SmolLM2-135M-Instruct, 30 blocks)",
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "scoring": [], "accuracy": []}
    mt = load_model(model, "cpu")
    if args.timing_samples and "tabp" in args.methods:
        time_tabp(model, mt, args, report)
    # Task by task, so that an interrupted run leaves complete results for the finished tasks.
    for task in args.tasks:
        masks = score_task(model, mt, args, task, report)
        save(report, args.out)
        evaluate_task(model, args, task, masks, report)
        save(report, args.out)
        write_markdown(report, args.out / "report.md")
        plot(report, args.out / "accuracy_vs_k.png")
        print(f"{task} done: {args.out}/report.json, report.md, accuracy_vs_k.png", flush=True)


def common_args(args, mt) -> dict:
    return dict(block_range=args.block_range, statistic=args.statistic, aggregate=args.aggregate,
                seed=args.seed, model_and_tokenizer=mt)


def time_tabp(model: str, mt, args, report: dict) -> None:
    """Issue 3: TaBP over 1,024 calibration samples within a few minutes on 2 CPU cores."""
    from tabp_vllm.data import load_task
    from tabp_vllm.scoring import run_scoring

    big = load_task("arc_easy", "train").subset(args.timing_samples, args.seed)
    res = run_scoring(model, big, "tabp", k=max(args.k), **common_args(args, mt))
    report["tabp_timing"] = {"samples": len(big), "wall_s": round(res.wall_s, 1),
                             "forward_passes": res.forward_passes, "k": max(args.k),
                             "removed": res.removed}
    print(f"TaBP on {len(big)} ARC-Easy train samples: {res.wall_s:.1f} s", flush=True)


def score_task(model: str, mt, args, task: str, report: dict) -> dict[tuple[str, int], tuple[list[int], Path]]:
    """Score every method on the task's train split; returns (method, k) -> (removed, mask path)."""
    from tabp_vllm.data import load_task
    from tabp_vllm.scoring import result_for_k, run_scoring, score_to_mask

    kmax = max(args.k)
    masks = {}
    train = load_task(task, "train")
    for method in args.methods:
        scorer = get_method(method)
        n = args.sleb_samples if repeats_calibration(method, kmax) else args.samples
        cal = train.subset(n, args.seed)
        ks = [kmax] if scorer.ranks_all_k else sorted(args.k)
        runs = {k: run_scoring(model, cal, method, k=k, **common_args(args, mt)) for k in ks}
        for k in sorted(args.k):
            run = runs.get(k) or runs[kmax]
            res = run if k in runs else result_for_k(run, k)
            path = score_to_mask(model, res, task=task, model_id="llama").save(
                args.out / "masks" / f"{task}-{method}-k{k}.json")
            masks[(method, k)] = (res.removed, path)
            report["scoring"].append({
                "task": task, "method": method, "k": k, "samples": len(cal),
                "scored_at_k": run.params["k"], "wall_s": round(run.wall_s, 2),
                "forward_passes": run.forward_passes, "removed": res.removed})
            print(f"{task} {method} k={k}: removed {res.removed} "
                  f"(scored at k={run.params['k']}: {run.wall_s:.1f} s, {run.forward_passes} passes)",
                  flush=True)
    return masks


def repeats_calibration(method: str, k: int) -> bool:
    """Whether the method passes each calibration sample through the model more than once."""
    return get_method(method).forward_passes(1, k + 1, k) > 1  # one sample, k + 1 candidates


def task_independent(method: str) -> bool:
    """No forward pass, so no data: the same mask for every task (evaluate it on all at once)."""
    return get_method(method).forward_passes(1, 1, 1) == 0


def evaluate_task(model: str, args, task: str, masks: dict, report: dict) -> None:
    """One engine per distinct removed-block set; results cached in eval_cache.json."""
    from tabp_vllm.evaluate import evaluate_variant

    # lm-eval on the offline tasks (tabp_<task>, lm-eval's YAML on the local files): its split
    # (test where the task has one, else validation), its prompts, its acc / acc_norm
    lm_task = {t: f"tabp_{t}" for t in args.tasks}
    cache_path = args.out / "eval_cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    # "lmeval|": results of the hand-written scorer (validation split, its own prompt) in an
    # older cache are not reused
    key = lambda t, removed: f"lmeval|{t}|{','.join(map(str, removed))}"  # noqa: E731

    variants: dict[tuple[int, ...], tuple[set[str], Path | None]] = {(): (set(args.tasks), None)}
    for (method, _k), (removed, path) in masks.items():
        tasks, _ = variants.setdefault(tuple(removed), (set(), path))
        tasks.update(args.tasks if task_independent(method) else [task])
    todo = [(r, sorted(t for t in ts if key(t, r) not in cache), p) for r, (ts, p) in variants.items()]
    todo = [x for x in todo if x[1]]
    print(f"{task}: {len(variants)} distinct variants, {len(todo)} to evaluate", flush=True)
    for i, (removed, tasks, path) in enumerate(todo, 1):
        t0 = time.perf_counter()
        res = evaluate_variant(model, [lm_task[t] for t in tasks], str(path) if path else None,
                               limit=args.eval_limit)
        for t in tasks:
            m = res["results"][lm_task[t]]
            # BoolQ: lm-eval's task reports acc only (acc_norm None, shown as "-")
            cache[key(t, removed)] = {"acc": m["acc,none"], "acc_norm": m.get("acc_norm,none"),
                                      "n": res["n-samples"][lm_task[t]]["effective"]}
        cache_path.write_text(json.dumps(cache, indent=1) + "\n")
        print(f"[{i}/{len(todo)}] removed {list(removed) or 'none'} on {', '.join(tasks)}: "
              f"{time.perf_counter() - t0:.0f} s", flush=True)

    report["accuracy"].append({"task": task, "method": "dense", "k": 0, "removed": [],
                               **cache[key(task, ())]})
    for (method, k), (removed, _) in masks.items():
        report["accuracy"].append({"task": task, "method": method, "k": k, "removed": removed,
                                   **cache[key(task, tuple(removed))]})


def merge(dirs: list[Path], out: Path, note: str | None = None) -> None:
    """One report from several runs' report.json (later runs win for a repeated task/method/k)."""
    merged = {"model": None, "runs": [], "scoring": [], "accuracy": []}
    for d in dirs:
        rep = json.loads((d / "report.json").read_text())
        merged["model"] = rep["model"]
        if "runs" in rep:  # an earlier merge: keep the runs it was made of
            merged["runs"] += rep["runs"]
        else:
            merged["runs"].append({"dir": str(d), "args": rep["args"],
                                   "tasks": sorted({r["task"] for r in rep["accuracy"]})})
        merged.setdefault("args", rep["args"])
        if note:
            merged["note"] = note
        if "tabp_timing" in rep:
            merged["tabp_timing"] = rep["tabp_timing"]
        for part in ("scoring", "accuracy"):
            new = {(r["task"], r["method"], r["k"]) for r in rep[part]}
            merged[part] = [r for r in merged[part] if (r["task"], r["method"], r["k"]) not in new]
            merged[part] += rep[part]
    out.mkdir(parents=True, exist_ok=True)
    save(merged, out)
    write_markdown(merged, out / "report.md")
    plot(merged, out / "accuracy_vs_k.png")
    print(f"merged {len(dirs)} runs into {out}/report.json, report.md, accuracy_vs_k.png")


def save(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def _se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else 0.0


def write_markdown(report: dict, path: Path) -> None:
    acc = report["accuracy"]
    tasks = list(dict.fromkeys(r["task"] for r in acc))
    ks = sorted({r["k"] for r in acc if r["k"]})
    methods = list(dict.fromkeys(r["method"] for r in acc if r["method"] != "dense"))
    a = report["args"]
    lines = ["# Method comparison on the demo model", "",
             f"Model: {report['model']}. Calibration: {a['samples']} train samples per task "
             f"({a['sleb_samples']} for SLEB and PPL), seed {a['seed']}, candidate blocks "
             f"{a['block_range'] or 'latter half (15-29)'}, TaBP {a['statistic']}/{a['aggregate']}. "
             f"Evaluation: lm-eval 0.4.13 (offline tabp_* tasks, its prompts and metrics), first "
             f"{a['eval_limit']} documents of its evaluation split (test where the task has one, "
             "else validation) per task, zero-shot, vLLM engine (`tabp_vllm.evaluate`). BoolQ and PIQA have no train split here: a fixed seeded half of "
             "dev calibrates, the other half is evaluated.", ""]
    if report.get("note"):
        lines += [report["note"], ""]
    for run in report.get("runs", [])[1:]:
        diff = {k: v for k, v in run["args"].items()
                if k not in ("tasks", "out", "merge") and report["args"].get(k) != v}
        if diff:
            lines += [f"Tasks {', '.join(run['tasks'])} ran apart with: "
                      + ", ".join(f"{k} = {v}" for k, v in diff.items()) + ".", ""]
    for metric in ("acc_norm", "acc"):
        lines += [f"## {metric} (± one binomial standard error of dense)", ""]
        head = "| method | " + " | ".join(f"{t} k={k}" for t in tasks for k in ks) + " |"
        lines += [head, "|---" * (1 + len(tasks) * len(ks)) + "|"]
        dense = {r["task"]: r for r in acc if r["method"] == "dense"}
        lines.append("| dense | " + " | ".join(
            f"{dense[t][metric]:.3f} ± {_se(dense[t][metric], dense[t]['n']):.3f}"
            if dense[t][metric] is not None else "-" for t in tasks for _ in ks) + " |")
        for m in methods:
            cells = []
            for t in tasks:
                for k in ks:
                    r = next((r for r in acc if (r["task"], r["method"], r["k"]) == (t, m, k)), None)
                    cells.append(f"{r[metric]:.3f}" if r and r[metric] is not None else "-")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Scoring cost (2 CPU cores)", "",
              "Each method is scored once per task at the largest k (angular: once per k); "
              "smaller-k masks follow from that run.", "",
              "| task | method | scored at k | samples | wall s | forward passes | removed at largest k |",
              "|---|---|---|---|---|---|---|"]
    kmax = max(ks)
    for r in report["scoring"]:
        if r["k"] == kmax:
            lines.append(f"| {r['task']} | {r['method']} | {r['scored_at_k']} | {r['samples']} | "
                         f"{r['wall_s']} | {r['forward_passes']} | {r['removed']} |")
    if "tabp_timing" in report:
        t = report["tabp_timing"]
        lines += ["", f"TaBP over {t['samples']} ARC-Easy train samples: {t['wall_s']} s, "
                      f"{t['forward_passes']} forward passes (k = {t['k']})."]
    path.write_text("\n".join(lines) + "\n")


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = report["accuracy"]
    tasks = list(dict.fromkeys(r["task"] for r in acc))
    metrics = ("acc_norm", "acc")
    fig, axes = plt.subplots(len(metrics), len(tasks), figsize=(4.2 * len(tasks), 3.6 * len(metrics)),
                             squeeze=False)
    for row, metric in enumerate(metrics):
        for ax, task in zip(axes[row], tasks):
            rows = [r for r in acc if r["task"] == task]
            dense = next(r for r in rows if r["method"] == "dense")
            if dense[metric] is None:  # BoolQ has no acc_norm in lm-eval
                ax.set_visible(False)
                continue
            for m in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
                pts = sorted((r["k"], r[metric]) for r in rows if r["method"] == m)
                ax.plot([0] + [p[0] for p in pts], [dense[metric]] + [p[1] for p in pts], marker="o",
                        lw=2.2 if m == "tabp" else 1.2, label=m)
            se = _se(dense[metric], dense["n"])
            ax.axhspan(dense[metric] - se, dense[metric] + se, color="k", alpha=0.08)
            ax.axhline(dense[metric], color="k", ls="--", lw=0.8, label="dense ± 1 SE")
            ax.set_title(f"{task} (n = {dense['n']})")
            ax.set_xlabel("k (blocks removed of 30)")
            ax.set_ylabel(metric)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
