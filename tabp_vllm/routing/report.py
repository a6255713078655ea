"""The routing report's numbers from per-document results (`eval --router`'s `per_document`):
routed configurations against the best static mask of equal average removed FLOPs and against
their per-cluster oracle, with intervals over documents and fit seeds together, and the gap to the
oracle split into routing and mask quality. Pure functions: the files are read by the caller.

A *run* is one evaluation's per-document results, {task: [{"doc_id", "cluster", metric: value,
...}]}; a configuration at several fit seeds is a list of runs over the same documents.

The gap decomposition, per document d of task t (values: the task's metric):
- r(d): the routed configuration (d's cluster c_d, that cluster's learned mask);
- o(d): the per-cluster oracle (the same c_d, the static mask the oracle chose for c_d);
- p(d): the oracle with d sent to its task's cluster (`home[t]`: the cluster holding most of t's
  calibration inputs), i.e. the static chosen for home[t], read from that static's own run; where
  that is the static the oracle already serves d with, p(d) = o(d).
p - r = (p - o) + (o - r): *routing* (p - o, non-zero only on the documents the router sends to a
cluster whose oracle mask is not their task's) plus *masks* (o - r: the same routing, the cluster's
learned mask against the best static for it). Routed and oracle share the router's centroids, so
they route every document alike (checked): a split of o - r alone by documents would put the
whole gap on the masks.

Beside that oracle (chosen on calibration KL: a selector one could serve), its ceiling, the *eval
oracle* (`eval_oracle`): each cluster served by the static best on the evaluation documents routed
to it, the most any per-cluster choice among the statics reaches with these clusters.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tabp_vllm.comparison import BOOTSTRAP, FLOPS_TIE, hierarchical_bootstrap
from tabp_vllm.errors import TabpError

Run = dict[str, list[dict[str, Any]]]


def by_doc(run: Run, task: str, where: str) -> dict[int, dict[str, Any]]:
    if task not in run:
        raise TabpError(f"{where}: no per-document results for {task}")
    return {int(d["doc_id"]): d for d in run[task]}


def values(runs: list[Run], task: str, metric: str, where: str) -> tuple[list[int], np.ndarray]:
    """(document ids, (runs, docs) matrix of `metric`); every run must hold the same documents."""
    docs = [by_doc(r, task, where) for r in runs]
    ids = sorted(docs[0])
    for d in docs[1:]:
        if sorted(d) != ids:
            raise TabpError(f"{where}: the runs hold different {task} documents "
                            f"({len(d)} vs {len(ids)}): evaluate them on the same split and --limit")
    return ids, np.array([[float(d[i][metric]) for i in ids] for d in docs])


def compare(x: list[Run], y: list[Run], tasks: list[str], metric: dict[str, str], where: str,
            resamples: int = BOOTSTRAP) -> dict[str, Any]:
    """x - y per task and on the mean over tasks, each with its hierarchical 95 % interval."""
    per_task, xs, ys, strata = {}, [], [], []
    for t in tasks:
        ids_x, vx = values(x, t, metric[t], where)
        ids_y, vy = values(y, t, metric[t], where)
        if ids_x != ids_y:
            raise TabpError(f"{where}: {t}: the compared runs hold different documents "
                            f"({len(ids_x)} vs {len(ids_y)})")
        per_task[t] = hierarchical_bootstrap(vx, vy, resamples)
        xs.append(vx)
        ys.append(vy)
        strata += [t] * len(ids_x)
    mean = hierarchical_bootstrap(np.hstack(xs), np.hstack(ys), resamples, strata=strata)
    return {"per_task": per_task, "mean": mean}


def gap_split(routed: Run, oracle: Run, statics: dict[str, Run], choices: dict[str, str],
              home: dict[str, str], tasks: list[str], metric: dict[str, str], where: str
              ) -> dict[str, Any]:
    """p - r = routing + masks (module docstring) for one fit seed, per task and on the mean over
    tasks. `choices`: the oracle's static per cluster name ("0", ..., "fallback"); `home`: each
    task's cluster name; `statics`: each chosen static's own run."""
    out = {}
    for t in tasks:
        if t not in home:
            raise TabpError(f"{where}: {t} has no cluster of its own (no calibration input of it)")
        r, o = by_doc(routed, t, where), by_doc(oracle, t, where)
        if sorted(r) != sorted(o):
            raise TabpError(f"{where}: {t}: the routed and oracle runs hold different documents "
                            f"({len(r)} vs {len(o)})")
        own = choices.get(home[t])
        if own not in statics:
            raise TabpError(f"{where}: no run of static {own!r}, the oracle's mask for {t}")
        s = by_doc(statics[own], t, where)
        routing = masks = 0.0
        misrouted = 0
        for i in r:
            c = str(r[i]["cluster"])
            if str(o[i]["cluster"]) != c:
                raise TabpError(f"{where}: {t} document {i} is in cluster {c} routed but "
                                f"{o[i]['cluster']} under the oracle: not the same router")
            if c not in choices:
                raise TabpError(f"{where}: the oracle chose no mask for cluster {c}")
            if i not in s:
                raise TabpError(f"{where}: {t} document {i} is missing from static {own}'s run")
            m = metric[t]
            masks += float(o[i][m]) - float(r[i][m])
            if choices[c] != own:
                misrouted += 1
                routing += float(s[i][m]) - float(o[i][m])
        n = len(r)
        out[t] = {"documents": n, "misrouted": misrouted, "routing": routing / n,
                  "masks": masks / n, "gap": (routing + masks) / n}
    mean = {key: float(np.mean([out[t][key] for t in tasks])) for key in ("routing", "masks", "gap")}
    return {"per_task": out, "mean": mean}


def assembled_oracle(routed: Run, statics: dict[str, Run], choices: dict[str, str], where: str
                     ) -> Run:
    """The per-cluster oracle's per-document results without evaluating it: each document's
    value under the static the oracle chose for its cluster, read from that static's own run
    over every document (the oracle routes every document as the routed run did)."""
    out = {}
    for t, docs in routed.items():
        rows = []
        for d in docs:
            c = str(d["cluster"])
            if choices.get(c) not in statics:
                raise TabpError(f"{where}: no run of static {choices.get(c)!r}, the oracle's mask "
                                f"for cluster {c}")
            s = by_doc(statics[choices[c]], t, where).get(int(d["doc_id"]))
            if s is None:
                raise TabpError(f"{where}: {t} document {d['doc_id']} is missing from static "
                                f"{choices[c]}'s run")
            rows.append({**{m: v for m, v in s.items() if m != "cluster"}, "cluster": c})
        out[t] = rows
    return out


def eval_choices(routed: Run, statics: dict[str, Run], tasks: list[str], metric: dict[str, str],
                 where: str) -> dict[str, str]:
    """The eval oracle's choice: per cluster (and "fallback") of the routed run, the static of
    highest metric on the evaluation documents the run sent to it (ties: the first in
    `statics`), read from each static's own run over every document. A document of task t weighs
    1 / (t's document count), its weight in the report's mean over tasks: every document sits in
    one cluster, so that mean is a sum of per-cluster terms and these choices maximise it over
    every per-cluster assignment of the statics. Weighing tasks equally inside a cluster would
    not: 2 stray documents of one task would outvote 200 of another."""
    score: dict[str, dict[str, float]] = {}
    for t in tasks:
        docs = by_doc(routed, t, where)
        runs = {s: by_doc(r, t, where) for s, r in statics.items()}
        for i, d in docs.items():
            total = score.setdefault(str(d["cluster"]), dict.fromkeys(statics, 0.0))
            for s, r in runs.items():
                if i not in r:
                    raise TabpError(f"{where}: {t} document {i} is missing from static {s}'s run")
                total[s] += float(r[i][metric[t]]) / len(docs)
    names = list(statics)
    return {c: max(names, key=lambda s: (total[s], -names.index(s)))
            for c, total in sorted(score.items())}


def eval_oracle(runs: list[Run], statics: dict[str, Run], tasks: list[str],
                metric: dict[str, str], where: str) -> tuple[list[dict[str, str]], list[Run]]:
    """Per fit seed, the eval oracle's choices and its per-document results (assembled from the
    statics' runs: nothing is evaluated). Chosen on the documents it is scored on, it is not a
    selector one could serve but the ceiling of every per-cluster choice among `statics` with
    these clusters, on the mean over tasks (not per task)."""
    choices = [eval_choices(r, statics, tasks, metric, where) for r in runs]
    return choices, [assembled_oracle({t: r[t] for t in tasks}, statics, c, where)
                     for r, c in zip(runs, choices)]


def mean_gap(splits: list[dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    """The gap split averaged over fit seeds."""
    keys = ("routing", "masks", "gap")
    return {"seeds": len(splits),
            "per_task": {t: {**{k: float(np.mean([s["per_task"][t][k] for s in splits]))
                                for k in keys},
                             "misrouted": float(np.mean([s["per_task"][t]["misrouted"] for s in splits])),
                             "documents": splits[0]["per_task"][t]["documents"]} for t in tasks},
            "mean": {k: float(np.mean([s["mean"][k] for s in splits])) for k in keys}}


def task_means(runs: list[Run], tasks: list[str], metric: dict[str, str], where: str
               ) -> dict[str, float]:
    """Per task the metric's mean over documents and runs (seeds), and "mean" over tasks."""
    out = {t: float(values(runs, t, metric[t], where)[1].mean()) for t in tasks}
    out["mean"] = float(np.mean([out[t] for t in tasks]))
    return out


def best_static(statics: dict[str, dict[str, Any]], flops: float) -> str | None:
    """The static of highest mean accuracy over tasks among those removing at most `flops` of
    the FLOPs (+ FLOPS_TIE): none is cheaper to serve than the routed configuration it faces.
    `statics`: name -> {"accuracy": task_means(...), "removed_flops": share}."""
    ok = [s for s, rec in statics.items() if rec["removed_flops"] <= flops + FLOPS_TIE]
    return max(ok, key=lambda s: (statics[s]["accuracy"]["mean"], s), default=None)


def routing_summary(groups: list[dict[str, Any]], statics: dict[str, dict[str, Any]],
                    tasks: list[str], metric: dict[str, str], resamples: int = BOOTSTRAP
                    ) -> list[dict[str, Any]]:
    """One record per routed configuration (family, k, N over its fit seeds).

    `groups`: {"name", "k", "n", "runs": [Run per seed], "removed_flops": [share per seed],
    "oracle": [Run per seed] or absent, "choices": [per seed], "home": [per seed],
    "candidates": the statics the oracles choose among (default: every static of the k)};
    `statics`: name -> {"k", "run": Run, "removed_flops": share}."""
    out = []
    for g in groups:
        where = f"{g['name']} k={g['k']} N={g['n']}"
        rec: dict[str, Any] = {"name": g["name"], "k": g["k"], "n": g["n"], "seeds": len(g["runs"]),
                               "accuracy": task_means(g["runs"], tasks, metric, where),
                               "removed_flops": float(np.mean(g["removed_flops"]))}
        here = {s: {"accuracy": task_means([v["run"]], tasks, metric, s),
                    "removed_flops": v["removed_flops"]}
                for s, v in statics.items() if v["k"] == g["k"]}
        best = best_static(here, rec["removed_flops"])
        if best is not None:
            rec["best_static"] = {"name": best, **here[best],
                                  "vs": compare(g["runs"], [statics[best]["run"]], tasks, metric,
                                                where, resamples)}
        cands = g.get("candidates", list(here))
        if cands:
            choices, ev = eval_oracle(g["runs"], {s: statics[s]["run"] for s in cands}, tasks,
                                      metric, where + " eval oracle")
            rec["eval_oracle"] = {"name": "eval-oracle-" + g["name"], "choices": choices,
                                  "accuracy": task_means(ev, tasks, metric, where),
                                  "vs": compare(g["runs"], ev, tasks, metric, where, resamples)}
        oracle = g.get("oracle") or []
        if oracle:
            if len(oracle) != len(g["runs"]):
                raise TabpError(f"{where}: {len(oracle)} oracle runs for {len(g['runs'])} fit seeds")
            rec["oracle"] = {"accuracy": task_means(oracle, tasks, metric, where + " oracle"),
                             "vs": compare(g["runs"], oracle, tasks, metric, where, resamples)}
            if cands:  # what choosing on calibration KL costs against the ceiling
                rec["oracle"]["vs_eval"] = compare(oracle, ev, tasks, metric, where, resamples)
            runs_of = {s: v["run"] for s, v in statics.items()}
            rec["gap"] = mean_gap([gap_split(r, o, runs_of, c, h, tasks, metric, where)
                                   for r, o, c, h in zip(g["runs"], oracle, g["choices"], g["home"])],
                                  tasks)
        out.append(rec)
    return out


def home_clusters(sizes: list[dict[str, int]]) -> dict[str, str]:
    """Each calibration task's cluster: the one holding most of its inputs (ties: the lower)."""
    tasks = sorted({t for s in sizes for t, n in s.items() if n})
    return {t: str(max(range(len(sizes)), key=lambda c: (sizes[c].get(t, 0), -c))) for t in tasks}


def interval_text(res: dict[str, Any]) -> str:
    lo, hi = res["interval"]
    return f"{res['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def summary_markdown(summary: list[dict[str, Any]], tasks: list[str], names: dict[str, str],
                     over: str = "", full: bool = True) -> list[str]:
    """The report's sections for the summary: routed vs best static and vs oracle, and the gap
    split (`names`: a task's display name; `over`: what the heading adds about the tasks; `full`
    False: the first table alone)."""
    cols = [names.get(t, t) for t in tasks]
    lines = ["## Routed vs the best static mask of equal average removed FLOPs, and vs the "
             f"per-cluster KL oracle{over}", "",
             "Routed minus comparator, mean over fit seeds, [95 % interval resampling documents "
             "and fit seeds together]; the best static is the one of highest mean over tasks "
             "among those removing at most the routed configuration's average FLOPs share.", "",
             "| config | k | N | seeds | FLOPs removed | accuracy (mean) | best static | "
             "vs best static: mean | " + " | ".join(cols) + " | vs KL oracle: mean |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(cols) + "---|"]
    for r in summary:
        bs = r.get("best_static")
        vs = bs["vs"] if bs else None
        lines.append(f"| {r['name']} | {r['k']} | {r['n']} | {r['seeds']} | {r['removed_flops']:.4f} | "
                     f"{r['accuracy']['mean']:.3f} | {bs['name'] if bs else '-'} | "
                     f"{interval_text(vs['mean']) if vs else '-'} | "
                     + " | ".join(interval_text(vs["per_task"][t]) if vs else "-" for t in tasks)
                     + f" | {interval_text(r['oracle']['vs']['mean']) if 'oracle' in r else '-'} |")
    if not full:
        return lines
    lines += oracles_markdown(summary, tasks, cols)
    gaps = [r for r in summary if "gap" in r]
    if gaps:
        lines += ["", "## Gap to the oracle: routing vs masks", "",
                  "Oracle (each document sent to its task's cluster, served by the static mask best "
                  "on that cluster's calibration inputs) minus routed = routing (documents sent to a "
                  "cluster whose oracle mask is not their task's: that mask against their task's) "
                  "+ masks (the same routing: each cluster's learned mask against the oracle's "
                  "static). Mean over fit seeds; misrouted: documents per task.", "",
                  "| config | k | N | gap | routing | masks | "
                  + " | ".join(f"{c} routing / masks (misrouted)" for c in cols) + " |",
                  "|---|---|---|---|---|---|" + "---|" * len(cols)]
        for r in gaps:
            g = r["gap"]
            lines.append(f"| {r['name']} | {r['k']} | {r['n']} | {g['mean']['gap']:+.3f} | "
                         f"{g['mean']['routing']:+.3f} | {g['mean']['masks']:+.3f} | "
                         + " | ".join(f"{g['per_task'][t]['routing']:+.3f} / "
                                      f"{g['per_task'][t]['masks']:+.3f} "
                                      f"({g['per_task'][t]['misrouted']:.0f}/{g['per_task'][t]['documents']})"
                                      for t in tasks) + " |")
    return lines


def oracles_markdown(summary: list[dict[str, Any]], tasks: list[str], cols: list[str]) -> list[str]:
    """Per configuration three rows: routed, its KL oracle (`cluster-oracle-`) and its eval
    oracle, each with its accuracy and its difference to the eval oracle."""
    recs = [r for r in summary if "eval_oracle" in r]
    if not recs:
        return []
    lines = ["", "## Routed vs its two per-cluster oracles", "",
             "cluster-oracle: each cluster served by the static of lowest KL to dense on its "
             "calibration inputs (a selector one could serve); eval-oracle: each cluster served by "
             "the static best on the evaluation documents routed to it (chosen on the documents it "
             "is scored on: the ceiling of any per-cluster choice among the same statics with these "
             "clusters, on the mean over tasks). Accuracy: mean over fit seeds; minus eval oracle: "
             "[95 % interval resampling documents and fit seeds, its choices held fixed]. "
             "Routed minus eval oracle = (routed minus cluster-oracle) + (cluster-oracle minus "
             "eval oracle: what choosing on calibration KL loses).", "",
             "| row | k | N | seeds | " + " | ".join(cols) + " | mean | minus eval oracle: mean | "
             + " | ".join(cols) + " |",
             "|---|---|---|---|" + "---|" * (2 * len(cols) + 2)]
    for r in recs:
        ev = r["eval_oracle"]
        for name, acc, vs in ((r["name"], r["accuracy"], ev["vs"]),
                              *([("cluster-oracle-" + r["name"], r["oracle"]["accuracy"],
                                  r["oracle"].get("vs_eval"))] if "oracle" in r else []),
                              (ev["name"], ev["accuracy"], None)):
            lines.append(f"| {name} | {r['k']} | {r['n']} | {r['seeds']} | "
                         + " | ".join(f"{acc[t]:.3f}" for t in tasks) + f" | {acc['mean']:.3f} | "
                         + (" | ".join([interval_text(vs["mean"])]
                                       + [interval_text(vs["per_task"][t]) for t in tasks])
                            if vs else " | ".join(["-"] * (len(tasks) + 1))) + " |")
    return lines
