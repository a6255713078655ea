"""Compare TaBP with the baselines on the demo model (issue 3, part 5).

For each MCQA task in ../shared/data, calibrate on its train split (BoolQ/PIQA: a seeded half of
dev), score every method for each k, then evaluate dense and every mask on the validation split
with the vLLM engine (`tabp_vllm.evaluate`, one engine per subprocess). Writes JSON, a Markdown
table and a PNG (accuracy vs k per method, one panel per task) to --out.

    . .venv/bin/activate
    python bench/compare_methods.py --samples 256 --eval-limit 200 --out bench/results/compare
    # quick smoke run:
    python bench/compare_methods.py --tasks arc_easy --k 2 --methods tabp last_k --samples 16 \
        --eval-limit 20 --out /tmp/cmp

SLEB and PPL cost (k x candidates) and candidates full calibration passes: --sleb-samples caps
their calibration set (recorded in the report).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TASKS = ["arc_easy", "arc_challenge", "boolq", "piqa"]
METHODS = ["tabp", "block_influence", "angular", "sleb", "ppl", "random", "last_k"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--k", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--sleb-samples", type=int, default=64)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--range", dest="block_range", default=None)
    ap.add_argument("--statistic", default="entropy")
    ap.add_argument("--aggregate", default="ssn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/compare"))
    args = ap.parse_args()

    from tabp_vllm.data import load_task
    from tabp_vllm.evaluate import evaluate_variant
    from tabp_vllm.models import resolve_model
    from tabp_vllm.scoring import run_scoring, score_to_mask
    from tabp_vllm.scoring.probe import load_model

    model = resolve_model("llama")
    mt = load_model(model, "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "masks").mkdir(exist_ok=True)
    report = {"model": "llama (SmolLM2-135M-Instruct)", "args": {k: str(v) for k, v in vars(args).items()},
              "scoring": [], "accuracy": []}
    for task in args.tasks:
        train = load_task(task, "train")
        val = load_task(task, "validation").first(args.eval_limit)
        dense = evaluate_variant(model, val.items, None)
        report["accuracy"].append({"task": task, "method": "dense", "k": 0, **_strip(dense)})
        print(f"{task}: dense acc {dense['acc']:.3f} acc_norm {dense['acc_norm']:.3f}", flush=True)
        for method in args.methods:
            n = args.sleb_samples if method in ("sleb", "ppl") else args.samples
            cal = train.subset(n, args.seed)
            for k in args.k:
                res = run_scoring(model, cal, method, k=k, block_range=args.block_range,
                                  statistic=args.statistic, aggregate=args.aggregate,
                                  seed=args.seed, model_and_tokenizer=mt)
                mask = score_to_mask(model, res, task=task, model_id="llama")
                path = mask.save(args.out / "masks" / f"{task}-{method}-k{k}.json")
                report["scoring"].append({"task": task, "method": method, "k": k, "samples": len(cal),
                                          "wall_s": round(res.wall_s, 2),
                                          "forward_passes": res.forward_passes,
                                          "removed": res.removed})
                acc = evaluate_variant(model, val.items, str(path))
                report["accuracy"].append({"task": task, "method": method, "k": k, **_strip(acc)})
                print(f"{task} {method} k={k}: removed {res.removed} acc {acc['acc']:.3f} "
                      f"acc_norm {acc['acc_norm']:.3f} ({res.wall_s:.1f} s, {res.forward_passes} passes)",
                      flush=True)
                (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    # TaBP cost over 1,024 calibration samples (issue: within a few minutes on 2 CPU cores)
    if "tabp" in args.methods:
        big = load_task("arc_easy", "train").subset(1024, args.seed)
        t0 = time.perf_counter()
        res = run_scoring(model, big, "tabp", k=8, model_and_tokenizer=mt)
        report["tabp_1024"] = {"wall_s": round(time.perf_counter() - t0, 1),
                               "forward_passes": res.forward_passes}
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out / "report.md")
    plot(report, args.out / "accuracy_vs_k.png")


def _strip(r: dict) -> dict:
    return {k: r[k] for k in ("acc", "acc_norm", "n", "removed_layers")}


def write_markdown(report: dict, path: Path) -> None:
    lines = ["# Method comparison (demo model)", "", "| task | method | k | acc | acc_norm | n |",
             "|---|---|---|---|---|---|"]
    for r in report["accuracy"]:
        lines.append(f"| {r['task']} | {r['method']} | {r['k']} | {r['acc']:.3f} | {r['acc_norm']:.3f} | {r['n']} |")
    lines += ["", "| task | method | k | samples | scoring wall s | forward passes |", "|---|---|---|---|---|---|"]
    for r in report["scoring"]:
        lines.append(f"| {r['task']} | {r['method']} | {r['k']} | {r['samples']} | {r['wall_s']} | {r['forward_passes']} |")
    if "tabp_1024" in report:
        t = report["tabp_1024"]
        lines += ["", f"TaBP over 1,024 ARC-Easy train samples: {t['wall_s']} s, {t['forward_passes']} forward passes."]
    path.write_text("\n".join(lines) + "\n")


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in report["accuracy"]})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in report["accuracy"] if r["task"] == task]
        dense = next((r["acc_norm"] for r in rows if r["method"] == "dense"), None)
        for m in sorted({r["method"] for r in rows} - {"dense"}):
            pts = sorted((r["k"], r["acc_norm"]) for r in rows if r["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        if dense is not None:
            ax.axhline(dense, color="k", ls="--", label="dense")
        ax.set_title(task)
        ax.set_xlabel("k (blocks removed)")
        ax.set_ylabel("acc_norm")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
