"""Input-guided routing on the demo model: accuracy against static masks, the routed name under
load, and the time a fit takes. Every configuration is made and measured with the product's own
commands (`route fit`, `score`, `eval`, `serve`, `bench`).

    python bench/routing.py report [--clusters 1,2,4,8] [--ks 4,8] [--limit 100] [--report-only]
    python bench/routing.py oracle --router R.json --static NAME=MASK_OR_N1_ROUTER ... -o OUT.json
    python bench/routing.py load --router R.json --static MASK.json [--levels 16] [--duration 120]
    python bench/routing.py load-share [--out DIR]   # the routing share of an existing load run
    python bench/routing.py fit-time [--clusters 4] [--k 4]
    python bench/routing.py l0-study [--only SETTING] [--summary-only]
    python bench/routing.py sublayer-serve --router R.json [--limit 20]

`report`: accuracy per task against the number of clusters N, for each k.
- `route fit` on one mixed calibration set (train splits of the `--calib` tasks), for N in
  `--clusters`, with `--mask-method l0` (IG-Pruning) and `--mask-method tabp` (per-cluster TaBP);
- a *static* mask of each existing method = the same fit with N = 1 (one mask from the whole mixed
  set), so static and routed masks see the same data (`--statics-from DIR`: dense and the statics
  copied from an earlier report of the same documents, e.g. to refit only the routed masks on
  more calibration inputs; the header then names DIR and its calibration size);
- the *oracle*: per task, a static TaBP mask scored on that task's own calibration data (it knows
  the task of every request; `score --task T --method tabp`);
- the *per-cluster oracle* of every routed configuration (`cluster-oracle-<config>`): its router
  with each cluster's (and the fallback's) mask replaced by the static mask of lowest KL to dense on
  that cluster's calibration inputs (`oracle`, routing/oracle.py); `--no-cluster-oracle` skips it;
- dense.
Each is evaluated with `eval --router` (one lm-eval run per distinct mask on the documents routed
to it; the oracle and dense with `eval --task-mask` / `eval`) on the first `--limit` documents
of each `--eval` task's evaluation split as lm-eval picks it (ARC-Easy: test, as lm-eval's
arc_easy; PIQA and BoolQ: the held-out half of dev, never used for calibration). Resumable (every
fit and evaluation is kept in OUT). Results: OUT/routing.{json,md}, OUT/accuracy_vs_clusters.png;
with per-document results (`eval --router`'s `per_document`), routing.md also has every routed
configuration over its fit seeds against the best static mask of equal average removed FLOPs and
against its per-cluster oracle (hierarchical intervals), and the gap to the oracle split into
routing and mask quality (routing/report.py); beside the oracle, its ceiling, the *eval oracle*
(`eval-oracle-<config>`: per cluster the static best on the evaluation documents routed there, read
from the statics' runs, never evaluated).

`oracle`: the per-cluster oracle router of a fitted router (loads the model: heavy).

`load`: one `tabp-vllm serve --no-dense --router R --task-mask S` (S removes as many blocks as the
router's k), then `tabp-vllm bench` sends the same mixed prompts (both kinds the router splits)
to `llama-auto` and to the static variant, interleaved, at the given concurrencies. The routing
latency comes from the server's own histogram (`ray_tabp_routing_latency_seconds`), read before
and after the run, quantiles interpolated inside buckets as Prometheus' `histogram_quantile` does.
Targets (recorded, not asserted): routed / static output throughput >= 0.95 at concurrency 16;
routing p50 <= 10 ms. Results: OUT/routed_load.json, the bench's OUT/routed_vs_static.*.

`fit-time`: runs `route fit` with its defaults, reads the wall time and the passes the router
records, and writes them with the CPU and the load average before and after (a busy machine
inflates the time: say so rather than hide it).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tabp_vllm.hardware import cpu_info
from tabp_vllm.process import free_port

RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------- report

CLI = [sys.executable, "-m", "tabp_vllm"]
EVAL_OF = {"arc_easy": "tabp_arc_easy", "piqa": "tabp_piqa", "boolq": "tabp_boolq"}


# The report's L0 sublayer rows at "k" take a FLOPs budget, k whole blocks' share of the dense
# FLOPs (`route fit --flops-ratio`): a unit count is not a FLOPs budget (the gates take cheap
# attention sublayers first: 2k units removed 0.066 of the decode FLOPs where 4 blocks remove
# 0.107; l0_study/). A hair under the blocks' share (comparison.FLOPS_TIE), so that the k-block
# static masks meet the same budget.
def sublayer_budget(k: int, model: str = "llama") -> list[str]:
    from tabp_vllm.comparison import FLOPS_TIE, k_flops_ratio
    from tabp_vllm.models import load_model_config, resolve_model

    ratio = k_flops_ratio(load_model_config(resolve_model(model)), k) - FLOPS_TIE
    return ["--flops-ratio", repr(ratio)]


def config_of(method: str, loss: str = "kl", units: str = "blocks", seed: int = 0,
              polish: str = "none", positions: int | None = None) -> str:
    """The row's name: the committed report's for the defaults, suffixed otherwise ("l0" is the
    gates' own masks, "l0-swap" the same fit polished by `route fit --polish swap`, "l0-lm-p128"
    an LM-loss fit over the last 128 positions instead of route fit's 32)."""
    if method not in ("l0", "tabp"):
        return f"static-{method}" + ("-sub" if units == "sublayers" else "")
    return (method + (f"-{loss}" if loss != "kl" else "")
            + (f"-p{positions}" if method == "l0" and positions else "")
            + ("-sub" if units == "sublayers" else "")
            + ("-swap" if method == "l0" and polish == "swap" else "")
            + (f"-s{seed}" if seed else ""))


ORACLE = "cluster-oracle-"  # the per-cluster oracle of routed config C is row ORACLE + C


def family_and_seed(config: str) -> tuple[str, int]:
    """("l0-lm", 2) of "l0-lm-s2": a configuration over fit seeds (seed 0 has no suffix)."""
    m = re.fullmatch(r"(.*)-s(\d+)", config)
    return (m[1], int(m[2])) if m else (config, 0)


def units_of(config: str) -> str:
    """What a row's masks remove: "sublayers" for the `-sub` configurations."""
    return "sublayers" if "sub" in family_and_seed(config)[0].split("-") else "blocks"


def oracle_statics(config: str, statics: list[str]) -> list[str]:
    """The statics (of its k) a routed row's oracles choose among: the block statics, and for a
    sublayer row (a FLOPs budget, which k blocks meet) the sublayer statics too; a sublayer mask
    misses a block row's k-block budget."""
    return [s for s in statics if units_of(s) == "blocks" or units_of(config) == "sublayers"]


def router_path(out: Path, config: str, k: int, n: int) -> Path:
    return out / "routers" / f"{config.removeprefix('static-')}-k{k}-n{n}.json"


def eval_path(out: Path, config: str, k: int, n: int | None) -> Path:
    return out / f"eval-{config}-k{k}-n{n}.json"


def run(cmd: list[str], log: Path) -> float:
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.time() - t0


def one_line_errors(command):
    """Bad input (runs of other documents, a router that does not fit) is one line and exit 2, as
    the CLI's TabpError, not a traceback."""
    @functools.wraps(command)
    def run_command(argv: list[str]) -> None:
        from tabp_vllm.errors import TabpError

        try:
            command(argv)
        except TabpError as exc:
            sys.exit(print(f"error: {exc}", file=sys.stderr) or 2)
    return run_command


@one_line_errors
def report(argv: list[str]) -> None:
    """Accuracy per task against the number of clusters N (OUT/routing.{json,md,png})."""
    ap = argparse.ArgumentParser(prog="routing.py report", description=report.__doc__)
    ap.add_argument("--model", default="llama",
                    help="alias (llama, qwen0.5b, qwen1.5b) or path; one model per OUT")
    ap.add_argument("--calib", default="arc_easy,piqa,boolq,gsm8k")
    ap.add_argument("--eval", default="arc_easy,piqa,boolq")
    ap.add_argument("--clusters", default="1,2,4,8")
    ap.add_argument("--ks", default="4,8")
    ap.add_argument("--static-methods", default="block_influence,angular,sleb,ppl,random")
    ap.add_argument("--samples", type=int, default=32, help="calibration inputs per task")
    ap.add_argument("--steps", type=int, default=None,
                    help="L0 step cap per cluster (default: route fit's; the committed report: 24)")
    ap.add_argument("--losses", default="kl", help="L0 losses to fit: kl, lm, answer, or a list")
    ap.add_argument("--units", default="blocks", help="L0 units: blocks, sublayers or both "
                    "(sublayers: a FLOPs budget, k blocks' share of the FLOPs)")
    ap.add_argument("--polishes", default="swap",
                    help="L0 masks: none (the gates' own), swap (polished: `route fit --polish "
                         "swap`, or `route polish` of the unpolished row's router when it exists) "
                         "or none,swap")
    ap.add_argument("--positions", type=int, default=None,
                    help="L0: the last positions the loss covers (route fit --kl-positions; "
                         "default its 32); rows named -pP")
    ap.add_argument("--seeds", default="0", help="fit seeds (route fit --seed), e.g. 0,1,2")
    ap.add_argument("--limit", type=int, default=100,
                    help="evaluation documents per task (0: the whole evaluation split)")
    ap.add_argument("--out", type=Path, default=RESULTS / "routing")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite routing.md and the plot from OUT/routing.json, running nothing")
    ap.add_argument("--no-cluster-oracle", action="store_true",
                    help="skip the per-cluster oracle of each routed configuration")
    ap.add_argument("--oracle-from-statics", action="store_true",
                    help="build each oracle router but take its per-document results from the "
                         "static masks' own runs instead of evaluating it (half the evaluation)")
    ap.add_argument("--statics-from", type=Path, default=None, metavar="DIR",
                    help="take dense and the static masks (routers, evaluations, rows) from the "
                         "report in DIR instead of fitting them (same --eval and --limit; its "
                         "calibration size is its own: the report says so)")
    a = ap.parse_args(argv)
    if a.report_only:
        write_report(json.loads((a.out / "routing.json").read_text()), a.out)
        return
    out, log = a.out, a.out / "run.log"
    out.mkdir(parents=True, exist_ok=True)
    (out / "routers").mkdir(exist_ok=True)
    calib = [t for t in a.calib.split(",") if t]
    evals = [t for t in a.eval.split(",") if t]
    lm_tasks = ",".join(EVAL_OF[t] for t in evals)
    limit_args = ["--limit", str(a.limit)] if a.limit else []  # 0: whole splits
    doc_path = out / "routing.json"
    doc = json.loads(doc_path.read_text()) if doc_path.exists() else {"rows": []}
    if doc["rows"] and doc.get("model", "llama") != a.model:  # (older reports: the demo model)
        from tabp_vllm.errors import TabpError

        raise TabpError(f"{doc_path}: rows of model {doc.get('model', 'llama')!r}, not "
                        f"{a.model!r}: give another --out")
    done = {(r["config"], r["k"], r["n"]) for r in doc["rows"]}
    doc.update(model=a.model, calib=calib, eval=evals, samples=a.samples, steps=a.steps,
               limit=a.limit, host=cpu_info(), command=sys.argv)
    if a.statics_from:
        doc["statics_from"] = reuse_statics(a.statics_from, out, doc, done, evals, a.limit)

    def save() -> None:
        doc_path.write_text(json.dumps(doc, indent=2) + "\n")

    def evaluate(config: str, k: int, n: int | None, args: list[str], fit_s: float | None,
                 extra: dict | None = None) -> None:
        res_path = eval_path(out, config, k, n)
        wall = None  # an earlier run's result is kept (the run was interrupted after it)
        if not res_path.exists():
            wall = run(CLI + ["eval", "--model", a.model, "--task", lm_tasks, *limit_args,
                              "-o", str(res_path)] + args, log)
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
        family, seed = family_and_seed(config)
        doc["rows"].append({"config": config, "family": family, "seed": seed, "k": k, "n": n,
                            "accuracy": acc, "fit_s": fit_s, "eval_s": wall, "cluster_mix": mix,
                            **(extra or {})})
        done.add((config, k, n))
        save()

    if ("dense", 0, None) not in done:
        evaluate("dense", 0, None, [], None)
    def routed_or_static(method: str, k: int, n: int, loss: str = "kl", units: str = "blocks",
                         seed: int = 0, polish: str = "none") -> None:
        pos = a.positions if method == "l0" else None
        config = config_of(method, loss, units, seed, polish, pos)
        router = router_path(out, config, k, n)
        gates_only = router_path(out, config_of(method, loss, units, seed, positions=pos), k, n)
        if not router.exists() and polish == "swap" and gates_only.exists():
            # the same fit's gates are here already: polish them instead of fitting them again
            run(CLI + ["route", "polish", str(gates_only), "-o", str(router)], log)
        elif not router.exists():  # else an interrupted run's fit is kept
            extra = (["--loss", loss, "--units", units, "--seed", str(seed), "--polish", polish,
                      *(["--kl-positions", str(pos)] if pos else [])]
                     if method == "l0" else ["--units", units, "--seed", str(seed)])
            run(CLI + ["route", "fit", "--model", a.model, *sum((["--task", t] for t in calib), []),
                       "--samples", str(a.samples),
                       *(sublayer_budget(k, a.model) if units == "sublayers" else ["--k", str(k)]),
                       *(["--steps", str(a.steps)] if a.steps else []),
                       "--clusters", str(n), "--mask-method", method, *extra, "-o", str(router)], log)
        r = json.loads(router.read_text())
        p = r["provenance"]
        # the fit as the router records it (model load excluded), with `route polish`'s search
        polish_s = (p.get("polish") or {}).get("wall_s")
        fit_s = p["wall_s"] + (polish_s or 0)
        evaluate(config, k, n, ["--no-dense", "--router", str(router)], fit_s,
                 {"distinct_masks": len({json.dumps([c["mask"].get(key) for key in (
                     "removed_layers", "removed_attention", "removed_mlp")]) for c in r["clusters"]}),
                  "passes": {key: p.get(key) for key in ("forward_passes", "backward_passes")},
                  **({"polish_s": polish_s, "polish_forward_passes": p["polish"]["forward_passes"]}
                     if polish_s is not None else {})})
        if method in ("l0", "tabp"):
            cluster_oracle(config, k, n)

    def cluster_oracle(config: str, k: int, n: int) -> None:
        """The routed configuration's per-cluster oracle: built from its router and the static
        masks of its k (`oracle`), then evaluated like it."""
        name = ORACLE + config
        cands = oracle_statics(config, [config_of(m, units=u) for m in statics for u in static_units])
        if a.no_cluster_oracle or (name, k, n) in done or not cands or not all(
                (c, k, 1) in done for c in cands):  # (its statics evaluated first)
            return
        router = router_path(out, name, k, n)
        if not router.exists():
            run([sys.executable, __file__, "oracle", "--router", str(router_path(out, config, k, n)),
                 *sum((["--static", f"{c}={router_path(out, c, k, 1)}"] for c in cands), []),
                 "-o", str(router)], log)
        r = json.loads(router.read_text())
        res_path = eval_path(out, name, k, n)
        if a.oracle_from_statics and not res_path.exists():
            assemble_oracle_eval(out, config, k, n, r["provenance"]["choices"], res_path)
        evaluate(name, k, n, ["--no-dense", "--router", str(router)], r["provenance"]["wall_s"],
                 {"choices": r["provenance"]["choices"],
                  "from_statics": bool(json.loads(res_path.read_text())["routed"].get(
                      "from_statics")) if res_path.exists() else False})

    def task_oracle(t: str, k: int) -> None:
        """Each task's own TaBP mask, evaluated on that task only."""
        mask = out / "routers" / f"oracle-{t}-k{k}.json"
        if not mask.exists():
            run(CLI + ["score", "--model", a.model, "--task", t, "--method", "tabp",
                       "--k", str(k), "--samples", str(a.samples * len(calib)),
                       "-o", str(mask)], log)
        fit_s = json.loads(mask.read_text())["calibration"]["wall_s"]
        res_path = out / f"eval-oracle-{t}-k{k}.json"
        wall = run(CLI + ["eval", "--model", a.model, "--task", EVAL_OF[t], *limit_args,
                          "--no-dense", "--task-mask", str(mask), "-o", str(res_path)], log)
        r = json.loads(res_path.read_text())["results"][0]
        m = r["results"][EVAL_OF[t]]
        doc["rows"].append({"config": f"oracle-{t}", "k": k, "n": None, "fit_s": fit_s, "eval_s": wall,
                            "accuracy": {t: {"acc": m["acc,none"],
                                             "acc_norm": m.get("acc_norm,none", m["acc,none"]),
                                             "n": r["n-samples"][EVAL_OF[t]]["effective"]}}})
        save()

    # The comparators first (per k the static masks: every routed row's per-cluster oracle is
    # built from them), then the learned gates, the report's subject, then TaBP per cluster and
    # the per-task oracle; the largest N (most engines to evaluate) of every k after the smaller
    # ones. A run cut short by time has the rows that answer the report's question first.
    ks, ns = [int(x) for x in a.ks.split(",")], sorted(int(x) for x in a.clusters.split(","))
    statics = [m for m in a.static_methods.split(",") if m]
    # static masks of each method in whole blocks, and with sublayer rows also in sublayers at
    # their FLOPs budget (`route fit --clusters 1 --units sublayers --mask-method M`)
    static_units = ["blocks"] + (["sublayers"] if "sublayers" in a.units.split(",") else [])
    jobs = [(m, k, 1) for k in ks for m in statics]
    for method in ("l0", "tabp"):
        jobs += [(method, k, n) for k in ks for n in ns[:-1]]
        jobs += [(method, k, ns[-1]) for k in ks]
    jobs += [("oracle", k, t) for k in ks for t in evals]
    variants = [(loss, units, int(seed), polish) for seed in a.seeds.split(",")
                for loss in a.losses.split(",") for units in a.units.split(",")
                for polish in a.polishes.split(",")]
    for method, k, n in jobs:
        if method == "oracle":
            if (f"oracle-{n}", k, None) not in done:
                task_oracle(n, k)
            continue
        for loss, units, seed, polish in (variants if method == "l0" else
                                          [("kl", u, int(s), "none") for s in a.seeds.split(",")
                                           for u in (static_units if method in statics else ["blocks"])]):
            if (config_of(method, loss, units, seed, polish,
                          a.positions if method == "l0" else None), k, n) not in done:
                routed_or_static(method, k, n, loss, units, seed, polish)
    for r in list(doc["rows"]):  # routed rows fitted before their k's static masks existed
        if r["config"].startswith(("l0", "tabp")):
            cluster_oracle(r["config"], r["k"], r["n"])
    write_report(doc, out)


def reuse_statics(src: Path, out: Path, doc: dict, done: set, evals: list[str], limit: int) -> dict:
    """Copy dense and the static rows of the report in `src` (their routers and evaluation files)
    into this one, e.g. to refit only the routed masks on a larger calibration set; the statics'
    own calibration size goes with them (`statics_from`, named in the report's header)."""
    import shutil

    from tabp_vllm.errors import TabpError

    path = src / "routing.json"
    if not path.exists():
        raise TabpError(f"--statics-from {src}: no routing.json there")
    old = json.loads(path.read_text())
    if old.get("eval") != evals or old.get("limit") != limit:
        raise TabpError(f"--statics-from {src}: its evaluation ({old.get('eval')}, limit "
                        f"{old.get('limit')}) is not this run's ({evals}, limit {limit})")
    for r in old["rows"]:
        key = (r["config"], r["k"], r["n"])
        if not (r["config"] == "dense" or r["config"].startswith("static-")) or key in done:
            continue
        for path_of in [eval_path] + ([router_path] if r["n"] else []):  # (dense has no router)
            shutil.copy2(path_of(src, *key), path_of(out, *key))
        doc["rows"].append({**r, "reused_from": src.name})
        done.add(key)
    return {"dir": src.name, "samples": old["samples"]}


def assemble_oracle_eval(out: Path, config: str, k: int, n: int, choices: dict[str, str],
                         res_path: Path) -> None:
    """The oracle's evaluation file, assembled from the routed row's clusters and the static
    rows' per-document results (routing/report.py: assembled_oracle), in `eval --router`'s form."""
    from collections import Counter

    from tabp_vllm.errors import TabpError
    from tabp_vllm.routing.evaluate import pooled_metrics
    from tabp_vllm.routing.report import assembled_oracle

    routed = per_document(out, {"config": config, "k": k, "n": n})
    statics = {s: per_document(out, {"config": s, "k": k, "n": 1}) for s in set(choices.values())}
    missing = [s for s, run in statics.items() if run is None] + ([config] if routed is None else [])
    if missing:
        raise TabpError(f"{ORACLE + config}: no per-document results of {', '.join(missing)}")
    run = assembled_oracle(routed, statics, choices, ORACLE + config)
    res_path.write_text(json.dumps({"routed": {
        "from_statics": True, "per_document": run,
        "results": {t: pooled_metrics([{m: v for m, v in d.items() if m not in ("doc_id", "cluster")}
                                       for d in docs]) for t, docs in run.items()},
        "cluster_mix": {t: dict(sorted(Counter(d["cluster"] for d in docs).items()))
                        for t, docs in run.items()}}}, indent=1) + "\n")


@functools.lru_cache(maxsize=None)
def decoder_shape(model_id: str):
    from tabp_vllm.flops import DecoderShape
    from tabp_vllm.models import load_model_config, resolve_model

    return DecoderShape.from_config(load_model_config(resolve_model(model_id)))


def mask_flops(mask: dict) -> float:
    """The share of a dense decode step's FLOPs a mask document removes."""
    from tabp_vllm.flops import removed_flops_fraction
    from tabp_vllm.sublayers import mask_units

    return removed_flops_fraction(decoder_shape(mask["model"]["id"]), mask_units(*(
        mask.get(key, []) for key in ("removed_layers", "removed_attention", "removed_mlp"))))


def per_document(out: Path, row: dict) -> dict | None:
    """A row's per-document results (`eval --router`'s), None where its file predates them."""
    path = eval_path(out, row["config"], row["k"], row["n"])
    routed = json.loads(path.read_text()).get("routed") if path.exists() else None
    return routed.get("per_document") if routed else None


def collect(doc: dict, out: Path, flops_of=mask_flops) -> tuple[list[dict], dict[str, dict]]:
    """routing/report.py's inputs from the cached rows, their evaluations and routers: the routed
    configurations over their fit seeds (with their per-cluster oracles where every seed has one)
    and the static masks. Rows without per-document results are left out."""
    from tabp_vllm.routing.report import home_clusters

    tasks = [EVAL_OF[t] for t in doc["eval"]]
    runs = {(r["config"], r["k"], r["n"]): per_document(out, r) for r in doc["rows"]
            if r["config"] != "dense" and not r["config"].startswith("oracle-")}

    def avg_flops(r: dict, run: dict) -> float:
        """The documents' mean removed FLOPs share, each under the mask it was routed to."""
        router = json.loads(router_path(out, r["config"], r["k"], r["n"]).read_text())
        masks = {str(c): cl["mask"] for c, cl in enumerate(router["clusters"])}
        if router.get("fallback"):
            masks["fallback"] = router["fallback"]["mask"]
        share = {c: flops_of(m) for c, m in masks.items()}
        return sum(share[str(d["cluster"])] for t in tasks for d in run[t]) / sum(
            len(run[t]) for t in tasks)

    statics, groups = {}, {}
    for r in doc["rows"]:
        run = runs.get((r["config"], r["k"], r["n"]))
        if run is None:
            continue
        if r["config"].startswith("static-"):
            statics[r["config"]] = {"k": r["k"], "run": run, "removed_flops": avg_flops(r, run)}
        elif r["config"].startswith(("l0", "tabp")):
            family, seed = family_and_seed(r["config"])
            g = groups.setdefault((family, r["k"], r["n"]), {"name": family, "k": r["k"],
                                                             "n": r["n"], "seeds": {}})
            sizes = json.loads(router_path(out, r["config"], r["k"], r["n"]).read_text())["clusters"]
            home = home_clusters([c["sizes"] for c in sizes])
            g["seeds"][seed] = {"run": run, "removed_flops": avg_flops(r, run),
                                "home": {EVAL_OF[t]: c for t, c in home.items() if t in EVAL_OF},
                                "oracle": runs.get((ORACLE + r["config"], r["k"], r["n"])),
                                "choices": next((o.get("choices") for o in doc["rows"] if (
                                    o["config"], o["k"], o["n"]) == (ORACLE + r["config"], r["k"],
                                                                     r["n"])), None)}
    out_groups = []
    for g in groups.values():
        seeds = [g["seeds"][s] for s in sorted(g["seeds"])]
        with_oracle = all(s["oracle"] is not None and s["choices"] for s in seeds)
        out_groups.append({"name": g["name"], "k": g["k"], "n": g["n"],
                           "fit_seeds": sorted(g["seeds"]),
                           "candidates": oracle_statics(g["name"], [
                               s for s, v in statics.items() if v["k"] == g["k"]]),
                           "runs": [s["run"] for s in seeds],
                           "removed_flops": [s["removed_flops"] for s in seeds],
                           **({"oracle": [s["oracle"] for s in seeds],
                               "choices": [s["choices"] for s in seeds],
                               "home": [s["home"] for s in seeds]} if with_oracle else {})})
    return out_groups, statics


def seed_sections(doc: dict, out: Path, flops_of=mask_flops) -> list[str]:
    """routing.md's sections over fit seeds with hierarchical intervals (routing/report.py), and
    OUT/routing_summary.json with their numbers; a line saying why when there is nothing to show."""
    from tabp_vllm.comparison import METRIC
    from tabp_vllm.routing.report import routing_summary, summary_markdown

    groups, statics = collect(doc, out, flops_of)
    if not groups or not statics:
        return ["(No routed configuration and static mask with per-document results: the "
                "intervals over fit seeds need `eval --router`'s per_document, written since "
                "issue 34's report v2 machinery.)"]
    tasks = [EVAL_OF[t] for t in doc["eval"]]
    summary = routing_summary(groups, statics, tasks, {EVAL_OF[t]: METRIC[t] for t in doc["eval"]})
    for rec, g in zip(summary, groups):
        rec["fit_seeds"] = g["fit_seeds"]
    names = {EVAL_OF[t]: t for t in doc["eval"]}
    record = {"tasks": tasks, "metric": {EVAL_OF[t]: METRIC[t] for t in doc["eval"]},
              "configurations": summary}
    lines = summary_markdown(summary, tasks, names)
    rest = [t for t in tasks if t != EVAL_OF[PRIOR_TASK]]
    if len(rest) < len(tasks) and rest:
        # BoolQ's accuracy here is the masks' yes/no prior (prior_section): the same comparison
        # without it, every static again a candidate for best
        without = routing_summary(groups, statics, rest, {t: record["metric"][t] for t in rest})
        record["without_" + PRIOR_TASK] = {"tasks": rest, "configurations": without}
        lines += ["", *summary_markdown(without, rest, names, f", without {PRIOR_TASK}", full=False)]
    (out / "routing_summary.json").write_text(json.dumps(record, indent=1) + "\n")
    return lines


PRIOR_TASK = "boolq"  # a yes/no task: a mask can move its answers' prior wholesale


def prior_section(doc: dict, out: Path) -> list[str]:
    """BoolQ's accuracy against the share of "yes" among each row's answers (a two-choice task: an
    answer is the gold when scored right, the other choice when not; gold labels from dense's
    lm-eval samples), with Pearson's r across rows: where r is near 1, BoolQ ranks masks by
    the prior they leave, not by reading."""
    import ast

    import numpy as np
    from scipy.stats import pearsonr

    task = EVAL_OF.get(PRIOR_TASK)
    dense = eval_path(out, "dense", 0, None)
    if PRIOR_TASK not in doc["eval"] or not dense.exists():
        return []
    samples = json.loads(dense.read_text())["results"][0].get("samples", {}).get(task)
    if not samples:
        return []
    gold = {int(x["doc_id"]): int(x["target"]) for x in samples}
    # (lm-eval's samples hold their metrics as a dict, or its repr when saved as strings)
    right = {"dense": {int(x["doc_id"]): float((ast.literal_eval(x["metrics"]) if isinstance(
        x["metrics"], str) else x["metrics"])["acc"]) for x in samples}}
    for r in doc["rows"]:
        run = None if r["config"] == "dense" else per_document(out, r)
        if run and run.get(task):
            right[f"{r['config']}|{r['k']}|{r['n']}"] = {int(d["doc_id"]): float(d["acc"])
                                                         for d in run[task]}
    rows = []
    for name, acc in right.items():
        yes = np.mean([gold[i] if a == 1 else 1 - gold[i] for i, a in acc.items()])
        rows.append((name, float(yes), float(np.mean(list(acc.values())))))
    always = float(np.mean(list(gold.values())))
    r = pearsonr([x[1] for x in rows], [x[2] for x in rows]).statistic if len(rows) > 2 else float("nan")
    return [f"## {PRIOR_TASK}: accuracy against the masks' yes/no prior", "",
            f"Share of \"yes\" among each row's answers beside its accuracy; answering \"yes\" "
            f"to every question scores {always:.3f}. Pearson's r across these {len(rows)} rows: "
            f"**{r:.2f}**. Near 1, a mask's BoolQ accuracy says how far it moves dense's yes/no "
            f"prior, not how well the pruned model reads: the comparison without {PRIOR_TASK} is "
            f"in the section above.", "",
            "| row (config, k, N) | \"yes\" share | accuracy |", "|---|---|---|",
            *(f"| {n.replace('|', ', ')} | {y:.3f} | {a:.4f} |" for n, y, a in rows), ""]


def docs_text(limit: int | None) -> str:
    """The evaluation documents a run used: `--limit` per task, 0 (or none) the whole split."""
    return f"first {limit} documents per task" if limit else "every document"


def objective_section(doc: dict, out: Path) -> list[str]:
    """Each learned L0 mask (KL loss) against the statics on its own objective: the mean KL to
    dense on the cluster's calibration inputs (the fit's record, `provenance.clusters[].kl`)
    beside the lowest static's there (its per-cluster oracle's `costs`: the inputs the router
    sends there, i.e. the fit's up to the nearest-centroid reassignment and those past the
    fallback radius; same positions). A learned mask above the best static failed its own
    objective: the optimisation, not the objective, is what to mend."""
    lines = []
    for r in doc["rows"]:
        if not family_and_seed(r["config"])[0].startswith("l0") or not r["n"]:
            continue
        routed, oracle = (router_path(out, c, r["k"], r["n"]) for c in (r["config"], ORACLE + r["config"]))
        if not routed.exists() or not oracle.exists():
            continue
        fits = json.loads(routed.read_text()).get("provenance", {})
        groups = json.loads(oracle.read_text()).get("provenance", {}).get("costs", {}).get("groups", {})
        # (not the fallback: its fit saw every input, its oracle group only those past the radius)
        for fit in fits.get("clusters", []):
            g = groups.get(str(fit.get("cluster")), {})
            # (an LM-loss fit's objective is not this KL: left out)
            if "kl" not in fit or not g.get("kl") or fit.get("loss_kind", "kl") != "kl":
                continue
            best = min(g["kl"], key=g["kl"].get)
            lines.append(f"| {r['config']} | {r['k']} | {r['n']} | {fit['cluster']} | {fit['inputs']} | "
                         f"{fit['kl']:.3f} | {best.removeprefix('static-')} {g['kl'][best]:.3f} | "
                         f"{fit['kl'] - g['kl'][best]:+.3f} |")
    if not lines:
        return []
    return ["## The learned masks on their own objective", "",
            "Mean KL to dense on each cluster's calibration inputs (the L0 fit's objective): the "
            "learned mask's (its fit's record) and the lowest of the static masks' (the "
            "per-cluster oracle's costs, the inputs the router sends there). Learned minus best "
            "above 0: the fit ended on a mask worse than a static one on its own objective.", "",
            "| config | k | N | cluster | inputs | learned mask KL | best static KL | learned - best |",
            "|---|---|---|---|---|---|---|---|", *lines, ""]


def write_report(doc: dict, out: Path) -> None:
    import matplotlib

    from tabp_vllm.routing.options import STEPS  # route fit's step cap, when the run named none

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals, rows = doc["eval"], doc["rows"]
    ks = sorted({r["k"] for r in rows if r["k"]})
    dense = next(r for r in rows if r["config"] == "dense")
    model = doc.get("model", "llama")  # (reports before --model: the demo model)
    lines = [f"# Input-guided routing vs static masks "
             f"({'demo model' if model == 'llama' else model})", "",
             f"Calibration: {', '.join(doc['calib'])} train splits, {doc['samples']} inputs each, "
             f"mixed. Evaluation: {docs_text(doc['limit'])} of lm-eval's evaluation split "
             f"(ARC-Easy test; PIQA, BoolQ the held-out half of dev), zero-shot, "
             f"lm-eval through `tabp-vllm eval` (routed: `eval --router`). L0: trained until "
             f"converged, at most {doc['steps'] or STEPS} steps per cluster (each fit's steps "
             f"in its router). Host: {doc['host'].get('model', '?')}.", "",
             "Static masks are `route fit --clusters 1` with each method (one mask from the whole "
             "mixed set); the oracle is each task's own TaBP mask (it knows every request's task). "
             "lm-eval has no acc_norm for BoolQ: its acc_norm column is acc.", ""]
    if doc.get("statics_from"):  # (reuse_statics)
        src = doc["statics_from"]
        lines[-2] += (f" Dense and the static masks are the report {src['dir']}'s, fitted on "
                      f"{src['samples']} inputs per task (same documents evaluated): only the "
                      f"routed masks and their oracles are fitted on this run's calibration.")
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
    lines += [""] + objective_section(doc, out) + seed_sections(doc, out) + [""] + prior_section(doc, out)
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


@one_line_errors
def oracle(argv: list[str]) -> None:
    """The per-cluster oracle router of a fitted router (routing/oracle.py): every cluster and the
    fallback served by the static mask of lowest KL to dense on the calibration inputs the router
    sends it. Loads the model and runs a forward pass per input per static mask: heavy."""
    from tabp_vllm.errors import TabpError
    from tabp_vllm.mask import load_mask
    from tabp_vllm.models import resolve_model
    from tabp_vllm.routing.oracle import oracle_router, router_calibration, static_costs
    from tabp_vllm.routing.router import is_router_file, load_router, open_encoder
    from tabp_vllm.scoring.probe import load_model

    ap = argparse.ArgumentParser(prog="routing.py oracle", description=oracle.__doc__)
    ap.add_argument("--router", type=Path, required=True)
    ap.add_argument("--static", action="append", required=True, metavar="NAME=PATH",
                    help="a static mask: a mask file or an N = 1 router (its cluster's mask)")
    ap.add_argument("-o", "--output", type=Path, required=True)
    a = ap.parse_args(argv)
    router = load_router(a.router)
    path = resolve_model(router.model_id)
    statics = {}
    for spec in a.static:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise TabpError(f"--static {spec!r}: give NAME=PATH")
        if is_router_file(file):
            one = load_router(file, path)
            if one.num_clusters != 1:
                raise TabpError(f"--static {name}: {file} has {one.num_clusters} clusters, "
                                "a static mask is an N = 1 router")
            statics[name] = one.masks[0]
        else:
            statics[name] = load_mask(file, path)
    cal = router_calibration(router)
    encoder = open_encoder(router, str(a.router), model_path=path)
    model, tok = load_model(path, "cpu")
    costs = static_costs(router, statics, cal, encoder, model, tok)
    result = oracle_router(router, statics, costs)
    result.provenance["wall_s"] = costs["wall_s"]
    result.save(a.output)
    print(json.dumps({"choices": result.provenance["choices"],
                      "groups": costs["groups"], "forward_passes": costs["forward_passes"],
                      "wall_s": costs["wall_s"]}, indent=2))


# ------------------------------------------------------------------------------------- load

THROUGHPUT_TARGET, P50_TARGET_S = 0.95, 0.010
HISTOGRAM = "ray_tabp_routing_latency_seconds"


def routing_buckets(server) -> dict[float, float]:
    """Cumulative bucket counts {le: count} of the routing latency of the server's routed name."""
    from tabp_vllm.prometheus import histogram, scrape

    return histogram(scrape(server.metrics_url), HISTOGRAM, label="routed_name").get(
        server.routed_name, {})


def mixed_prompts(path: Path, max_tokens: int) -> Path:
    """The bundled demo questions (arithmetic and general), as a bench dataset."""
    from tabp_vllm.data import load_task, mcqa_context

    items = load_task("demo", "train").items + load_task("demo", "validation").items
    path.write_text("".join(json.dumps({"prompt": mcqa_context(i), "max_tokens": max_tokens}) + "\n"
                            for i in items))
    return path


def encoder_floor(router, dataset: Path, n: int = 40) -> dict:
    """The encoder's own time per routed text on an idle machine (before the server starts): what
    routing costs when it does not share the cores with the engines. One text at a time, as an
    idle server embeds them, with the torch threads the ingress gets."""
    import numpy as np
    import torch

    from tabp_vllm.serve.routed import _open_router_encoder

    encoder = _open_router_encoder(router)
    texts = [json.loads(line)["prompt"] for line in dataset.read_text().splitlines()][:n]
    encoder.encode(texts[:1])  # warm-up
    times = []
    for text in texts:
        t0 = time.perf_counter()
        router.nearest(encoder.encode([text]))
        times.append(time.perf_counter() - t0)
    return {"texts": len(times), "torch_threads": torch.get_num_threads(),
            "p50_s": float(np.percentile(times, 50)), "p99_s": float(np.percentile(times, 99))}


def load(argv: list[str]) -> None:
    """The routed name (`llama-auto`) against a static variant of the same depth, under load."""
    ap = argparse.ArgumentParser(prog="routing.py load", description=load.__doc__)
    ap.add_argument("--router", required=True, type=Path)
    ap.add_argument("--static", required=True, type=Path, help="mask of the static variant")
    ap.add_argument("--levels", default="16")
    ap.add_argument("--duration", type=float, default=120.0)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--out", type=Path, default=RESULTS / "routed")
    a = ap.parse_args(argv)

    from tabp_vllm.mask import load_mask
    from tabp_vllm.models import resolve_model
    from tabp_vllm.prometheus import histogram_quantile
    from tabp_vllm.routing.router import load_router
    from tabp_vllm.serve.launcher import ServeProcess
    from tabp_vllm.serve.options import EngineOptions, ServeOptions, VariantOptions

    model = resolve_model("llama")
    router, static = load_router(a.router, model), load_mask(a.static, model)
    fault = router.budget_fault(static)  # k units, or the router's FLOPs share
    if fault:
        print(f"error: the static {fault}: compare variants of the same budget", file=sys.stderr)
        sys.exit(2)  # bad input, as the CLI's TabpError
    a.out.mkdir(parents=True, exist_ok=True)
    static_name = f"llama-{static.task}"
    dataset = mixed_prompts(a.out / "mixed_prompts.jsonl", a.output_len)
    floor = encoder_floor(router, dataset)
    server = ServeProcess(ServeOptions(
        model="llama", dense=False, variants=[VariantOptions(mask=str(a.static))],
        router=str(a.router), port=free_port(8200, 8300), metrics_port=free_port(8300, 8400),
        engine=EngineOptions(kv_cache_gib=0.25, max_model_len=1024)), a.out / "serve.log",
        ready_timeout_s=1200)
    t0 = time.time()
    with server:  # returns once READY; leaving it stops the server
        before = routing_buckets(server)
        cmd = [sys.executable, "-m", "tabp_vllm", "bench", "--url", server.base_url,
               "--variant", static_name, "--variant", server.routed_name, "--dense", static_name,
               "--mask", f"{static_name}={a.static}", "--levels", a.levels,
               "--duration", str(a.duration), "--rounds", str(a.rounds), "--dataset", str(dataset),
               "--out", str(a.out), "--name", "routed_vs_static"]
        subprocess.run(cmd, check=True)
        time.sleep(12)  # two of Ray's metric report intervals: the last routed requests counted
        after = routing_buckets(server)
    delta = {le: after.get(le, 0) - before.get(le, 0) for le in after}
    bench = json.loads((a.out / "routed_vs_static.json").read_text())
    levels = []
    for level in sorted({m["level"] for m in bench["metrics"]}):
        by = {m["variant"]: m for m in bench["metrics"] if m["level"] == level}
        ratio = by["llama-auto"]["output_tokens_per_s"] / by[static_name]["output_tokens_per_s"]
        levels.append({"level": level, "routed_over_static_output_tokens_per_s": ratio,
                       "routed": {k: by["llama-auto"][k] for k in ("output_tokens_per_s", "completed", "errors")},
                       "static": {k: by[static_name][k] for k in ("output_tokens_per_s", "completed", "errors")},
                       "target": THROUGHPUT_TARGET if level == 16 else None,
                       "target_met": ratio >= THROUGHPUT_TARGET if level == 16 else None})
    p50, p99 = (histogram_quantile(q, delta) for q in (0.5, 0.99))
    p50, p99 = (None if math.isnan(x) else x for x in (p50, p99))  # no routed request seen
    doc = {"router": str(a.router), "router_hash": router.content_hash(), "clusters": router.num_clusters,
           "distinct_masks": len(router.variants()), "k": router.k,
           "flops_ratio": router.flops_ratio, "static_variant": static_name,
           "static_removed": static.removed_layers, "host": cpu_info(), "wall_s": time.time() - t0,
           "bench_command": cmd, "levels": levels,
           "routing_latency": {"requests": delta.get(float("inf"), 0), "p50_s": p50, "p99_s": p99,
                               "buckets_le_s": sorted(k for k in delta if k != float("inf")),
                               "p50_target_s": P50_TARGET_S,
                               "p50_target_met": p50 is not None and p50 <= P50_TARGET_S,
                               "encoder_alone": floor},
           "note": ("Every distinct cluster mask is one more engine: the routed traffic is spread "
                    "over the router's variants, the static traffic goes to one engine, on the "
                    "same CPU cores. Quantiles interpolated inside the histogram's buckets.")}
    doc["routing_share"] = routing_share(doc, bench)
    (a.out / "routed_load.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({"levels": levels, "routing_latency": doc["routing_latency"],
                      "routing_share": doc["routing_share"]}, indent=2))


SHARE_TARGET = 0.05  # routing p50 at most 5 % of the routed request's end-to-end p50


def routing_share(doc: dict, bench: dict) -> dict:
    """Routing p50 (the server's histogram) against the routed request's end-to-end p50 (the
    client's, from the same bench run) at the highest level: what routing adds to a request."""
    level = max(m["level"] for m in bench["metrics"])
    routed = next(m for m in bench["metrics"] if m["level"] == level and m["variant"] == "llama-auto")
    e2e, p50 = routed["e2e_s"]["p50"], doc["routing_latency"]["p50_s"]
    share = p50 / e2e if p50 is not None and e2e else None
    return {"level": level, "routing_p50_s": p50, "routed_e2e_p50_s": e2e, "share": share,
            "target": SHARE_TARGET, "target_met": share is not None and share <= SHARE_TARGET}


def load_share(argv: list[str]) -> None:
    """Add the routing share to an existing `load` run's routed_load.json, from that run's own
    bench file (the same run: both figures measured together)."""
    ap = argparse.ArgumentParser(prog="routing.py load-share", description=load_share.__doc__)
    ap.add_argument("--out", type=Path, default=RESULTS / "routed")
    a = ap.parse_args(argv)
    doc = json.loads((a.out / "routed_load.json").read_text())
    doc["routing_share"] = routing_share(doc, json.loads((a.out / "routed_vs_static.json").read_text()))
    (a.out / "routed_load.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["routing_share"], indent=2))


# --------------------------------------------------------------------------------- fit-time

TARGET_S = 600.0
TASKS = ("arc_easy", "piqa", "boolq", "gsm8k")


def fit_time(argv: list[str]) -> None:
    """How long `route fit` takes with its defaults (target: N = 4, k = 4 within 10 minutes)."""
    ap = argparse.ArgumentParser(prog="routing.py fit-time", description=fit_time.__doc__)
    ap.add_argument("--clusters", type=int, default=4)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--out", type=Path, default=RESULTS / "routing" / "fit_time.json")
    a = ap.parse_args(argv)
    router = a.out.with_suffix(".router.json")
    cmd = [sys.executable, "-m", "tabp_vllm", "route", "fit", "--model", "llama",
           *sum((["--task", t] for t in TASKS), []), "--clusters", str(a.clusters),
           "--k", str(a.k), "-o", str(router)]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    command_s = time.perf_counter() - t0
    r = json.loads(router.read_text())
    p = r["provenance"]
    res = {"command": " ".join(["tabp-vllm"] + cmd[3:]), "clusters": a.clusters, "k": a.k,
           "inputs": p["samples"], "hyperparameters": r["method"]["params"],
           "fit_wall_s": p["wall_s"], "command_wall_s": round(command_s, 1),
           "forward_passes": p["forward_passes"], "backward_passes": p["backward_passes"],
           "per_cluster": p["clusters"], "target_s": TARGET_S,
           "target_met": command_s <= TARGET_S,
           "loadavg_before": [round(x, 2) for x in load_before],
           "loadavg_after": [round(x, 2) for x in os.getloadavg()],
           "cpu": cpu_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k not in ("per_cluster", "hyperparameters")},
                     indent=2))


# The L0 convergence study: one cluster (ARC-Easy train, 32 inputs, k = 4 of the 28 candidate
# blocks) fitted with each setting until converged or the step cap; chunks of one setting each
# (resumable: a setting whose router exists is read, not refitted).
STUDY = RESULTS / "routing" / "l0_study"
STUDY_SETTINGS = {
    "old-24steps": ["--steps", "24", "--lr", "0.1", "--multiplier", "adam", "--lambda-lr", "0.05",
                    "--warmup", "0.5"],
    # warm-up 0.1: the target reaches k/n after 30 steps; lambdas by Adam (rows as run)
    "lr0.2-lam0.2": ["--steps", "300", "--lr", "0.2", "--multiplier", "adam", "--lambda-lr", "0.2",
                     "--warmup", "0.1"],
    # lambdas by plain gradient ascent at 5 (the code of that run: provenance.convergence says so)
    "sgd-lam5": ["--steps", "300", "--lr", "0.2", "--lambda-lr", "5", "--warmup", "0.1"],
    # the old defaults: lambdas by Adam, the target rising over half the steps
    "adam-warm0.5": ["--steps", "300", "--lr", "0.2", "--multiplier", "adam", "--lambda-lr", "0.2",
                     "--warmup", "0.5"],
    # the new defaults: lambda1 by a PI controller whose integral restarts when the gap changes sign
    "pi": ["--steps", "300"],
    "pi-k8": ["--steps", "300", "--k", "8"],
    "pi-lm": ["--steps", "300", "--loss", "lm"],
    "pi-seed1": ["--steps", "300", "--seed", "1"],  # another 32 inputs, other gate noise
    # sublayer units (56 gates: attention and MLP of blocks 1..28). k = 8 units is the share of
    # k = 4 blocks (target 0.143); the fit removed 8 attention sublayers, 0.066 of the decode
    # FLOPs against 4 blocks' 0.107 (an attention sublayer is 4/9 of an MLP's FLOPs), so k = 13
    # (13 attentions: exactly 4 blocks' FLOPs) is the FLOPs-matched budget
    "pi-sub8": ["--steps", "300", "--units", "sublayers", "--k", "8"],
    "pi-sub13": ["--steps", "300", "--units", "sublayers", "--k", "13"],
    # k = 8 blocks remove 0.214: 26 attentions, or fewer units once MLPs go (the k = 13 fit took
    # one whole block); 20 units is a guess at the FLOPs-matched budget, its FLOPs recorded
    "pi-sub20": ["--steps", "300", "--units", "sublayers", "--k", "20"],
    "pi-sub13-seed1": ["--steps", "300", "--units", "sublayers", "--k", "13", "--seed", "1"],
    # a FLOPs budget instead of a unit count: the gates' expected removed FLOPs held at 4 whole
    # blocks' share (0.1069959, flops.py; rounded down so a 4-block mask meets the same budget),
    # the mask cut by FLOPs (`route fit --flops-ratio`)
    "pi-sub-flops4": ["--steps", "300", "--units", "sublayers", "--flops-ratio", "0.10699"],
    # the same after the FLOPs budget's pull was normalised by the gated units' FLOPs
    # (`routing/l0.py: GateBudget.pull`; pi-sub-flops4 lagged its target for ~100 steps)
    "pi-sub-flops4-norm": ["--steps", "300", "--units", "sublayers", "--flops-ratio", "0.10699"],
}


def l0_study(argv: list[str]) -> None:
    """Fit one cluster with each L0 setting (`--only NAME` for one chunk) and summarise: steps and
    wall time to convergence, final sparsity vs target, lambdas, loss; plot the curves."""
    ap = argparse.ArgumentParser(prog="routing.py l0-study", description=l0_study.__doc__)
    ap.add_argument("--only", action="append", choices=list(STUDY_SETTINGS))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--summary-only", action="store_true")
    a = ap.parse_args(argv)
    STUDY.mkdir(parents=True, exist_ok=True)
    for name in ([] if a.summary_only else (a.only or list(STUDY_SETTINGS))):
        router = STUDY / f"{name}.json"
        if router.exists():
            continue
        cmd = CLI + ["route", "fit", "--model", "llama", "--task", "arc_easy", "--samples",
                     str(a.samples), "--clusters", "1", "--fallback", "none",
                     "--batch-size", str(a.batch_size), *STUDY_SETTINGS[name], "-o", str(router)]
        if "--k" not in STUDY_SETTINGS[name] and "--flops-ratio" not in STUDY_SETTINGS[name]:
            cmd[-2:-2] = ["--k", "4"]
        load_before = os.getloadavg()
        wall = run(cmd, STUDY / f"{name}.log")
        meta = {"command": " ".join(["tabp-vllm"] + cmd[3:]), "command_wall_s": round(wall, 1),
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
        (STUDY / f"{name}.meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    from tabp_vllm.flops import DecoderShape, removed_flops_fraction
    from tabp_vllm.models import load_model_config, resolve_model
    from tabp_vllm.sublayers import mask_units

    shape = DecoderShape.from_config(load_model_config(resolve_model("llama")))
    rows = []
    for name in STUDY_SETTINGS:
        router = STUDY / f"{name}.json"
        if not router.exists():
            continue
        r = json.loads(router.read_text())
        rec = r["provenance"]["clusters"][0]
        meta = json.loads((STUDY / f"{name}.meta.json").read_text())
        mask = r["clusters"][0]["mask"]
        lists = [mask.get(key, []) for key in ("removed_layers", "removed_attention", "removed_mlp")]
        rows.append({"setting": name, "args": STUDY_SETTINGS[name], **meta,
                     "units": r.get("units", "blocks"), "k": r.get("k"),
                     "budget": r.get("budget", "units"), "flops_ratio": r.get("flops_ratio"),
                     "removed": lists[0], "removed_attention": lists[1], "removed_mlp": lists[2],
                     # the share of a dense decode step's FLOPs (256 keys, LM head counted) the
                     # mask removes: what compares a sublayer budget with a block budget
                     "removed_flops_fraction": round(removed_flops_fraction(shape, mask_units(*lists)), 4),
                     **{k: rec.get(k) for k in ("steps", "converged", "unmet", "expected_sparsity",
                                                "target", "lambda1", "lambda2", "loss", "loss_kind",
                                                "margin", "kl", "wall_s", "forward_passes",
                                                "backward_passes")}})
    doc = {"what": "one cluster: ARC-Easy train, seeded subset, k = 4 of the demo model's 28 "
                   "candidate blocks (1..28) unless the row's args say otherwise (--k; --units "
                   "sublayers: k of the 56 attention/MLP units of blocks 1..28; --flops-ratio: "
                   "units until their FLOPs reach it, expected_sparsity and target then FLOPs "
                   "shares), batch of "
                   "--batch-size, route fit's other defaults",
           "samples": a.samples, "batch_size": a.batch_size, "rows": rows, "cpu": cpu_info(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    (STUDY / "study.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot_study(rows)
    for row in rows:
        print(f"{row['setting']:18s} steps {row['steps']:4d} converged {row['converged']!s:5s} "
              f"s {row['expected_sparsity']:.3f}/{row['target']:.3f} lambda1 {row['lambda1']:8.3f} "
              f"loss {row['loss']:.4f} KL {row['kl']:.4f} removed {row['removed']} "
              f"attention {row['removed_attention']} MLP {row['removed_mlp']} "
              f"FLOPs {row['removed_flops_fraction']:.3f} "
              f"{row['wall_s']:.0f} s (load {row['loadavg_before'][0]})")


def plot_study(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tabp_vllm.routing.curves import load_curves

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax in axes:  # more settings than the default cycle's 10 colours
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for row in rows:
        c = load_curves(STUDY / f"{row['setting']}.json")["curves"][0]
        steps = range(1, len(c["loss"]) + 1)
        label = f"{row['setting']} ({'converged' if row['converged'] else 'not converged'})"
        axes[0].plot(steps, c["loss"], lw=0.7, label=label)
        line, = axes[1].plot(steps, c["expected_sparsity"], label=label)
        axes[1].plot(steps, c["target"], "--", color=line.get_color(), lw=0.7)
        axes[2].plot(steps, c["lambda1"], label=label)
    for ax, title in zip(axes, ("task loss (KL or LM)", "expected sparsity (target dashed)",
                                "lambda1")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(STUDY / "l0_study.png", dpi=90)
    plt.close(fig)


# Prompts for the served sublayer router: ARC-Easy-like and PIQA-like questions, as `eval` asks
SERVE_PROMPTS = ["Question: Which gas do plants take in from the air to make their food?\nAnswer:",
                 "Question: What happens to water when it is cooled below 0 degrees Celsius?\nAnswer:",
                 "Question: How do I keep a cut apple from turning brown?\nAnswer:",
                 "Question: How can I open a jar whose lid is stuck?\nAnswer:"]


def routed_request(client, model: str, prompt: str) -> dict:
    """One greedy completion of `prompt` from `model` (the routed name) with the official client:
    the x-tabp-* headers the server sets (the variant and cluster that served it; the client's
    raw response keeps them), the model and text of the reply, and its wall time."""
    t0 = time.time()
    raw = client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=12,
                                                      temperature=0)
    out = raw.parse()
    return {"headers": {k: v for k, v in raw.headers.items() if k.lower().startswith("x-tabp")},
            "model": out.model, "text": out.choices[0].text, "wall_s": round(time.time() - t0, 2)}


def sublayer_serve(argv: list[str]) -> None:
    """Serve a fitted sublayer router once, end to end: `serve --no-dense --router R` (its startup
    table), /v1/models, one request per prompt to the routed name (the x-tabp-* headers against the
    cluster the router gives the prompt here), then `eval --router R` on a few documents. Wall
    times and what was seen into OUT/serve_e2e.json; the logs beside it."""
    from tabp_vllm.routing.router import load_router, route_input
    from tabp_vllm.serve.launcher import ServeProcess
    from tabp_vllm.serve.options import ServeOptions

    ap = argparse.ArgumentParser(prog="routing.py sublayer-serve", description=sublayer_serve.__doc__)
    ap.add_argument("--router", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=STUDY / "serve")
    ap.add_argument("--tasks", default="tabp_arc_easy,tabp_piqa")
    ap.add_argument("--limit", type=int, default=20)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    router = load_router(a.router)
    expected = route_input(router, SERVE_PROMPTS)
    res: dict = {"router": str(a.router), "units": router.units, "k": router.k,
                 "flops_ratio": router.flops_ratio,
                 "cpu": cpu_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "requests": []}
    opts = ServeOptions(model="llama", dense=False, router=str(a.router),
                        port=free_port(8040, 8080), metrics_port=free_port(8080, 8100),
                        engine={"kv_cache_gib": 0.25})
    server = ServeProcess(opts, a.out / "serve.log")
    t0 = time.time()
    with server:
        res["serve_ready_s"] = round(time.time() - t0, 1)
        res["startup_table"] = server.log_text()
        client = server.openai_client(max_retries=0)
        # the entries as the server sent them (exclude_unset: no field the client defaults)
        res["models"] = [m.model_dump(exclude_unset=True) for m in client.models.list()]
        res["requests"] = [{"prompt": prompt, "cluster_here": cluster,
                            **routed_request(client, server.routed_name, prompt)}
                           for prompt, cluster in zip(SERVE_PROMPTS, expected)]
    res["serve_total_s"] = round(time.time() - t0, 1)
    cmd = CLI + ["eval", "--router", str(a.router), "--no-dense", "--task", a.tasks,
                 "--limit", str(a.limit), "--kv-cache-gib", "0.25", "-o", str(a.out / "eval.json")]
    res["eval_command"] = " ".join(["tabp-vllm"] + cmd[3:])
    res["eval_wall_s"] = round(run(cmd, a.out / "eval.log"), 1)
    (a.out / "serve_e2e.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k not in ("startup_table", "models")}, indent=2))


COMMANDS = {"report": report, "oracle": oracle, "load": load, "load-share": load_share, "fit-time": fit_time,
            "l0-study": l0_study, "sublayer-serve": sublayer_serve}

if __name__ == "__main__":
    if sys.argv[1:2] not in ([c] for c in COMMANDS):  # none or an unknown one: the overview
        sys.exit(print(__doc__) or (0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2))
    COMMANDS[sys.argv[1]](sys.argv[2:])
