"""Input-guided routing vs static masks on the demo model: accuracy per task against the number
of clusters N, for each k.

Every configuration is made and measured with the product's own commands:
- `route fit` on one mixed calibration set (train splits of the `--calib` tasks), for N in
  `--clusters`, with `--mask-method l0` (IG-Pruning) and `--mask-method tabp` (per-cluster TaBP);
- a *static* mask of each existing method = the same fit with N = 1 (one mask from the whole mixed
  set), so static and routed masks see the same data;
- the *oracle*: per task, a static TaBP mask scored on that task's own calibration data (it knows
  the task of every request; `score --task T --method tabp`);
- dense.
Each is evaluated with `eval --router` (one lm-eval run per distinct mask on the documents routed
to it; the oracle and dense with `eval --task-mask` / `eval`) on the first `--limit` documents
of each `--eval` task's evaluation split as lm-eval picks it (ARC-Easy: test, as lm-eval's
arc_easy; PIQA and BoolQ: the held-out half of dev, never used for calibration). Results: `OUT/routing.json`, `OUT/routing.md`, `OUT/accuracy_vs_clusters.png`.

    python bench/routing_report.py --clusters 1,2,4 --ks 4 --limit 100
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tabp_vllm.hardware import cpu_info  # noqa: E402

CLI = [sys.executable, "-m", "tabp_vllm"]
EVAL_OF = {"arc_easy": "tabp_arc_easy", "piqa": "tabp_piqa", "boolq": "tabp_boolq"}


def run(cmd: list[str], log: Path) -> float:
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", default="arc_easy,piqa,boolq,gsm8k")
    ap.add_argument("--eval", default="arc_easy,piqa,boolq")
    ap.add_argument("--clusters", default="1,2,4,8")
    ap.add_argument("--ks", default="4,8")
    ap.add_argument("--static-methods", default="block_influence,angular,sleb,ppl,random")
    ap.add_argument("--samples", type=int, default=32, help="calibration inputs per task")
    ap.add_argument("--steps", type=int, default=24, help="L0 steps per cluster")
    ap.add_argument("--limit", type=int, default=100, help="evaluation documents per task")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "routing")
    a = ap.parse_args()
    out, log = a.out, a.out / "run.log"
    out.mkdir(parents=True, exist_ok=True)
    (out / "routers").mkdir(exist_ok=True)
    calib = [t for t in a.calib.split(",") if t]
    evals = [t for t in a.eval.split(",") if t]
    lm_tasks = ",".join(EVAL_OF[t] for t in evals)
    doc_path = out / "routing.json"
    doc = json.loads(doc_path.read_text()) if doc_path.exists() else {"rows": []}
    done = {(r["config"], r["k"], r["n"]) for r in doc["rows"]}
    doc.update(calib=calib, eval=evals, samples=a.samples, steps=a.steps, limit=a.limit,
               host=cpu_info(), command=sys.argv)

    def save() -> None:
        doc_path.write_text(json.dumps(doc, indent=2) + "\n")

    def evaluate(config: str, k: int, n: int | None, args: list[str], fit_s: float | None,
                 extra: dict | None = None) -> None:
        res_path = out / f"eval-{config}-k{k}-n{n}.json"
        wall = None  # an earlier run's result is kept (the run was interrupted after it)
        if not res_path.exists():
            wall = run(CLI + ["eval", "--task", lm_tasks, "--limit", str(a.limit), "-o", str(res_path)]
                       + args, log)
        res = json.loads(res_path.read_text())
        acc = {}
        if res.get("routed"):
            for t in evals:
                m = res["routed"]["results"][EVAL_OF[t]]
                acc[t] = {"acc": m["acc"]["value"], "acc_norm": m.get("acc_norm", m["acc"])["value"],
                          "n": m["acc"]["n"]}
            mix = res["routed"]["cluster_mix"]
        else:
            r = res["results"][0]
            for t in evals:
                m = r["results"][EVAL_OF[t]]
                acc[t] = {"acc": m["acc,none"], "acc_norm": m.get("acc_norm,none", m["acc,none"]),
                          "n": r["n-samples"][EVAL_OF[t]]["effective"]}
            mix = None
        doc["rows"].append({"config": config, "k": k, "n": n, "accuracy": acc, "fit_s": fit_s,
                            "eval_s": wall, "cluster_mix": mix, **(extra or {})})
        save()

    if ("dense", 0, None) not in done:
        evaluate("dense", 0, None, [], None)
    def config_of(method: str) -> str:
        return method if method in ("l0", "tabp") else f"static-{method}"

    def routed_or_static(method: str, k: int, n: int) -> None:
        config = config_of(method)
        router = out / "routers" / f"{method}-k{k}-n{n}.json"
        if not router.exists():  # else an interrupted run's fit is kept
            run(CLI + ["route", "fit", "--model", "llama", *sum((["--task", t] for t in calib), []),
                       "--samples", str(a.samples), "--k", str(k), "--steps", str(a.steps),
                       "--clusters", str(n), "--mask-method", method, "-o", str(router)], log)
        r = json.loads(router.read_text())
        fit_s = r["provenance"]["wall_s"]  # the fit as the router records it (model load excluded)
        evaluate(config, k, n, ["--no-dense", "--router", str(router)], fit_s,
                 {"distinct_masks": len({json.dumps(c["mask"]["removed_layers"]) for c in r["clusters"]}),
                  "passes": {key: r["provenance"].get(key) for key in
                             ("forward_passes", "backward_passes")}})

    def oracle(t: str, k: int) -> None:
        """Each task's own TaBP mask, evaluated on that task only."""
        mask = out / "routers" / f"oracle-{t}-k{k}.json"
        if not mask.exists():
            run(CLI + ["score", "--model", "llama", "--task", t, "--method", "tabp",
                       "--k", str(k), "--samples", str(a.samples * len(calib)),
                       "-o", str(mask)], log)
        fit_s = json.loads(mask.read_text())["calibration"]["wall_s"]
        res_path = out / f"eval-oracle-{t}-k{k}.json"
        wall = run(CLI + ["eval", "--task", EVAL_OF[t], "--limit", str(a.limit), "--no-dense",
                          "--task-mask", str(mask), "-o", str(res_path)], log)
        r = json.loads(res_path.read_text())["results"][0]
        m = r["results"][EVAL_OF[t]]
        doc["rows"].append({"config": f"oracle-{t}", "k": k, "n": None, "fit_s": fit_s, "eval_s": wall,
                            "accuracy": {t: {"acc": m["acc,none"],
                                             "acc_norm": m.get("acc_norm,none", m["acc,none"]),
                                             "n": r["n-samples"][EVAL_OF[t]]["effective"]}}})
        save()

    # Breadth first: per k the cheap fits, the static masks and the oracle, then the learned
    # gates; the largest N (most engines to evaluate) of every k last.
    ks, ns = [int(x) for x in a.ks.split(",")], sorted(int(x) for x in a.clusters.split(","))
    jobs = []
    for k in ks:
        jobs += [("tabp", k, n) for n in ns[:-1]]
        jobs += [(m, k, 1) for m in a.static_methods.split(",") if m]
        jobs += [("oracle", k, t) for t in evals]
        jobs += [("l0", k, n) for n in ns[:-1]]
    jobs += [(method, k, ns[-1]) for k in ks for method in ("tabp", "l0")]
    for method, k, n in jobs:
        if method == "oracle":
            if (f"oracle-{n}", k, None) not in done:
                oracle(n, k)
        elif (config_of(method), k, n) not in done:
            routed_or_static(method, k, n)
    write_report(doc, out)


def write_report(doc: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals, rows = doc["eval"], doc["rows"]
    ks = sorted({r["k"] for r in rows if r["k"]})
    dense = next(r for r in rows if r["config"] == "dense")
    lines = ["# Input-guided routing vs static masks (demo model)", "",
             f"Calibration: {', '.join(doc['calib'])} train splits, {doc['samples']} inputs each, "
             f"mixed. Evaluation: first {doc['limit']} documents per task of lm-eval's evaluation split "
             f"(ARC-Easy test; PIQA, BoolQ the held-out half of dev), zero-shot, "
             f"lm-eval through `tabp-vllm eval` (routed: `eval --router`). L0: {doc['steps']} "
             f"steps per cluster. Host: {doc['host'].get('model', '?')}.", "",
             "Static masks are `route fit --clusters 1` with each method (one mask from the whole "
             "mixed set); the oracle is each task's own TaBP mask (it knows every request's task). "
             "lm-eval has no acc_norm for BoolQ: its acc_norm column is acc.", ""]
    for metric in ("acc_norm", "acc"):
        lines += [f"## {metric}", "",
                  "| config | k | N | distinct masks | " + " | ".join(evals) + " | mean | fit s |",
                  "|---|---|---|---|" + "---|" * (len(evals) + 2)]
        d = [dense["accuracy"][t][metric] for t in evals]
        lines.append("| dense | - | - | - | " + " | ".join(f"{x:.3f}" for x in d)
                     + f" | {sum(d) / len(d):.3f} | - |")
        for k in ks:
            for r in rows:
                if r["k"] != k or r["config"].startswith("oracle"):
                    continue
                v = [r["accuracy"][t][metric] for t in evals]
                lines.append(f"| {r['config']} | {k} | {r['n']} | {r.get('distinct_masks', '-')} | "
                             + " | ".join(f"{x:.3f}" for x in v)
                             + f" | {sum(v) / len(v):.3f} | {r['fit_s']:.0f} |")
            oracle = {t: next((r for r in rows if r["config"] == f"oracle-{t}" and r["k"] == k), None)
                      for t in evals}
            if all(oracle.values()):
                v = [oracle[t]["accuracy"][t][metric] for t in evals]
                lines.append(f"| oracle (per-task TaBP) | {k} | - | {len(evals)} | "
                             + " | ".join(f"{x:.3f}" for x in v) + f" | {sum(v) / len(v):.3f} | "
                             f"{sum(oracle[t]['fit_s'] for t in evals):.0f} |")
        lines.append("")
    lines += ["## Cluster mix (routed L0): documents per cluster", ""]
    for r in rows:
        if r["config"] == "l0" and r.get("cluster_mix"):
            mix = "; ".join(f"{t}: {m}" for t, m in r["cluster_mix"].items())
            lines.append(f"- k={r['k']}, N={r['n']}: {mix}")
    (out / "routing.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(len(ks), len(evals), figsize=(4 * len(evals), 3.2 * len(ks)),
                             squeeze=False)
    for i, k in enumerate(ks):
        for j, t in enumerate(evals):
            ax = axes[i][j]
            for config, style in (("l0", "o-"), ("tabp", "s--")):
                pts = sorted((r["n"], r["accuracy"][t]["acc_norm"]) for r in rows
                             if r["config"] == config and r["k"] == k)
                if pts:
                    ax.plot(*zip(*pts), style, label=f"routed {config}")
            ax.axhline(dense["accuracy"][t]["acc_norm"], color="k", lw=1, label="dense")
            for r in rows:
                if r["k"] == k and r["config"] == f"oracle-{t}":
                    ax.axhline(r["accuracy"][t]["acc_norm"], color="g", ls=":", label="oracle TaBP")
            best = max((r for r in rows if r["k"] == k and r["config"].startswith("static-")),
                       key=lambda r: r["accuracy"][t]["acc_norm"], default=None)
            if best:
                ax.axhline(best["accuracy"][t]["acc_norm"], color="r", ls="-.",
                           label=f"best static ({best['config'][7:]})")
            ax.set_title(f"{t}, k={k}")
            ax.set_xlabel("clusters N")
            ax.set_ylabel("acc_norm")
            ax.set_xscale("log", base=2)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_clusters.png", dpi=110)


if __name__ == "__main__":
    main()
