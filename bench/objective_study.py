"""Which fit objective ranks masks the way held-out accuracy does? (issue 34: the KL and LM
objectives, minimised by the swap search, picked less accurate masks than the gates' own.)

For every static and L0 mask of the routing report's N = 1 rows (demo model, k = 4), measured on
the same 128 calibration inputs the fits use (the routers' provenance):

- kl: mean KL(dense || masked) over the last 32 next-token positions of question + gold answer
  (`route fit --loss kl`, `Objective.total`);
- lm: the cross-entropy of the same 32 tokens (`--loss lm`, the paper's);
- kl_all, lm_all: the same over every position of the 128-token text (`--kl-positions 128`), as
  SLEB and the perplexity scorer read it;
- answer: the gold answer's mean token negative log-likelihood given the question (an MCQA item's
  ' {gold choice}'; a GSM8K item's text after its last 'Answer:');
- choice: the cross-entropy of the gold choice among the item's choices, each scored as lm-eval's
  acc_norm does (summed log-likelihood over the continuation's bytes), MCQA items only;
- calib_acc: the share of MCQA items whose gold choice scores highest (that acc_norm).

and, beside each, the mask's held-out accuracy from the report's evaluations (acc_norm; BoolQ's
acc). Spearman's rho across masks, on the mean over tasks and per task (each task's calibration
items against that task's evaluation), says which objective carries to accuracy.

    python bench/objective_study.py --report bench/results/routing_v2 --out bench/results/routing_v2/objectives

Resumable: a mask already in OUT/objectives.json is not measured again.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

# N = 1 rows of the report whose router holds one mask; configs with the same mask are measured once
CONFIGS = ["static-block_influence", "static-angular", "static-sleb", "static-ppl", "static-random",
           "tabp", "l0", "l0-s1", "l0-s2", "l0-swap", "l0-lm-swap"]
ROUTER_OF = {"static-block_influence": "block_influence", "static-angular": "angular",
             "static-sleb": "sleb", "static-ppl": "ppl", "static-random": "random"}
METRIC = {"arc_easy": "acc_norm", "piqa": "acc_norm", "boolq": "acc"}
OBJECTIVES = ["kl", "lm", "kl_all", "lm_all", "answer", "choice", "calib_acc"]
# lower is better for every objective but calibration accuracy
SIGN = {"kl": -1, "lm": -1, "kl_all": -1, "lm_all": -1, "answer": -1, "choice": -1,
        "calib_acc": 1}


def continuation_scores(model, tok, pairs: list[tuple[str, str]], batch: int = 8
                        ) -> list[tuple[float, int]]:
    """(summed log-likelihood, tokens) of each continuation given its context, tokenised apart and
    joined as lm-eval does (the context's last 128 - len(continuation) tokens kept)."""
    import torch

    out: list[tuple[float, int]] = []
    enc = []
    for ctx, cont in pairs:
        c = tok(ctx, add_special_tokens=False)["input_ids"]
        x = tok(cont, add_special_tokens=False)["input_ids"][-127:]
        enc.append((c[-(128 - len(x)):] if len(x) < 128 else [], x))
    for s in range(0, len(enc), batch):
        chunk = enc[s:s + batch]
        seqs = [c + x for c, x in chunk]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tok.pad_token_id)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, q in enumerate(seqs):
            ids[i, :len(q)] = torch.tensor(q)
            att[i, :len(q)] = 1
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits.float(), -1)
        for i, (c, x) in enumerate(chunk):
            pos = torch.arange(len(c) - 1, len(c) + len(x) - 1)
            out.append((float(lp[i, pos, torch.tensor(x)].sum()), len(x)))
    return out


def choice_terms(model, tok, items) -> tuple[list[float], list[bool]]:
    """Per MCQA item: the cross-entropy of its gold choice under acc_norm's scores, and whether
    the gold scores highest."""
    from tabp_vllm.data import mcqa_context

    pairs, owner = [], []
    for n, it in enumerate(items):
        for c in it.choices:
            pairs.append((mcqa_context(it), f" {c}"))
            owner.append(n)
    scores = continuation_scores(model, tok, pairs)
    ce, right = [], []
    for n, it in enumerate(items):
        s = np.array([ll / max(len(cont.encode()), 1)
                      for (ll, _), (_, cont), o in zip(scores, pairs, owner) if o == n])
        z = s - s.max()
        ce.append(float(-(z[it.gold] - np.log(np.exp(z).sum()))))
        right.append(bool(s.argmax() == it.gold))
    return ce, right


def measure(model, tok, objectives: dict, whole: dict, cal, removed: list[int], have: dict
            ) -> dict:
    """Per calibration task, every objective not in `have` (a mask's earlier measures, kept)."""
    from tabp_vllm.data import MCQAItem
    from tabp_vllm.routing.fit import answer_split
    from tabp_vllm.scoring.probe import without_blocks

    per_task = {}
    for task, obj in objectives.items():
        items = [it for it, t in zip(cal.items, cal.tasks) if t == task]
        row = dict(have.get(task, {}))
        for kind in ("kl", "lm"):
            if kind not in row:
                row[kind] = obj.total(removed, kind=kind) / len(items)
            if f"{kind}_all" not in row:
                row[f"{kind}_all"] = whole[task].total(removed, kind=kind) / len(items)
        with without_blocks(model, set(removed)):
            if "answer" not in row:
                ans = continuation_scores(model, tok, [answer_split(it) for it in items])
                row["answer"] = float(np.mean([-ll / n for ll, n in ans]))
            if all(isinstance(it, MCQAItem) for it in items) and "choice" not in row:
                ce, right = choice_terms(model, tok, items)
                row["choice"], row["calib_acc"] = float(np.mean(ce)), float(np.mean(right))
        per_task[task] = row
    return per_task


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def summarise(rows: dict, tasks: list[str], ranked: list[str]) -> dict:
    """Spearman's rho (and its p) of each objective, signed so that + means it ranks masks like
    accuracy does: per task (that task's calibration items against its evaluation), on the mean
    over `tasks` and on the mean over `ranked` (the tasks whose accuracy can rank masks: BoolQ's
    follows the yes/no prior a mask leaves, `bench/routing.py`'s prior section). An objective
    not measured on every mask is left out."""
    from scipy.stats import spearmanr

    names = list(rows)
    out = {}
    for obj in OBJECTIVES:
        if not all(obj in rows[m]["calibration"][t] for m in names for t in tasks):
            continue
        entry = {}
        for label, ts in [*((t, [t]) for t in tasks), ("mean", tasks),
                          ("mean_" + "_".join(ranked), ranked)]:
            x = [SIGN[obj] * np.mean([rows[m]["calibration"][t][obj] for t in ts]) for m in names]
            res = spearmanr(x, [np.mean([rows[m]["accuracy"][t] for t in ts]) for m in names])
            entry[label] = {"rho": round(float(res.statistic), 3), "p": round(float(res.pvalue), 3)}
        out[obj] = entry
    return out


def plot(rows: dict, objectives: list[str], tasks: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(objectives), figsize=(4 * len(objectives), 3.6))
    for ax, obj in zip(axes, objectives):
        for m, r in rows.items():
            x = np.mean([r["calibration"][t][obj] for t in tasks])
            y = np.mean([r["accuracy"][t] for t in tasks])
            ax.scatter(x, y, s=18)
            ax.annotate(m, (x, y), fontsize=6)
        ax.set_xlabel(f"{obj} on calibration ({', '.join(tasks)})")
        ax.set_title(obj)
    axes[0].set_ylabel(f"held-out accuracy ({', '.join(tasks)})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--report", default="bench/results/routing_v2")
    ap.add_argument("--out", default="bench/results/routing_v2/objectives")
    ap.add_argument("--summary-only", action="store_true",
                    help="measure nothing: rewrite the summary and plot from OUT/objectives.json")
    a = ap.parse_args()
    rep, out = Path(a.report), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "objectives.json"
    done = json.loads(path.read_text()) if path.exists() else {"masks": {}}
    report = json.loads((rep / "routing.json").read_text())
    acc = {r["config"]: {t: r["accuracy"][t][METRIC[t]] for t in METRIC}
           for r in report["rows"] if r["n"] in (1, None)}
    if not a.summary_only:
        measure_all(rep, done, path, acc)
    masks = done["masks"]
    tasks, ranked = list(METRIC), ["arc_easy", "piqa"]
    rows = {"/".join(v["configs"]): v for v in masks.values()}
    done["spearman"] = summarise(rows, tasks, ranked)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    done.setdefault("host", {"cpu": next((l.split(":", 1)[1].strip() for l in cpu.splitlines()
                                          if l.startswith("Model name")), platform.processor()),
                             "avx512_bf16": "avx512_bf16" in cpu})
    path.write_text(json.dumps(done, indent=1))
    plot(rows, list(done["spearman"]), ranked, out / "objectives.png")
    for obj, e in done["spearman"].items():
        print(f"{obj:10s} " + "  ".join(f"{t} {v['rho']:+.2f} (p {v['p']:.2f})" for t, v in e.items()))


def measure_all(rep: Path, done: dict, path: Path, acc: dict) -> None:
    """Every objective on every mask of CONFIGS not measured yet (saved after each mask)."""
    from tabp_vllm.models import resolve_model
    from tabp_vllm.routing.fit import Objective
    from tabp_vllm.routing.oracle import router_calibration
    from tabp_vllm.routing.router import load_router
    from tabp_vllm.scoring.probe import load_model

    base = load_router(rep / "routers" / "l0-k4-n1.json")
    hp = base.params
    cal = router_calibration(base)
    model, tok = load_model(resolve_model("llama"))

    def objective(task: str, positions: int) -> Objective:
        return Objective(model, tok, [it for it, t in zip(cal.items, cal.tasks) if t == task],
                         hp["batch_size"], hp["max_length"], positions)

    tasks_of = list(dict.fromkeys(cal.tasks))
    objectives = {t: objective(t, hp["kl_positions"]) for t in tasks_of}
    # every position of the (128-token, left-truncated) text, as SLEB and PPL read it
    whole = {t: objective(t, hp["max_length"]) for t in tasks_of}
    masks = done["masks"]
    for config in (c for c in CONFIGS if c in acc):  # (rows the report has)
        router = load_router(rep / "routers" / f"{ROUTER_OF.get(config, config)}-k4-n1.json")
        removed = sorted(router.masks[0].removed_layers)
        key = ",".join(map(str, removed))
        entry = masks.setdefault(key, {"configs": [], "removed": removed})
        if config not in entry["configs"]:
            entry["configs"].append(config)
        entry.setdefault("accuracy", acc[config])
        have = entry.get("calibration", {})
        if not all(o in have.get(t, {}) for t in METRIC for o in OBJECTIVES):
            t0 = time.perf_counter()
            entry["calibration"] = measure(model, tok, objectives, whole, cal, removed, have)
            entry["wall_s"] = round(entry.get("wall_s", 0) + time.perf_counter() - t0, 1)
            print(config, key, entry["wall_s"], "s", flush=True)
        path.write_text(json.dumps(done, indent=1))
    done["calibration"] = {"router": "routers/l0-k4-n1.json", "samples": len(cal.items),
                           "sizes": cal.sizes(list(range(len(cal.items)))),
                           "positions": hp["kl_positions"], "max_length": hp["max_length"]}


if __name__ == "__main__":
    main()
