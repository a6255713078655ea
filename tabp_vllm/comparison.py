"""The method comparison behind bench/compare.py: which masks to make, and the report they give.

Configurations (CONFIGS: `score` options per name, TaBP's settings, the published baselines, the
task-aligned ones and the floors), protocols (`paper`: calibrate once on ARC-Easy train;
`per-task`: on each task's own train split), and `Report`: the run's state (masks under OUT/masks,
per-document results of every (task, removed blocks) pair in OUT/eval_cache.json, one engine per
distinct removed set) and its report (OUT/report.{json,md}, accuracy_vs_k.png): per (protocol,
task, k, configuration) the mean and standard deviation over seeds, a paired bootstrap interval of
the accuracy minus TaBP's, forward passes and wall time of every scoring run, each task's
no-skill floor and, on yes/no tasks, each mask's share of "yes" answers.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tabp_vllm.errors import TabpError

# name -> the `score` options that make it (method + settings); the first is the reference
CONFIGS: dict[str, dict[str, Any]] = {
    "tabp": {"method": "tabp"},
    "tabp-paper": {"method": "tabp", "preset": "paper"},
    "tabp-ddf": {"method": "tabp", "aggregate": "ddf"},
    "tabp-whole": {"method": "tabp", "block_range": "whole"},
    # the default at a quarter of the samples: under 1/10 of SLEB's forward passes at k = 8
    "tabp-64": {"method": "tabp", "samples": 64},
    "block_influence": {"method": "block_influence"},
    "angular": {"method": "angular"},
    "sleb": {"method": "sleb"},
    "ppl": {"method": "ppl"},
    "sleb-task": {"method": "sleb-task"},
    "ppl-task": {"method": "ppl-task"},
    "random": {"method": "random"},
    "last_k": {"method": "last_k"},
}
REFERENCE = "tabp"
PUBLISHED = ["sleb", "ppl", "block_influence", "angular"]  # the goal's "published-setting" baselines
SEEDLESS = {"tabp-paper", "last_k"}  # calibration does not depend on the seed
NO_DATA = {"random", "last_k"}  # no calibration data: one mask for every task
WIKITEXT = {"sleb", "ppl"}  # calibrated on WikiText-2 whatever the task
# our task -> the lm-eval task it is scored with (whole held-out split)
LM_TASK = {"arc_easy": "tabp_arc_easy_validation", "arc_challenge": "tabp_arc_challenge_validation",
           "piqa": "tabp_piqa", "boolq": "tabp_boolq"}
# ARC-Easy's test split (2,376), which chose none of our defaults (they were picked on validation)
ARC_EASY_SPLITS = {"validation": "tabp_arc_easy_validation", "test": "tabp_arc_easy"}


def lm_tasks(arc_easy_split: str = "validation") -> dict[str, str]:
    """Our task -> the lm-eval task scoring it, with ARC-Easy on the split asked for."""
    return {**LM_TASK, "arc_easy": ARC_EASY_SPLITS[arc_easy_split]}


METRIC = {"arc_easy": "acc_norm", "arc_challenge": "acc_norm", "piqa": "acc_norm", "boolq": "acc"}
YES_NO = {"boolq"}  # choices ["no", "yes"]: the report gives each mask's share of "yes"
BOOTSTRAP = 2000


def same_as_paper(protocol: str, task: str, protocols: list[str]) -> bool:
    """The per-task protocol calibrates ARC-Easy on ARC-Easy train, as the paper protocol does:
    the same masks and numbers, reported once."""
    return protocol == "per-task" and task == "arc_easy" and "paper" in protocols


def calibration_task(protocol: str, task: str) -> str:
    """The task whose train split calibrates the masks evaluated on `task` under `protocol`."""
    return "arc_easy" if protocol == "paper" else task


def no_skill(golds: list[int], n_choices: list[int]) -> dict[str, float]:
    """What an accuracy must beat to say anything: chance (a uniform guess among each document's
    choices) and the majority answer (always the most frequent gold index: BoolQ's "yes")."""
    return {"chance": float(np.mean(1.0 / np.asarray(n_choices, dtype=float))),
            "majority": float(np.bincount(golds).max() / len(golds))}


@functools.lru_cache(maxsize=None)  # read once per task and run: the report is rewritten often
def task_answers(lm_task: str, limit: int | None = None) -> tuple[list[int], list[int]]:
    """Gold index and number of choices of each document of the lm-eval task `lm_task` (its
    first `limit`, if given)."""
    from tabp_vllm.lmeval_tasks import load_task_object

    obj = load_task_object(lm_task)
    docs = list(obj.eval_docs)[:limit]
    return [int(obj.doc_to_target(d)) for d in docs], [len(obj.doc_to_choice(d)) for d in docs]


def yes_share(correct: np.ndarray, golds: np.ndarray) -> float:
    """Share of "yes" answers (choice 1 of a yes/no task) given which documents were right."""
    return float(np.mean(np.where(correct == 1, golds == 1, golds == 0)))


def calibration_of(config: str, task: str) -> str:
    """The data a configuration's mask depends on under a protocol whose calibration task is
    `task`: that task, WikiText-2, or nothing."""
    if config in NO_DATA:
        return "none"
    return "wikitext2" if config in WIKITEXT else task


class Report:
    """The run's state: scoring records, per-document evaluation cache, and the report files."""

    def __init__(self, out: Path, args: argparse.Namespace):
        from tabp_vllm.hardware import cpu_info

        self.out, self.args = out, args
        # the model scored and evaluated (an alias such as llama or qwen1.5b, or a path) and
        # ARC-Easy's split; recorded with the other arguments (runs before them had neither)
        args.model = self.model = getattr(args, "model", "llama")
        args.arc_easy_split = getattr(args, "arc_easy_split", "validation")
        self.lm_task = lm_tasks(args.arc_easy_split)
        (out / "masks").mkdir(parents=True, exist_ok=True)
        self.cache_path, self.doc_path = out / "eval_cache.json", out / "report.json"
        self.cache = json.loads(self.cache_path.read_text()) if self.cache_path.exists() else {}
        old = json.loads(self.doc_path.read_text()) if self.doc_path.exists() else {}
        # masks are named by configuration, calibration, seed and k: a resumed run must draw
        # its calibration sets as the run that made them did
        for name in ("samples", "sleb_samples", "limit", "model", "arc_easy_split"):
            was = old.get("args", {}).get(name, getattr(args, name))
            if was != getattr(args, name):
                raise TabpError(f"{out} was made with --{name.replace('_', '-')} {was}; "
                                f"resume with the same, or use another --out")
        self.scoring: dict[str, dict] = old.get("scoring", {})
        # every CPU that scored or evaluated part of this run (wall times depend on it); this
        # host joins the list only when it does work, so a --report-only elsewhere changes nothing
        self.host = cpu_info()
        self.hosts: list[dict] = old.get("hosts") or ([old["host"]] if "host" in old else [])
        self.mt = None  # the transformers model, loaded on the first scoring run

    # ---------------------------------------------------------------- masks
    def mask_path(self, config: str, calib: str, seed: int, k: int) -> Path:
        return self.out / "masks" / f"{config}-{calib}-s{seed}-k{k}.json"

    def masks(self, config: str, task: str, seed: int) -> dict[int, tuple[tuple[int, ...], Path]]:
        """k -> (removed blocks, mask file) of `config` calibrated for `task` with `seed`; scored
        now if any k is missing (once at the largest k when the method ranks every k)."""
        from tabp_vllm.scoring.commands import score_with_options
        from tabp_vllm.scoring.options import ScoreOptions
        from tabp_vllm.mask import load_mask
        from tabp_vllm.models import alias_of, resolve_model
        from tabp_vllm.scoring import get_method, result_for_k, score_to_mask
        from tabp_vllm.scoring.probe import load_model, pick_device

        calib, seed = calibration_of(config, task), 0 if config in SEEDLESS else seed
        ks = sorted(self.args.ks)
        todo = [k for k in ks if not self.mask_path(config, calib, seed, k).exists()]
        if todo:
            spec = dict(CONFIGS[config])
            method = get_method(spec["method"])
            if "preset" not in spec and "samples" not in spec:  # the preset: its first 1,024
                multi = method.forward_passes(1, max(ks) + 1, max(ks)) > 1  # SLEB, PPL
                spec["samples"] = self.args.sleb_samples if multi else self.args.samples
            model = resolve_model(self.model)
            if self.mt is None:
                self.mt = load_model(model, pick_device("cpu"))
            runs_at = [max(todo)] if method.ranks_all_k else todo
            for kk in runs_at:
                o = ScoreOptions(model=self.model, task=calib if calib not in ("none", "wikitext2")
                                 else "arc_easy", seed=seed, output=self.mask_path(config, calib, seed, kk),
                                 **spec)
                print(f"scoring {config} on {calib} (seed {seed}) at k = {kk} ...", flush=True)
                run = score_with_options(o, k=kk, model_and_tokenizer=self.mt)
                self.worked_here()
                self.scoring[f"{config}|{calib}|{seed}|{kk}"] = {"host": self.host["model"],
                    "config": config, "calibration": calib, "seed": seed, "scored_at_k": kk,
                    "samples": run.calibration["samples"], "forward_passes": run.forward_passes,
                    "wall_s": round(run.wall_s, 2)}
                for k in (todo if method.ranks_all_k else [kk]):
                    res = run if k == kk else result_for_k(run, k)
                    score_to_mask(model, res, task=calib, model_id=alias_of(self.model)).save(
                        self.mask_path(config, calib, seed, k))
                print(f"  {run.forward_passes} forward passes, {run.wall_s:.1f} s", flush=True)
                self.save()
        return {k: (tuple(load_mask(self.mask_path(config, calib, seed, k)).removed_layers),
                    self.mask_path(config, calib, seed, k)) for k in ks}

    # ---------------------------------------------------------------- evaluation
    def key(self, task: str, removed: tuple[int, ...]) -> str:
        return f"{self.lm_task[task]}|{','.join(map(str, removed))}"

    def evaluate(self, needed: dict[tuple[int, ...], tuple[set[str], Path | None]]) -> None:
        """One engine per removed set, on every task it still lacks; cached per document."""
        from tabp_vllm.evaluation.evaluate import evaluate_variant
        from tabp_vllm.models import resolve_model

        todo = [(r, sorted(t for t in ts if self.key(t, r) not in self.cache), p)
                for r, (ts, p) in needed.items()]
        todo = [x for x in todo if x[1]]
        for i, (removed, tasks, path) in enumerate(todo, 1):
            t0 = time.perf_counter()
            res = evaluate_variant(resolve_model(self.model), [self.lm_task[t] for t in tasks],
                                   str(path) if path else None, limit=self.args.limit)
            self.worked_here()
            for t in tasks:
                docs = sorted(res["samples"][self.lm_task[t]], key=lambda d: d["doc_id"])
                per_doc = {m: [d["metrics"][m] for d in docs] for m in ("acc", "acc_norm")
                           if m in docs[0]["metrics"]}
                self.cache[self.key(t, removed)] = {
                    "n": len(docs), **{m: float(np.mean(v)) for m, v in per_doc.items()},
                    "docs": per_doc}
            self.cache_path.write_text(json.dumps(self.cache) + "\n")
            print(f"[{i}/{len(todo)}] removed {list(removed) or 'none'} on {', '.join(tasks)}: "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            self.save()

    # ---------------------------------------------------------------- report
    def per_doc(self, task: str, removed: tuple[int, ...]) -> np.ndarray | None:
        hit = self.cache.get(self.key(task, removed))
        return None if hit is None else np.asarray(hit["docs"][METRIC[task]], dtype=float)

    def summarize(self) -> dict[str, Any]:
        """Per protocol, task, k and configuration: per-seed accuracy, mean, sd, and the paired
        bootstrap interval of (configuration - TaBP) on seed-averaged per-document scores."""
        a = self.args
        rows = []
        for protocol in a.protocols:
            for task in a.tasks:
                dense = self.per_doc(task, ())
                if task in YES_NO:  # accuracy there moves with the yes/no bias
                    golds = np.asarray(task_answers(self.lm_task[task], a.limit)[0])
                    yes_dense = None if dense is None else yes_share(dense, golds)
                for k in sorted(a.ks):
                    per_config: dict[str, list[np.ndarray]] = {}
                    removed_of: dict[str, list[list[int]]] = {}
                    for config in a.configs:
                        got, rem = self.per_seed(protocol, task, k, config)
                        if got:
                            per_config[config], removed_of[config] = got, rem
                    ref = per_config.get(REFERENCE)
                    for config, got in per_config.items():
                        accs = [float(x.mean()) for x in got]
                        row = {"protocol": protocol, "task": task, "metric": METRIC[task], "k": k,
                               "config": config, "seeds": len(got),
                               "seeds_asked": 1 if config in SEEDLESS else len(a.seeds),
                               "acc_per_seed": accs,
                               "mean": float(np.mean(accs)),
                               "sd": float(np.std(accs, ddof=1)) if len(accs) > 1 else None,
                               "n": len(got[0]), "removed": removed_of[config],
                               "dense": float(dense.mean()) if dense is not None else None}
                        if task in YES_NO:
                            row["yes_share"] = float(np.mean([yes_share(x, golds) for x in got]))
                            if yes_dense is not None:
                                row["dense_yes_share"] = yes_dense
                        if ref is not None and config != REFERENCE:
                            row["minus_tabp"] = paired_bootstrap(np.mean(got, axis=0),
                                                                 np.mean(ref, axis=0))
                        rows.append(row)
        return {"rows": rows, "goal": self.goal(rows), "cost": self.cost()}

    def goal(self, rows: list[dict]) -> list[dict]:
        """Per (protocol, task, k) of the goal: does a TaBP configuration reach the best
        published-setting baseline within the bootstrap interval, at <= 1/10 of SLEB's passes?"""
        cost = {(c["config"], c["calibration"]): c["forward_passes"] for c in self.cost()}
        sleb = cost.get(("sleb", "wikitext2"))
        out = []
        for protocol in self.args.protocols:
            for task in ("arc_easy", "piqa"):
                for k in (4, 8):
                    if same_as_paper(protocol, task, self.args.protocols):
                        continue
                    here = {r["config"]: r for r in rows
                            if (r["protocol"], r["task"], r["k"]) == (protocol, task, k)}
                    base = [here[c] for c in PUBLISHED if c in here]
                    if not base or not any(c.startswith("tabp") for c in here):
                        continue
                    best = max(base, key=lambda r: r["mean"])
                    verdict = []
                    for c in (c for c in here if c.startswith("tabp")):
                        x = self.seed_mean(protocol, task, k, c)
                        y = self.seed_mean(protocol, task, k, best["config"])
                        lo, hi = paired_bootstrap(y, x)["interval"]  # best baseline - this TaBP
                        calib = calibration_of(c, calibration_task(protocol, task))
                        passes = cost.get((c, calib))
                        cheap = None if sleb is None or passes is None else passes <= sleb / 10
                        verdict.append({"config": c, "mean": here[c]["mean"],
                                        "baseline_minus_tabp": [lo, hi], "within": lo <= 0,
                                        "passes": passes, "tenth_of_sleb": cheap,
                                        "met": bool(lo <= 0 and cheap)})
                    out.append({"protocol": protocol, "task": task, "k": k,
                                "best_baseline": best["config"], "best_mean": best["mean"],
                                "tabp": verdict, "met": any(v["met"] for v in verdict)})
        return out

    def per_seed(self, protocol: str, task: str, k: int,
                 config: str) -> tuple[list[np.ndarray], list[list[int]]]:
        """Per calibration seed with a mask and its evaluation on `task`: the per-document scores
        and the removed blocks."""
        from tabp_vllm.mask import load_mask

        calib = calibration_of(config, calibration_task(protocol, task))
        got, rem = [], []
        for s in ([0] if config in SEEDLESS else self.args.seeds):
            path = self.mask_path(config, calib, s, k)
            if path.exists():
                removed = tuple(load_mask(path).removed_layers)
                x = self.per_doc(task, removed)
                if x is not None:
                    got.append(x)
                    rem.append(list(removed))
        return got, rem

    def seed_mean(self, protocol: str, task: str, k: int, config: str) -> np.ndarray:
        return np.mean(self.per_seed(protocol, task, k, config)[0], axis=0)

    def cost(self) -> list[dict]:
        """Per configuration and calibration data: mean forward passes and wall time of one
        scoring run at the largest k (the run that gives every k for the methods that rank
        every k). Apart per calibration: PIQA's texts are longer than ARC-Easy's."""
        kmax = max(self.args.ks)
        out = []
        for config in self.args.configs:
            for calib in sorted({r["calibration"] for r in self.scoring.values()
                                 if r["config"] == config}):
                runs = [r for r in self.scoring.values()
                        if (r["config"], r["calibration"]) == (config, calib)]
                top = [r for r in runs if r["scored_at_k"] == kmax] or runs
                out.append({"config": config, "calibration": calib, "runs": len(top),
                            "samples": top[0]["samples"],
                            "forward_passes": round(float(np.mean([r["forward_passes"] for r in top]))),
                            "wall_s": round(float(np.mean([r["wall_s"] for r in top])), 1),
                            "hosts": sorted({r.get("host") or "?" for r in top})})
        return out

    def worked_here(self) -> None:
        if self.host not in self.hosts:
            self.hosts.append(self.host)

    def save(self) -> None:
        doc = {"no_skill": {t: no_skill(*task_answers(self.lm_task[t], self.args.limit))
                            for t in self.args.tasks}, "model": self.model,
               "hosts": self.hosts, "command": sys.argv, "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()},
            "configs": {c: CONFIGS[c] for c in self.args.configs}, "reference": REFERENCE,
            "lm_tasks": {t: self.lm_task[t] for t in self.args.tasks}, "metric": METRIC,
            "bootstrap_resamples": BOOTSTRAP, "scoring": self.scoring, **self.summarize()}
        self.doc_path.write_text(json.dumps(doc, indent=1) + "\n")
        write_markdown(doc, self.out / "report.md")
        plot(doc, self.out / "accuracy_vs_k.png")


def paired_bootstrap(x: np.ndarray, y: np.ndarray, resamples: int = BOOTSTRAP,
                     seed: int = 0) -> dict[str, Any]:
    """Mean of x - y over the same documents and its 95 % percentile interval, resampling
    documents with replacement (both scores of a document stay together: the pairing)."""
    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    means = d[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(d.mean()), "interval": [float(lo), float(hi)]}


def hierarchical_bootstrap(x: np.ndarray, y: np.ndarray, resamples: int = BOOTSTRAP,
                           seed: int = 0) -> dict[str, Any]:
    """Mean of x - y and its 95 % interval when both vary with a fit seed: `x` (seeds_x, docs) and
    `y` (seeds_y, docs), one row per fit seed over the same documents (a static mask: one row).
    Each resample draws documents with replacement (the same documents for both: the pairing)
    and, independently for x and y, seeds with replacement, so the interval carries the seed
    variance that a documents-only bootstrap leaves out."""
    x, y = np.atleast_2d(np.asarray(x, dtype=float)), np.atleast_2d(np.asarray(y, dtype=float))
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{x.shape[1]} documents against {y.shape[1]}")
    rng = np.random.default_rng(seed)
    n = x.shape[1]
    means = np.empty(resamples)
    for r in range(resamples):
        docs = rng.integers(0, n, size=n)
        sx = rng.integers(0, x.shape[0], size=x.shape[0])
        sy = rng.integers(0, y.shape[0], size=y.shape[0])
        means[r] = x[np.ix_(sx, docs)].mean() - y[np.ix_(sy, docs)].mean()
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(x.mean() - y.mean()), "interval": [float(lo), float(hi)],
            "seeds": [int(x.shape[0]), int(y.shape[0])], "documents": int(n)}


def write_markdown(doc: dict, path: Path) -> None:
    a = doc["args"]
    model = doc.get("model", "llama")
    lines = [f"# TaBP vs baselines on {'the demo model' if model == 'llama' else model} "
             "(report v2)", "",
             f"Host{'s' if len(doc['hosts']) > 1 else ''}: "
             f"{'; '.join(h.get('model') or '?' for h in doc['hosts']) or '?'}. Evaluation: lm-eval on "
             f"{', '.join(f'{t} ({name})' for t, name in doc['lm_tasks'].items())}"
             f"{'' if a['limit'] is None else ', first %d documents' % a['limit']}; metric: "
             f"acc_norm (ARC, PIQA), acc (BoolQ). Calibration: {a['samples']} samples "
             f"({a['sleb_samples']} for SLEB / PPL; the paper preset its 1,024), seeds "
             f"{a['seeds']}. Cells: mean over seeds (± sd), then [95 % paired bootstrap interval "
             f"of the configuration minus `{doc['reference']}`].", ""]
    rows = doc["rows"]
    lines += summary_table(doc) + [""]
    for protocol in a["protocols"]:
        title = ("calibrated once on ARC-Easy train, evaluated on every task" if protocol == "paper"
                 else "calibrated on each task's own train split")
        for task in a["tasks"]:
            here = [r for r in rows if (r["protocol"], r["task"]) == (protocol, task)]
            if not here:
                continue
            if same_as_paper(protocol, task, a["protocols"]):
                lines += [f"## {protocol} protocol: {task} is calibrated as in the paper protocol "
                          "(its tables above)", ""]
                continue
            ks = sorted({r["k"] for r in here})
            dense = next((r["dense"] for r in here if r["dense"] is not None), None)
            fl = doc["no_skill"][task]
            lines += [f"## {protocol} protocol ({title}): {task}, {METRIC[task]}"
                      + (f", dense {dense:.3f}" if dense is not None else "")
                      + (f" (yes {100 * here[0]['dense_yes_share']:.0f} %)"
                         if "dense_yes_share" in here[0] else "")
                      + f"; chance {fl['chance']:.3f}, majority answer {fl['majority']:.3f}", "",
                      "| configuration | " + " | ".join(f"k = {k}" for k in ks) + " |",
                      "|---|" + "---|" * len(ks)]
            for config in a["configs"]:
                cells = [table_cell(next((r for r in here if r["config"] == config
                                          and r["k"] == k), None)) for k in ks]
                if any(c != "-" for c in cells):
                    lines.append(f"| {config} | " + " | ".join(cells) + " |")
            lines.append("")
    if doc["cost"]:
        # wall times depend on the CPU: name it per row once runs come from more than one
        cpu = len({h for c in doc["cost"] for h in c.get("hosts", [])}) > 1
        lines += ["## Cost of one scoring run (at the largest k; mean over the runs on record)", "",
                  "| configuration | calibration | samples | forward passes | wall s | runs |"
                  + (" CPU |" if cpu else ""), "|---|---|---|---|---|---|" + ("---|" if cpu else "")]
        lines += [f"| {c['config']} | {c['calibration']} | {c['samples']} | {c['forward_passes']:,} "
                  f"| {c['wall_s']:.1f} | {c['runs']} |"
                  + (f" {', '.join(c.get('hosts', []))} |" if cpu else "") for c in doc["cost"]]
        lines.append("")
    if doc["goal"]:
        lines += ["## Goal: a TaBP configuration at least as accurate as the best published-"
                  "setting baseline (within the interval) at <= 1/10 of SLEB's forward passes", ""]
        for g in doc["goal"]:
            ok = [v["config"] for v in g["tabp"] if v["met"]]
            lines.append(f"- {g['protocol']}, {g['task']}, k = {g['k']}: best baseline "
                         f"{g['best_baseline']} {g['best_mean']:.3f}; "
                         + ("met by " + ", ".join(ok) if ok else "not met") + " ("
                         + "; ".join(f"{v['config']} {v['mean']:.3f}, baseline - it "
                                     f"[{v['baseline_minus_tabp'][0]:+.3f}, "
                                     f"{v['baseline_minus_tabp'][1]:+.3f}], {v['passes']} passes"
                                     for v in g["tabp"]) + ")")
        lines.append("")
    path.write_text("\n".join(lines))



def table_cell(r: dict | None) -> str:
    """A row's mean (± sd over seeds) and [its paired interval minus TaBP]; '-' for no row."""
    if r is None:
        return "-"
    cell = f"{r['mean']:.3f}" + (f" ± {r['sd']:.3f}" if r["sd"] is not None else "")
    if r["seeds"] < r.get("seeds_asked", r["seeds"]):  # some seeds' masks not evaluated yet
        cell += f" ({r['seeds']} of {r['seeds_asked']} seeds)"
    if "yes_share" in r:
        cell += f" (yes {100 * r['yes_share']:.0f} %)"
    if "minus_tabp" in r:
        lo, hi = r["minus_tabp"]["interval"]
        cell += f" [{lo:+.3f}, {hi:+.3f}]"
    return cell


def summary_table(doc: dict, tasks: tuple[str, ...] = ("arc_easy", "piqa")) -> list[str]:
    """One table of the goal's cells (first protocol; ARC-Easy and PIQA at every k): per
    configuration the mean accuracy (± sd over seeds), and in brackets its paired interval minus
    TaBP's."""
    a, rows = doc["args"], doc["rows"]
    protocol = a["protocols"][0]
    cols = [(t, k) for t in tasks for k in sorted(a["ks"])
            if any((r["protocol"], r["task"], r["k"]) == (protocol, t, k) for r in rows)]
    if not cols:
        return []
    dense = {t: next((r["dense"] for r in rows if r["task"] == t and r["dense"] is not None), None)
             for t, _ in cols}
    out = [f"Summary ({protocol} protocol; {METRIC[cols[0][0]]}; mean over seeds ± sd; [95 % paired "
           f"interval of the configuration minus `{doc['reference']}`]):", "",
           "| configuration | " + " | ".join(f"{t} k = {k}" for t, k in cols) + " |",
           "|---|" + "---|" * len(cols),
           "| dense | " + " | ".join(f"{dense[t]:.3f}" if dense[t] is not None else "-"
                                    for t, _ in cols) + " |"]
    for config in a["configs"]:
        cells = [table_cell(next((r for r in rows if (r["protocol"], r["task"], r["k"], r["config"])
                                  == (protocol, t, k, config)), None))
                 for t, k in cols]
        if any(c != "-" for c in cells):
            out.append(f"| {config} | " + " | ".join(cells) + " |")
    return out


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = doc["args"]
    rows = [r for r in doc["rows"] if r["protocol"] == a["protocols"][0]]
    tasks = [t for t in a["tasks"] if any(r["task"] == t for r in rows)]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks) + 1.6, 3.8), squeeze=False)
    colors = plt.get_cmap("tab20").colors  # one colour per configuration (13 > tab10's 10)
    for ax, task in zip(axes[0], tasks):
        here = [r for r in rows if r["task"] == task]
        for i, config in enumerate(a["configs"]):
            pts = sorted((r["k"], r["mean"], r["sd"] or 0.0) for r in here if r["config"] == config)
            if pts:
                ks, means, sds = zip(*pts)
                # TaBP solid and thick, published baselines dashed, the rest dotted
                style = "-" if config.startswith("tabp") else "--" if config in PUBLISHED else ":"
                ax.errorbar(ks, means, yerr=sds, marker="o", capsize=2, label=config, ls=style,
                            color=colors[i % len(colors)], lw=2 if config.startswith("tabp") else 1.2)
        dense = next((r["dense"] for r in here if r["dense"] is not None), None)
        if dense is not None:
            ax.axhline(dense, color="k", ls="--", lw=1, label="dense")
        fl = doc["no_skill"][task]  # below this line an accuracy says nothing about the task
        ax.axhline(max(fl["chance"], fl["majority"]), color="grey", ls=":", lw=1,
                   label="chance / majority answer")
        ax.set_title(f"{task} ({METRIC[task]}), {a['protocols'][0]} protocol", fontsize=9)
        ax.set_xlabel("blocks removed (k)")
    axes[0][0].set_ylabel("accuracy (mean over seeds ± sd)")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
