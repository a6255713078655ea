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
from fractions import Fraction
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
    # sublayer masks (issue 33): attention and/or MLP units; at "k" their budget is the FLOPs
    # share of k whole blocks (`k_flops_ratio`), so they compete at the same ideal speedup.
    # TaBP's probe is the product default (`auto`), as for its whole-block masks: cloze on the
    # demo model's ARC-Easy sets (the masks of bench/results/sublayer_v1 named it, skipping the
    # lettered pass), letters on Qwen2.5-Coder-1.5B's.
    # Candidates relative to depth, so one configuration serves every model: "both" in the latter
    # half (blocks 15-29 of the demo model's 30), attention in every block but the first.
    "tabp-sub-both": {"method": "tabp", "granularity": "sublayer",
                      "units": "both", "block_range": "0.5:1.0"},
    "tabp-sub-attention": {"method": "tabp", "granularity": "sublayer",
                           "units": "attention", "block_range": "after-first"},
    # tabp-sub-both's units taken by the lowest score per FLOP first (the knapsack's greedy
    # order; TaBP's SSN is a nonnegative importance), where the others take the lowest score first
    "tabp-sub-both-perflop": {"method": "tabp", "granularity": "sublayer",
                              "units": "both", "block_range": "0.5:1.0",
                              "budget_order": "score-per-flop"},
    "block_influence-sub-both": {"method": "block_influence", "granularity": "sublayer",
                                 "units": "both", "block_range": "0.5:1.0"},
    "block_influence-sub-attention": {"method": "block_influence", "granularity": "sublayer",
                                      "units": "attention", "block_range": "after-first"},
    "what_matters-sub-both": {"method": "what_matters", "granularity": "sublayer",
                              "units": "both", "block_range": "0.5:1.0"},
    "what_matters-sub-attention": {"method": "what_matters", "granularity": "sublayer",
                                   "units": "attention", "block_range": "after-first"},
    "sleb-task-sub-both": {"method": "sleb-task", "granularity": "sublayer", "units": "both",
                           "block_range": "0.5:1.0"},
    "sleb-task-sub-attention": {"method": "sleb-task", "granularity": "sublayer",
                                "units": "attention", "block_range": "after-first"},
    # SLEB per sublayer as published (WikiText-2); ~4x the task SLEB's time per sample pass
    "sleb-sub-both": {"method": "sleb", "granularity": "sublayer", "units": "both",
                      "block_range": "0.5:1.0"},
    "sleb-sub-attention": {"method": "sleb", "granularity": "sublayer", "units": "attention",
                           "block_range": "after-first"},
}
REFERENCE = "tabp"
# not a mask: the `--configs` name of the dense model alone. Every run evaluates dense (each
# configuration is measured against it); naming only this one evaluates nothing else
DENSE = "dense"
SUBLAYER = {c for c, spec in CONFIGS.items() if spec.get("granularity") == "sublayer"}
# methods whose score of a unit does not depend on which units are candidates (TaBP's per-unit
# aggregate of the early-exit shift; the similarity of a unit's input and output): one scoring run
# of every unit gives the masks of every candidate set, cut from its scores. SLEB's rounds do
# depend on the candidates: it is scored per configuration.
UNIT_LOCAL = {"tabp", "block_influence", "what_matters"}
PUBLISHED = ["sleb", "ppl", "block_influence", "angular"]  # the goal's "published-setting" baselines
SEEDLESS = {"tabp-paper", "last_k"}  # calibration does not depend on the seed
NO_DATA = {"random", "last_k"}  # no calibration data: one mask for every task
WIKITEXT = {"sleb", "ppl", "what_matters-sub-both", "what_matters-sub-attention",  # WikiText-2
            "sleb-sub-both", "sleb-sub-attention"}
# our task -> the lm-eval task it is scored with (whole held-out split)
LM_TASK = {"arc_easy": "tabp_arc_easy_validation", "arc_challenge": "tabp_arc_challenge_validation",
           "piqa": "tabp_piqa", "boolq": "tabp_boolq"}
# ARC-Easy's test split (2,376), which chose none of our defaults (they were picked on validation)
ARC_EASY_SPLITS = {"validation": "tabp_arc_easy_validation", "test": "tabp_arc_easy"}


def goal_sleb_share(args) -> Fraction:
    """The goal's cost bound, TaBP's forward passes over SLEB's (`--goal-sleb-share`); runs
    written before the option: compare_v2's 1/10."""
    return Fraction(getattr(args, "goal_sleb_share", None) or Fraction(1, 10))


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


def is_sublayer_run(args: argparse.Namespace) -> bool:
    """A report of sublayer configurations: its reference is the best whole-block configuration."""
    return any(c in SUBLAYER for c in args.configs)


FLOPS_TIE = 1e-6  # a FLOPs budget met within this counts as met (recorded shares are rounded)


def k_flops_ratio(config: Any, k: int) -> float:
    """The FLOPs budget of a sublayer configuration at "k": the share of a dense decode step's
    ideal FLOPs that k whole blocks hold (every block costs the same), so both run at the same
    ideal speedup 1 / (1 - ratio)."""
    from tabp_vllm.flops import DecoderShape, removed_flops_fraction

    shape = DecoderShape.from_config(config)
    return removed_flops_fraction(shape, range(2 * k))


def wide_name(config: str) -> str:
    """The scoring run of every unit that a unit-local sublayer configuration is cut from."""
    return f"{CONFIGS[config]['method']}-sub-all"


def check_budget_reachable(config: str, model_config: Any, k: int) -> None:
    """A sublayer configuration whose candidates together hold less than k whole blocks' FLOPs
    has no mask at k: one clear error, before any scoring (on Qwen2.5-Coder-1.5B the attention
    of blocks 1-27 is 0.109 of the FLOPs, under 4 blocks' 0.122: GQA with 2 KV heads leaves
    attention 13 % of a block)."""
    from tabp_vllm.scoring import parse_range
    from tabp_vllm.scoring.units import Budget, candidate_units, unit_flops_shares

    spec = CONFIGS[config]
    blocks = parse_range(spec["block_range"], model_config.num_hidden_layers)
    candidates = candidate_units(blocks, "sublayer", spec["units"])
    # the budget the cut applies (`sublayer_masks`), met or not by the scorer's own rule
    budget = Budget(flops_ratio=k_flops_ratio(model_config, k) - FLOPS_TIE,
                    shares=tuple(unit_flops_shares(model_config, "sublayer")))
    if not budget.met(candidates):
        held = budget.removed_flops(candidates)
        raise TabpError(f"{config}: its candidates ({spec['units']} of blocks {blocks[0]}-"
                        f"{blocks[-1]}) hold {held:.4f} of the FLOPs, less than k = {k} whole "
                        f"blocks' {k_flops_ratio(model_config, k):.4f}: no mask at this budget")


def restrict(result: Any, units: str, block_range: str, num_blocks: int) -> Any:
    """A run over every unit, seen as a run over the candidates of `units` in `block_range` (only
    for UNIT_LOCAL methods, whose per-unit scores do not depend on the candidates): the other
    units' scores dropped, the candidates recorded, and every candidate ranked (k = all of them),
    so `result_at` cuts any budget from it."""
    from dataclasses import replace

    from tabp_vllm.scoring import parse_range
    from tabp_vllm.scoring.units import candidate_units

    blocks = parse_range(block_range, num_blocks)
    cand = candidate_units(blocks, "sublayer", units)
    scores = [s if u in cand else None for u, s in enumerate(result.scores)]
    params = {key: v for key, v in result.params.items()
              if key not in ("flops_ratio", "removed_flops_fraction")}
    params.update(candidate_range=[blocks[0], blocks[-1] + 1], units=units, k=len(cand),
                  cut_from="a scoring run of every unit (the scores do not depend on the candidates)")
    return replace(result, removed=sorted(cand), scores=scores, params=params)


def variant_of(mask: Any) -> tuple:
    """What an evaluation depends on: the removed blocks (a whole-block mask, as compare_v2 keyed
    them), or (blocks, attention, MLP) of a sublayer mask."""
    if not mask.is_sublayer:
        return tuple(mask.removed_layers)
    return (tuple(mask.removed_layers), tuple(mask.removed_attention), tuple(mask.removed_mlp))


def calibration_of(config: str, task: str) -> str:
    """The data a configuration's mask depends on under a protocol whose calibration task is
    `task`: that task, WikiText-2, or nothing."""
    if config in NO_DATA:
        return "none"
    return "wikitext2" if config in WIKITEXT else task


def evaluated_seeds(report_dir: Path) -> list[int]:
    """The calibration seeds the report in `report_dir` ran (its report.json's --seeds)."""
    path = report_dir / "report.json"
    try:
        seeds = json.loads(path.read_text())["args"]["seeds"]
    except (OSError, ValueError, KeyError) as exc:
        raise TabpError(f"{path}: cannot read the seeds of the whole-block report ({exc})") from None
    return [int(s) for s in seeds]


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
        old_args = old.get("args", {})  # the options the previous report was made with
        # masks are named by configuration, calibration, seed and k: a resumed run must draw
        # its calibration sets as the run that made them did. --limit shapes evaluations only,
        # so it binds only once OUT holds some (a score-only run's masks serve any --limit)
        for name in ("samples", "sleb_samples", "limit", "model", "arc_easy_split"):
            if name == "limit" and not self.cache:
                continue
            was = old_args.get(name, getattr(args, name))
            if was != getattr(args, name):
                raise TabpError(f"{out} was made with --{name.replace('_', '-')} {was}; "
                                f"resume with the same, or use another --out")
        self.scoring: dict[str, dict] = old.get("scoring", {})
        # the report shows this run's configurations and those the previous report showed: a
        # resumable run goes in chunks of a few configurations, and each chunk rewriting the
        # report with its own rows alone would drop the others' (their masks and evaluations
        # are still in OUT). This run scores and evaluates only its own (args.configs).
        shown = set(args.configs) | {c for c in old_args.get("configs", []) if c in CONFIGS}
        self.shown = sorted(shown, key=list(CONFIGS).index)  # REFERENCE first
        # likewise the seeds: a chunk working on seed 1 must not make the rows seed 1's alone
        self.shown_seeds = sorted(set(args.seeds) | set(old_args.get("seeds", [])))
        # every CPU that scored or evaluated part of this run (wall times depend on it); this
        # host joins the list only when it does work, so a --report-only elsewhere changes nothing
        self.host = cpu_info()
        self.hosts: list[dict] = old.get("hosts") or ([old["host"]] if "host" in old else [])
        self.mt = None  # the transformers model, loaded on the first scoring run
        # a sublayer report reads the whole-block masks and their per-document results from the
        # report that made them (compare_v2), never evaluating them again
        self.sublayer = is_sublayer_run(args)
        blocks_from = getattr(args, "blocks_from", None)
        self.blocks_from = Path(blocks_from) if blocks_from and self.sublayer else None
        self.block_cache: dict = {}
        self.block_seeds: list[int] = []
        if self.blocks_from is not None:
            self.block_cache = json.loads((self.blocks_from / "eval_cache.json").read_text())
            self.block_seeds = evaluated_seeds(self.blocks_from)

    def seeds_of(self, config: str) -> list[int]:
        """The calibration seeds a configuration's row averages: one for a seedless one; in a
        sublayer report every seed its whole-block report evaluated, whatever this run's --seeds
        (the best whole-block reference must not change with the seeds a run works on)."""
        if config in SEEDLESS:
            return [0]
        if self.blocks_from is not None and config not in SUBLAYER:
            return self.block_seeds
        return list(self.shown_seeds)

    # ---------------------------------------------------------------- masks
    def mask_path(self, config: str, calib: str, seed: int, k: int) -> Path:
        home = self.out if self.blocks_from is None or config in SUBLAYER else self.blocks_from
        return home / "masks" / f"{config}-{calib}-s{seed}-k{k}.json"

    def masks(self, config: str, task: str, seed: int) -> dict[int, tuple[tuple[int, ...], Path]]:
        """k -> (removed blocks, mask file) of `config` calibrated for `task` with `seed`; scored
        now if any k is missing (once at the largest k when the method ranks every k)."""
        from tabp_vllm.mask import load_mask
        from tabp_vllm.models import alias_of, resolve_model
        from tabp_vllm.scoring import get_method, result_for_k, score_to_mask

        calib, seed = calibration_of(config, task), 0 if config in SEEDLESS else seed
        ks = sorted(self.args.ks)
        todo = [k for k in ks if not self.mask_path(config, calib, seed, k).exists()]
        if todo and config in SUBLAYER:
            self.sublayer_masks(config, calib, seed, todo)
        elif todo:
            method = get_method(CONFIGS[config]["method"])
            # score_run writes its own mask and saves the report; the smaller k of a method that
            # ranks every k are prefixes of its ranking
            for kk in [max(todo)] if method.ranks_all_k else todo:
                run = self.score_run(config, calib, seed, self.mask_path(config, calib, seed, kk),
                                     k=kk, at=kk, **CONFIGS[config])
                for k in [k for k in todo if k != kk] if method.ranks_all_k else []:
                    score_to_mask(resolve_model(self.model), result_for_k(run, k), task=calib,
                                  model_id=alias_of(self.model)).save(
                        self.mask_path(config, calib, seed, k))
        return {k: (variant_of(load_mask(self.mask_path(config, calib, seed, k))),
                    self.mask_path(config, calib, seed, k)) for k in ks}

    def wide_path(self, config: str, calib: str, seed: int) -> Path:
        return self.out / "masks" / f"{wide_name(config)}-{calib}-s{seed}.json"

    def sublayer_masks(self, config: str, calib: str, seed: int, todo: list[int]) -> None:
        """The masks of sublayer `config` at the FLOPs of k whole blocks, for every k in `todo`:
        cut from the run of every unit of its method (scored once per calibration and seed, shared
        by its configurations) when its scores are unit-local, else from one run of its own at the
        largest budget (the smaller ones are prefixes of its ranking)."""
        from transformers import AutoConfig

        from tabp_vllm.mask import load_mask
        from tabp_vllm.models import alias_of, resolve_model
        from tabp_vllm.scoring import ScoringResult, result_at, score_to_mask

        spec = dict(CONFIGS[config])
        model = resolve_model(self.model)
        cfg = AutoConfig.from_pretrained(model)
        B = cfg.num_hidden_layers
        for k in todo:
            check_budget_reachable(config, cfg, k)
        if spec["method"] in UNIT_LOCAL:
            wide = self.wide_path(config, calib, seed)
            if not wide.exists():
                # k = 1: every unit is scored whatever k is, and the mask written stays valid
                # (a k removing all but one unit would remove every attention)
                self.score_run(wide_name(config), calib, seed, wide, at="all", k=1,
                               **{**spec, "units": "both", "block_range": f"0:{B}"})
            m = load_mask(wide)
            self.scoring.setdefault(f"{wide_name(config)}|{calib}|{seed}|all", {
                "host": self.host["model"], "config": wide_name(config), "calibration": calib,
                "seed": seed, "scored_at_k": "all", "samples": m.calibration["samples"],
                "forward_passes": m.calibration["forward_passes"], "wall_s": m.calibration["wall_s"]})
            run = restrict(ScoringResult(m.method, [], m.scores, m.params, m.calibration, 0.0,
                                         m.calibration["forward_passes"]),
                           spec["units"], spec["block_range"], B)
        else:
            run = self.score_run(config, calib, seed, self.mask_path(config, calib, seed, max(todo)),
                                 at=max(todo), flops_ratio=k_flops_ratio(cfg, max(todo)) - FLOPS_TIE,
                                 **spec)
        for k in todo:
            # less a hair: a mask records each unit's share to 8 decimals, and on the demo model
            # 13 attention sublayers hold exactly the FLOPs of 4 blocks (a = 4/9 m), a tie the
            # rounding would otherwise break against them
            cut = result_at(run, flops_ratio=k_flops_ratio(cfg, k) - FLOPS_TIE,
                            order=spec.get("budget_order", "score"))
            score_to_mask(model, cut, task=calib, model_id=alias_of(self.model)).save(
                self.mask_path(config, calib, seed, k))
        self.save()

    def score_run(self, name: str, calib: str, seed: int, path: Path, at: int | str,
                  k: int | None = None, **spec: Any) -> Any:
        """One scoring run of `spec` (the options of `score`) on this report's calibration, at `k`
        (or at the budget `spec` gives), written to `path` and recorded with its cost under
        `name|calib|seed|at` (`at`: the k the run ranks up to, or "all" for a run of every unit)."""
        from tabp_vllm.models import alias_of, resolve_model
        from tabp_vllm.scoring import get_method, score_to_mask
        from tabp_vllm.scoring.commands import score_with_options
        from tabp_vllm.scoring.options import ScoreOptions
        from tabp_vllm.scoring.probe import load_model, pick_device

        spec = dict(spec)
        if "preset" not in spec and "samples" not in spec:  # the preset: its first 1,024
            multi = get_method(spec["method"]).forward_passes(1, 9, 8) > 1  # SLEB, PPL
            spec["samples"] = self.args.sleb_samples if multi else self.args.samples
        model = resolve_model(self.model)
        if self.mt is None:
            self.mt = load_model(model, pick_device("cpu"))
        o = ScoreOptions(model=self.model, task=calib if calib not in ("none", "wikitext2")
                         else "arc_easy", seed=seed, output=path, **spec)
        print(f"scoring {name} on {calib} (seed {seed})"
              + (f" at k = {k}" if k is not None else "") + " ...", flush=True)
        # SLEB's and PPL's progress beside the mask until it is written (a killed chunk resumes)
        partial = Path(f"{path}.partial.json")
        run = score_with_options(o, k=k, model_and_tokenizer=self.mt, checkpoint=partial)
        self.worked_here()
        self.scoring[f"{name}|{calib}|{seed}|{at}"] = {
            "host": self.host["model"], "config": name, "calibration": calib, "seed": seed,
            "scored_at_k": at, "samples": run.calibration["samples"],
            "forward_passes": run.forward_passes, "wall_s": round(run.wall_s, 2)}
        score_to_mask(model, run, task=calib, model_id=alias_of(self.model)).save(path)
        partial.unlink(missing_ok=True)
        print(f"  {run.forward_passes} forward passes, {run.wall_s:.1f} s", flush=True)
        self.save()
        return run

    # ---------------------------------------------------------------- evaluation
    def key(self, task: str, removed: tuple) -> str:
        """The cache key of a variant (`variant_of`) on a task: "lm-eval task|removed blocks" for
        whole blocks (compare_v2's keys), then "|attention ...|mlp ..." for sublayer masks."""
        if removed and isinstance(removed[0], tuple):
            blocks, attention, mlp = removed
            return (f"{self.lm_task[task]}|{','.join(map(str, blocks))}"
                    f"|attention {','.join(map(str, attention))}|mlp {','.join(map(str, mlp))}")
        return f"{self.lm_task[task]}|{','.join(map(str, removed))}"

    def evaluate(self, needed: dict[tuple[int, ...], tuple[set[str], Path | None]]) -> None:
        """One engine per removed set, on every task it still lacks; cached per document."""
        from tabp_vllm.evaluation.evaluate import evaluate_variant
        from tabp_vllm.models import resolve_model

        todo = [(r, sorted(t for t in ts if self.cached(t, r) is None), p)
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
            print(f"[{i}/{len(todo)}] removed {removed or 'none'} on {', '.join(tasks)}: "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            self.save()

    # ---------------------------------------------------------------- report
    def cached(self, task: str, removed: tuple) -> dict | None:
        key = self.key(task, removed)
        return self.cache.get(key) or self.block_cache.get(key)

    def per_doc(self, task: str, removed: tuple) -> np.ndarray | None:
        hit = self.cached(task, removed)
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
                    for config in self.shown:
                        got, rem = self.per_seed(protocol, task, k, config)
                        if got:
                            per_config[config], removed_of[config] = got, rem
                    ref_name = self.reference_of(per_config, {
                        c for c, got in per_config.items()
                        if len(got) == self.masked_seeds(protocol, task, k, c)})
                    ref = per_config.get(ref_name)
                    for config, got in per_config.items():
                        accs = [float(x.mean()) for x in got]
                        row = {"protocol": protocol, "task": task, "metric": METRIC[task], "k": k,
                               "config": config, "seeds": len(got),
                               "seeds_asked": len(self.seeds_of(config)),
                               "acc_per_seed": accs,
                               "mean": float(np.mean(accs)),
                               "sd": float(np.std(accs, ddof=1)) if len(accs) > 1 else None,
                               "n": len(got[0]), "removed": removed_of[config],
                               "dense": float(dense.mean()) if dense is not None else None}
                        if task in YES_NO:
                            row["yes_share"] = float(np.mean([yes_share(x, golds) for x in got]))
                            if yes_dense is not None:
                                row["dense_yes_share"] = yes_dense
                        if ref is not None and config != ref_name:
                            diff = paired_bootstrap(np.mean(got, axis=0), np.mean(ref, axis=0))
                            if self.sublayer:
                                row.update(minus_best_block=diff, best_block=ref_name)
                            else:
                                row["minus_tabp"] = diff
                        rows.append(row)
        if self.sublayer:
            return {"rows": rows, "goal": [], "sublayer_goal": self.sublayer_goal(rows),
                    "cost": self.cost()}
        return {"rows": rows, "goal": self.goal(rows), "cost": self.cost()}

    def reference_of(self, per_config: dict[str, list[np.ndarray]],
                     complete: set[str] | None = None) -> str | None:
        """The configuration the others are measured against: TaBP; in a sublayer report the
        whole-block configuration of the highest mean accuracy over its seeds at this task and
        k, among those with every scored seed evaluated (`complete`; default: every seed of
        `seeds_of`). A seed scored and not evaluated yet bars a configuration (its mean could
        move); a seed never scored does not (the whole-block report's plan may give a method
        whose masks do not move with the seed fewer seeds)."""
        if not self.sublayer:
            return REFERENCE
        if complete is None:
            complete = {c for c, got in per_config.items() if len(got) == len(self.seeds_of(c))}
        whole = {c: float(np.mean([x.mean() for x in got])) for c, got in per_config.items()
                 if c not in SUBLAYER and c in complete}
        return max(whole, key=whole.get) if whole else None

    def sublayer_goal(self, rows: list[dict]) -> list[dict]:
        """Per (protocol, task, k): does a sublayer configuration keep at least the best
        whole-block configuration's accuracy, the interval of (it - best) excluding a loss?"""
        out = []
        for protocol in self.args.protocols:
            for task in self.args.tasks:
                for k in sorted(self.args.ks):
                    here = [r for r in rows if (r["protocol"], r["task"], r["k"]) == (protocol, task, k)]
                    subs = [r for r in here if r["config"] in SUBLAYER and "minus_best_block" in r]
                    if not subs:
                        continue
                    best = subs[0]["best_block"]
                    best_mean = next(r["mean"] for r in here if r["config"] == best)
                    verdict = [{"config": r["config"], "mean": r["mean"], "seeds": r["seeds"],
                                "seeds_asked": r["seeds_asked"],
                                "minus_best_block": r["minus_best_block"],
                                "met": r["minus_best_block"]["interval"][0] >= 0
                                and r["seeds"] == r["seeds_asked"]} for r in subs]
                    out.append({"protocol": protocol, "task": task, "k": k, "best_block": best,
                                "best_block_mean": best_mean, "sublayer": verdict,
                                "met": any(v["met"] for v in verdict)})
        return out

    def goal(self, rows: list[dict]) -> list[dict]:
        """Per (protocol, task, k) of the goal: does a TaBP configuration reach the best
        published-setting baseline within the bootstrap interval, at <= `goal_sleb_share` (1/10
        unless the run says otherwise) of SLEB's passes?"""
        cost = {(c["config"], c["calibration"]): c["forward_passes"] for c in self.cost()}
        sleb = cost.get(("sleb", "wikitext2"))
        share = goal_sleb_share(self.args)
        out = []
        for protocol in self.args.protocols:
            for task in ("arc_easy", "piqa"):
                for k in self.args.ks:
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
                        cheap = None if sleb is None or passes is None else passes <= sleb * share
                        verdict.append({"config": c, "mean": here[c]["mean"],
                                        "baseline_minus_tabp": [lo, hi], "within": lo <= 0,
                                        "passes": passes, "within_sleb_share": cheap,
                                        "met": bool(lo <= 0 and cheap)})
                    out.append({"protocol": protocol, "task": task, "k": k,
                                "sleb_share": str(share),
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
        for s in self.seeds_of(config):
            path = self.mask_path(config, calib, s, k)
            if path.exists():
                removed = variant_of(load_mask(path))
                x = self.per_doc(task, removed)
                if x is not None:
                    got.append(x)
                    rem.append([list(r) for r in removed] if removed and
                               isinstance(removed[0], tuple) else list(removed))
        return got, rem

    def masked_seeds(self, protocol: str, task: str, k: int, config: str) -> int:
        """How many of `config`'s seeds have a mask at k (scored, evaluated or not)."""
        calib = calibration_of(config, calibration_task(protocol, task))
        return sum(self.mask_path(config, calib, s, k).exists() for s in self.seeds_of(config))

    def seed_mean(self, protocol: str, task: str, k: int, config: str) -> np.ndarray:
        return np.mean(self.per_seed(protocol, task, k, config)[0], axis=0)

    def cost(self) -> list[dict]:
        """Per configuration and calibration data: mean forward passes and wall time of one
        scoring run at the largest k (the run that gives every k for the methods that rank
        every k). Apart per calibration: PIQA's texts are longer than ARC-Easy's."""
        kmax = max(self.args.ks)
        out = []
        # a sublayer report's shared runs of every unit are costed under their own names
        wide = sorted({r["config"] for r in self.scoring.values() if r["config"].endswith("-sub-all")})
        for config in [*self.shown, *wide]:
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

    def k_flops_ratios(self) -> dict[str, float]:
        """k -> the FLOPs share of k whole blocks (the sublayer configurations' budget)."""
        from transformers import AutoConfig

        from tabp_vllm.models import resolve_model

        cfg = AutoConfig.from_pretrained(resolve_model(self.model))
        return {str(k): k_flops_ratio(cfg, k) for k in sorted(self.args.ks)}

    def worked_here(self) -> None:
        if self.host not in self.hosts:
            self.hosts.append(self.host)

    def save(self) -> None:
        doc = {"no_skill": {t: no_skill(*task_answers(self.lm_task[t], self.args.limit))
                            for t in self.args.tasks}, "model": self.model,
               "hosts": self.hosts, "command": sys.argv, "args": {
            **{k: (str(v) if isinstance(v, (Path, Fraction)) else v) for k, v in vars(self.args).items()},
            "configs": self.shown, "seeds": self.shown_seeds},  # what the report shows: the
            # next chunk keeps showing it
            "configs": {c: CONFIGS[c] for c in self.shown},
            "reference": ("the best whole-block configuration (highest mean over seeds) of "
                          f"{self.blocks_from.name} per task and k" if self.sublayer else REFERENCE),
            **({"k_flops_ratio": self.k_flops_ratios()} if self.sublayer else {}),
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
                           seed: int = 0, strata: Any = None) -> dict[str, Any]:
    """Mean of x - y and its 95 % interval when both vary with a fit seed: `x` (seeds_x, docs) and
    `y` (seeds_y, docs), one row per fit seed over the same documents (a static mask: one row).
    Each resample draws documents with replacement (the same documents for both: the pairing)
    and, independently for x and y, seeds with replacement, so the interval carries the seed
    variance that a documents-only bootstrap leaves out. `strata` (one label per document, e.g.
    its task): the mean is the mean over strata of each stratum's mean (every task weighs the
    same, whatever its size), and documents are drawn within their stratum."""
    x, y = np.atleast_2d(np.asarray(x, dtype=float)), np.atleast_2d(np.asarray(y, dtype=float))
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{x.shape[1]} documents against {y.shape[1]}")
    labels = np.zeros(x.shape[1], dtype=int) if strata is None else np.asarray(strata)
    if labels.shape != (x.shape[1],):
        raise ValueError(f"{labels.size} strata labels for {x.shape[1]} documents")
    groups = [np.flatnonzero(labels == s) for s in dict.fromkeys(labels.tolist())]
    rng = np.random.default_rng(seed)

    def mean_over_strata(a: np.ndarray, rows: np.ndarray, docs: list[np.ndarray]) -> float:
        return float(np.mean([a[np.ix_(rows, d)].mean() for d in docs]))

    means = np.empty(resamples)
    for r in range(resamples):
        docs = [g[rng.integers(0, len(g), size=len(g))] for g in groups]
        sx = rng.integers(0, x.shape[0], size=x.shape[0])
        sy = rng.integers(0, y.shape[0], size=y.shape[0])
        means[r] = mean_over_strata(x, sx, docs) - mean_over_strata(y, sy, docs)
    lo, hi = np.percentile(means, [2.5, 97.5])
    every = np.arange(x.shape[0]), np.arange(y.shape[0])
    return {"mean": mean_over_strata(x, every[0], groups) - mean_over_strata(y, every[1], groups),
            "interval": [float(lo), float(hi)],
            "seeds": [int(x.shape[0]), int(y.shape[0])], "documents": int(x.shape[1])}


def write_markdown(doc: dict, path: Path) -> None:
    a = doc["args"]
    model = doc.get("model", "llama")
    sub = "k_flops_ratio" in doc  # a sublayer report
    title = "Sublayer masks against the best whole-block mask" if sub else "TaBP vs baselines"
    lines = [f"# {title} on {'the demo model' if model == 'llama' else model} "
             + ("(issue 33)" if sub else "(report v2)"), "",
             f"Host{'s' if len(doc['hosts']) > 1 else ''}: "
             f"{'; '.join(h.get('model') or '?' for h in doc['hosts']) or '?'}. Evaluation: lm-eval on "
             f"{', '.join(f'{t} ({name})' for t, name in doc['lm_tasks'].items())}"
             f"{'' if a['limit'] is None else ', first %d documents' % a['limit']}; metric: "
             f"acc_norm (ARC, PIQA), acc (BoolQ). Calibration: {a['samples']} samples "
             f"({a['sleb_samples']} for SLEB / PPL; the paper preset its 1,024), seeds "
             f"{a['seeds']}. Cells: mean over seeds (± sd), then [95 % paired bootstrap interval "
             f"of the configuration minus `{doc['reference']}`].", ""]
    if sub:
        lines += ["Sublayer configurations (`-sub-`) remove attention and/or MLP units, lowest "
                  "score first, until their ideal FLOPs reach those of k whole blocks: "
                  + ", ".join(f"k = {k}: {r:.4f} (ideal x{1 / (1 - r):.3f})"
                              for k, r in doc["k_flops_ratio"].items())
                  + ". Whole-block rows are the masks and per-document results of "
                  f"`{Path(a['blocks_from']).name}` (bench/results/), read, not evaluated again.", ""]
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
        share = doc["goal"][0].get("sleb_share", "1/10")  # reports before the option: 1/10
        lines += ["## Goal: a TaBP configuration at least as accurate as the best published-"
                  f"setting baseline (within the interval) at <= {share} of SLEB's forward passes", ""]
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
    if doc.get("sublayer_goal"):
        lines += ["## Goal: a sublayer mask at least as accurate as the best whole-block mask at "
                  "the same ideal FLOPs, the interval of (sublayer - best whole-block) excluding a "
                  "loss (lower bound >= 0)", ""]
        for g in doc["sublayer_goal"]:
            ok = [v["config"] for v in g["sublayer"] if v["met"]]
            lines.append(f"- {g['protocol']}, {g['task']}, k = {g['k']} (FLOPs "
                         f"{doc['k_flops_ratio'][str(g['k'])]:.4f}): best whole-block "
                         f"{g['best_block']} {g['best_block_mean']:.3f}; "
                         + ("met by " + ", ".join(ok) if ok else "not met") + " ("
                         + "; ".join(f"{v['config']} {v['mean']:.3f}"
                                     + (f" ({v['seeds']} of {v['seeds_asked']} seeds)"
                                        if v["seeds"] < v["seeds_asked"] else "")
                                     + f", minus best [{v['minus_best_block']['interval'][0]:+.3f}, "
                                     f"{v['minus_best_block']['interval'][1]:+.3f}]"
                                     for v in g["sublayer"]) + ")")
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
    diff = r.get("minus_tabp") or r.get("minus_best_block")
    if diff:
        lo, hi = diff["interval"]
        cell += f" [{lo:+.3f}, {hi:+.3f}]"
    if r.get("best_block"):  # a sublayer report's reference: the best whole-block configuration
        cell += f" (vs {r['best_block']})"
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
    if "k_flops_ratio" in doc:  # a sublayer report: its configurations and the best whole-block ones
        best = {r["best_block"] for r in rows if r.get("best_block")} | {REFERENCE}
        rows = [r for r in rows if r["config"] in SUBLAYER or r["config"] in best]
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
        ax.set_xlabel("blocks removed (k)" if "k_flops_ratio" not in doc else
                      "k: k blocks, or sublayers of the same FLOPs (-sub-)")
    axes[0][0].set_ylabel("accuracy (mean over seeds ± sd)")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
