"""TaBP against the baselines on the demo model, measured so methods can be told apart (report v2).

What it runs, all through the product's own code (`score_with_options` = `tabp-vllm score`, and
`evaluate_variant` = `tabp-vllm eval`, i.e. lm-evaluation-harness on the served engine):
- configurations (CONFIGS): TaBP as the product runs it by default (auto probe, SSN, latter half),
  TaBP with `--preset paper` (the official code's setting), TaBP with DDF, TaBP over the whole
  depth, the default on 64 samples (`tabp-64`); the baselines as published (Block Influence, angular distance, SLEB and PPL on
  WikiText-2), the task-aligned SLEB and PPL (`sleb-task`, `ppl-task`: calibrated on the task's
  own `Question ... Answer: <gold>` text), and the floors (random, last-k);
- two protocols: `paper` (calibrate once on ARC-Easy train, evaluate on every task: what the TaBP
  paper does) and `per-task` (calibrate on each task's own train split);
- calibration seeds (`--seeds`): each seed draws another calibration sample (and another random
  mask); configurations whose calibration does not depend on the seed (the paper preset reads the
  first 1,024 items, last-k reads nothing) are scored once;
- evaluation on whole held-out splits with lm-eval's prompts and metrics: ARC-Easy validation
  (570), ARC-Challenge validation (299), the held-out halves of PIQA (919) and BoolQ (1,635) (no
  `--limit` unless given);
- per (protocol, task, k, configuration): mean and standard deviation over seeds, and a paired
  bootstrap interval of its accuracy minus TaBP's (per document, each averaged over the seeds);
  forward passes and wall time of every scoring run; per task its no-skill floor (chance, the
  majority answer) and, on yes/no tasks (BoolQ), each mask's share of "yes" answers, since
  accuracy there can move with that bias alone.

Resumable: masks are kept under OUT/masks, per-document results of every (task, removed blocks)
pair in OUT/eval_cache.json (one engine per distinct removed set, dense included), and the report
(OUT/report.json, report.md, accuracy_vs_k.png) is rewritten after every evaluation, so an
interrupted run keeps what it finished and a rerun does only what is missing. Work is ordered so
that the first results are the ones the goal needs: seed by seed, the paper protocol first.
`--score-only` makes every mask first (one CPU-bound transformers process) and leaves the
evaluations to a later run. `--configs` names what a run scores and evaluates; the report always
also shows the reference (`tabp`) with what earlier runs made of it, so two runs can split the
configurations between them (each with its own `--out`, caches merged afterwards);
`--report-only` then rewrites the report from what OUT has, scoring and evaluating nothing. Every
run evaluates the dense model (cached as "lm-eval task|", nothing removed); `--configs dense`
evaluates only it, scoring no mask.

    python bench/compare.py --tasks arc_easy,piqa --seeds 0 --out bench/results/compare_v2
    # quick smoke run:
    python bench/compare.py --tasks arc_easy --ks 2 --seeds 0 --configs tabp,random \\
        --samples 16 --limit 20 --out /tmp/cmp2
"""

from __future__ import annotations

import argparse
from fractions import Fraction
import sys
from pathlib import Path

from tabp_vllm.comparison import (CONFIGS, DENSE, LM_TASK, REFERENCE, SEEDLESS, SUBLAYER, Report,
                                  same_as_paper)
from tabp_vllm.errors import TabpError


def fail(message: str) -> None:
    """Bad input: one line and exit 2, as the CLI's TabpError (sys.exit(str) would exit 1)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(TabpError.exit_code)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    csv = lambda t: lambda s: [t(x) for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--tasks", type=csv(str), default=["arc_easy", "piqa", "arc_challenge", "boolq"])
    ap.add_argument("--configs", type=csv(str), default=[c for c in CONFIGS if c not in SUBLAYER],
                    help="configurations (default: every whole-block one); sublayer ones (-sub-) "
                         "make a sublayer report against --blocks-from; every run evaluates the "
                         f"dense model, '{DENSE}' alone evaluates only it")
    ap.add_argument("--protocols", type=csv(str), default=["paper", "per-task"])
    ap.add_argument("--ks", type=csv(int), default=[4, 8])
    ap.add_argument("--seeds", type=csv(int), default=[0, 1, 2])
    ap.add_argument("--samples", type=int, default=256, help="calibration samples (one-pass methods)")
    ap.add_argument("--sleb-samples", type=int, default=32,
                    help="calibration samples of the methods that pass them once per candidate (SLEB, PPL)")
    ap.add_argument("--model", default="llama", help="alias (llama, qwen1.5b, ...) or path")
    ap.add_argument("--arc-easy-split", choices=["validation", "test"], default="validation",
                    help="ARC-Easy's evaluation split (test: 2,376 documents that chose nothing)")
    ap.add_argument("--limit", type=int, default=None, help="first N documents per task (default: all)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "compare_v2")
    ap.add_argument("--blocks-from", type=Path, default=Path(__file__).resolve().parent / "results" / "compare_v2",
                    help="with sublayer configurations: the report whose whole-block masks and "
                         "per-document results they are compared with (read, never re-evaluated)")
    ap.add_argument("--goal-sleb-share", type=Fraction, default=Fraction(1, 10), metavar="SHARE",
                    help="the goal's cost bound: TaBP within this share of SLEB's forward passes "
                         "(e.g. 1/3; default 1/10, the demo model's comparison)")
    ap.add_argument("--score-only", action="store_true",
                    help="only score the masks (transformers, no engine); evaluate in a later run")
    ap.add_argument("--report-only", action="store_true",
                    help="score and evaluate nothing: rewrite the report from the masks and "
                         "evaluations OUT already has (e.g. after merging side runs)")
    a = ap.parse_args()
    bad = ([t for t in a.tasks if t not in LM_TASK]
           + [c for c in a.configs if c not in CONFIGS and c != DENSE]
           + [p for p in a.protocols if p not in ("paper", "per-task")])
    if bad:
        fail(f"unknown task, configuration or protocol: {', '.join(bad)}")
    # dense is no mask: every run evaluates it (`needed` below), so the name selects nothing
    # more, and `--configs dense` alone evaluates the dense model only
    a.configs = [c for c in a.configs if c != DENSE]
    asked = list(a.configs)  # what this run scores and evaluates; the report also shows the
    if REFERENCE not in a.configs:  # reference, with whatever of it earlier runs made
        a.configs.insert(0, REFERENCE)
    if any(c in SUBLAYER for c in a.configs):  # measured against every whole-block configuration
        a.configs = [c for c in CONFIGS if c not in SUBLAYER] + [c for c in a.configs if c in SUBLAYER]
    try:
        rep = Report(a.out, a)
    except TabpError as exc:
        fail(str(exc))
    for seed in [] if a.report_only else a.seeds:
        for protocol in a.protocols:
            groups = [("arc_easy", a.tasks)] if protocol == "paper" else [(t, [t]) for t in a.tasks]
            for calib_task, eval_tasks in groups:
                if same_as_paper(protocol, calib_task, a.protocols):
                    continue  # already done
                needed: dict[tuple[int, ...], tuple[set[str], Path | None]] = {(): (set(a.tasks), None)}
                for config in asked:
                    if config in SEEDLESS and seed != a.seeds[0]:
                        continue
                    try:
                        masks = rep.masks(config, calib_task, seed)
                    except TabpError as exc:  # e.g. a sublayer budget its candidates cannot meet
                        fail(str(exc))
                    for _k, (removed, path) in masks.items():
                        needed.setdefault(removed, (set(), path))[0].update(eval_tasks)
                if not a.score_only:
                    rep.evaluate(needed)
    rep.save()
    print(f"wrote {a.out / 'report.md'}", flush=True)


if __name__ == "__main__":
    main()
