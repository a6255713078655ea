"""Block scoring: TaBP and the baselines behind one interface, and the mask they produce.

    result = run_scoring(model_path, dataset, method="tabp", k=4)
    result = run_scoring(model_path, dataset, granularity="sublayer", units="attention",
                         flops_ratio=0.125)  # attention sublayers, until 12.5 % of the FLOPs
    mask = score_to_mask(model_path, result, task="arc_easy", model_id="llama")

The methods are classes around `base.ScoringMethod`, one family per file (tabp, similarity,
perplexity, floors), listed once in `registry.py`. This module imports torch only when it scores,
so the CLI can list methods and build its options without it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from tabp_vllm.data import Dataset
from tabp_vllm.errors import TabpError
from tabp_vllm.mask import TaskMask, make_mask, now_iso
from tabp_vllm.scoring.base import MethodResult, ScoringMethod
from tabp_vllm.scoring.registry import METHOD_NAMES, all_methods, get_method
from tabp_vllm.scoring.units import (GRANULARITIES, UNIT_KINDS, UNIT_NUMBERING, Budget,
                                     candidate_units, check_order, resolve_budget, to_mask_lists,
                                     unit_flops_shares)

DEFAULT_RANGE = (0.5, 1.0)  # blocks B/2 .. B-1: the latter half (the paper's "latter" starts one later)
NAMED_RANGES = {
    "latter": lambda b: (b // 2 + 1, b),  # the official code: blocks B/2+1 .. B-1
    "whole": lambda b: (1, b - 1),  # every block but the first and the last
    "after-first": lambda b: (1, b),  # every block but the first
}


@dataclass
class ScoringResult:
    method: str
    removed: list[int]
    scores: list[float | None]
    params: dict[str, Any]
    calibration: dict[str, Any]
    wall_s: float
    forward_passes: int


def parse_range(spec: str | None, num_blocks: int) -> list[int]:
    """'latter' (B/2+1 .. B-1, the paper's), 'whole' (1 .. B-2), 'after-first' (1 .. B-1),
    '0.5:1.0' (fractions of the depth) or '15:30' (block indices, end exclusive); None:
    DEFAULT_RANGE."""
    if spec in NAMED_RANGES:
        start, end = NAMED_RANGES[spec](num_blocks)
        if start >= end:
            raise TabpError(f"--range {spec}: no candidate blocks in a {num_blocks}-block model")
        return list(range(start, end))
    if spec is None:
        a, b = DEFAULT_RANGE
    else:
        try:
            a_s, b_s = spec.split(":")
            a, b = float(a_s), float(b_s)
        except ValueError:
            raise TabpError(f"--range {spec!r}: expected latter, whole, after-first or START:END "
                            f"(e.g. 0.5:1.0 or 15:30)") from None
    frac = all(0.0 <= x <= 1.0 for x in (a, b)) and ("." in (spec or ".") or (a, b) == (0, 1))
    start, end = (round(a * num_blocks), round(b * num_blocks)) if frac else (int(a), int(b))
    if not 0 <= start < end <= num_blocks:
        raise TabpError(f"--range {spec!r}: gives blocks {start}..{end - 1}, "
                        f"outside 0..{num_blocks - 1} or empty")
    return list(range(start, end))


def resolve_k(k: int | None, ratio: float | None, num_blocks: int, candidates: list[int]) -> int:
    """Blocks to remove from --k or --ratio (one error line when neither, both or out of range)."""
    if (k is None) == (ratio is None):
        raise TabpError("give exactly one of --k and --ratio")
    return resolve_budget(k, ratio, None, num_blocks, candidates, []).k


def run_scoring(
    model_path: str,
    dataset: Dataset,
    method: str = "tabp",
    *,
    k: int | None = None,
    ratio: float | None = None,
    flops_ratio: float | None = None,
    budget_order: str = "score",
    granularity: str = "block",
    units: str | None = None,
    block_range: str | None = None,
    mode: str = "auto",
    statistic: str = "entropy",
    aggregate: str = "ssn",
    p: float = 1.0,
    norm: bool = True,
    batch_size: int = 16,
    max_length: int = 256,
    text_positions: int = 32,
    probe: str = "auto",
    preset: str | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
    model_and_tokenizer: tuple | None = None,
    checkpoint: str | Path | None = None,
) -> ScoringResult:
    """Score `dataset` with `method` and pick the units the budget removes. `checkpoint`: a file
    where a resumable method (`ScoringMethod.resumable`: SLEB, PPL, hours on a deeper model on a
    CPU) keeps its progress per batch and, when it holds a save of this very run, goes on from
    it; other methods neither read nor write it. The caller deletes it once the result is
    written."""
    import torch

    from tabp_vllm.scoring.probe import ScoreContext, load_model, pick_device
    from tabp_vllm.scoring.statistics import STATISTICS

    scorer = get_method(method)
    check_granularity(scorer, granularity, units)
    if statistic not in STATISTICS:
        raise TabpError(f"unknown statistic {statistic!r}: choose from {', '.join(STATISTICS)}")
    if aggregate not in ("ssn", "ddf"):
        raise TabpError(f"unknown aggregate {aggregate!r}: ssn or ddf")
    if p <= 0:
        raise TabpError(f"--p {p}: must be > 0")
    if mode == "auto":
        mode = dataset.kind
    if mode not in ("mcqa", "text"):
        raise TabpError(f"unknown mode {mode!r}: auto, mcqa or text")
    from tabp_vllm.scoring.tabp import PROBES

    if probe not in PROBES:
        raise TabpError(f"unknown probe {probe!r}: choose from {', '.join(PROBES)}")
    if preset not in (None, "paper"):
        raise TabpError(f"unknown preset {preset!r}: paper")
    if mode == "mcqa" and dataset.kind != "mcqa":
        raise TabpError(f"{dataset.source}: MCQA mode needs MCQA data; use --mode text")
    if len(dataset) == 0:
        raise TabpError(f"{dataset.source}: no calibration samples")
    torch.manual_seed(seed)
    dev = pick_device(device)
    model, tok = model_and_tokenizer or load_model(model_path, dev)
    B = model.config.num_hidden_layers
    blocks = parse_range(block_range, B)
    candidates = candidate_units(blocks, granularity, units)
    shares = unit_flops_shares(model.config, granularity)
    check_budget_order(scorer, budget_order)
    budget = resolve_budget(k, ratio, flops_ratio, len(shares), candidates, shares,
                            "blocks" if granularity == "block" else "units", order=budget_order)
    if granularity == "block" and budget.k is None:
        # every block costs the same: a FLOPs share is a number of blocks, which every block
        # method (angular's run of k included) takes
        budget = replace(budget, k=len(budget.take(candidates)))
    ctx = ScoreContext(model=model, tokenizer=tok, dataset=dataset, k=budget.k,
                       candidates=candidates, mode=mode, statistic=statistic,
                       aggregate=aggregate, p=p, norm=norm, batch_size=batch_size,
                       max_length=max_length, text_positions=text_positions, probe=probe,
                       preset=preset, seed=seed, device=dev, progress=progress,
                       granularity=granularity, budget=budget)
    if checkpoint is not None and scorer.resumable:
        from tabp_vllm.models import model_fingerprint
        from tabp_vllm.scoring.perplexity import PerplexitySaves

        ctx.saves = PerplexitySaves(checkpoint, {
            "method": scorer.name, "model": model_fingerprint(model.config),
            "data": dataset.content_hash(), "seed": seed, "batch_size": batch_size,
            "max_length": max_length, "granularity": granularity, "candidates": candidates})
    t0 = time.perf_counter()
    res: MethodResult = scorer.score(ctx)
    # a resumed run's time includes the killed runs' up to their last save
    earlier_s = ctx.saves.earlier_wall_s if ctx.saves else 0.0
    wall = earlier_s + time.perf_counter() - t0
    params: dict[str, Any] = {"k": len(res.removed),
                              "candidate_range": [blocks[0], blocks[-1] + 1], "seed": seed}
    if granularity == "sublayer":
        params.update(granularity=granularity, units=units or "both",
                      unit_numbering=UNIT_NUMBERING)
    if ratio is not None:
        params["ratio"] = ratio
    params.update(budget.record(res.removed))
    if flops_ratio is not None or granularity == "sublayer":
        # each unit's FLOPs share, so `masks cut --flops-ratio` needs no model
        params["unit_flops"] = [round(x, 8) for x in shares]
    params.update(scorer.params(ctx))
    params.update(res.params)
    calibration = dataset.provenance(seed)
    calibration.update(forward_passes=ctx.forward_passes, wall_s=round(wall, 3), device=dev)
    if earlier_s:
        calibration["resumed"] = {"earlier_wall_s": round(earlier_s, 3)}
    return ScoringResult(method, sorted(res.removed), res.scores, params, calibration, wall,
                         ctx.forward_passes)


def check_granularity(scorer: ScoringMethod, granularity: str, units: str | None) -> None:
    """One error line for a granularity / units / method combination that does not go."""
    if granularity not in GRANULARITIES:
        raise TabpError(f"unknown granularity {granularity!r}: {' or '.join(GRANULARITIES)}")
    if units is not None and units not in UNIT_KINDS:
        raise TabpError(f"unknown units {units!r}: choose from {', '.join(UNIT_KINDS)}")
    if units is not None and granularity != "sublayer":
        raise TabpError(f"--units {units} needs --granularity sublayer (blocks have no kinds)")
    if scorer.sublayer_only and granularity != "sublayer":
        raise TabpError(f"{scorer.name} scores sublayers: add --granularity sublayer")


def check_budget_order(scorer: ScoringMethod, order: str) -> None:
    """One error line for a budget order the method cannot take (its own removal order)."""
    if order != "score" and not scorer.ranks_by_score:
        raise TabpError(f"--budget-order {order}: {scorer.name} removes in its own order "
                        f"(its rounds), not by its scores; use --budget-order score")


def result_at(result: ScoringResult, k: int | None = None,
              flops_ratio: float | None = None, order: str = "score") -> ScoringResult:
    """The result a run of the same method at a smaller budget (`k` units or a `flops_ratio`)
    would give, from one at a larger budget (methods whose scoring ranks the units for every
    budget; see `ScoringMethod.ranks`): the shortest prefix of its ranking that meets it. With
    `order` score-per-flop, the shortest prefix of its candidates by score per FLOP instead: every
    candidate is scored (`ranks_by_score`), so any budget they hold is exact, not only a prefix of
    the run's own removal."""
    params = result.params
    scorer = get_method(result.method)
    asked = f"k = {k}" if k is not None else f"--flops-ratio {flops_ratio}"
    if (k is None) == (flops_ratio is None):
        raise TabpError("give exactly one of --k and --flops-ratio")
    check_order(order, flops_ratio)
    check_budget_order(scorer, order)
    if k is not None and k < 1:
        raise TabpError(f"--k must be at least 1, not {k}")
    if k is not None and k > params["k"]:
        raise TabpError(f"k = {k} is larger than the scored k = {params['k']}")
    if flops_ratio is not None:
        if not 0 < flops_ratio < 1:
            raise TabpError(f"--flops-ratio {flops_ratio}: must be between 0 and 1")
        if "unit_flops" not in params:
            raise TabpError("--flops-ratio: this mask records no FLOPs per unit (score it with "
                            "--flops-ratio or --granularity sublayer, or cut it with --k)")
    if not scorer.ranks(params):
        raise TabpError(f"{result.method}: the mask for {asked} needs its own scoring run")
    budget = Budget(k=k, flops_ratio=flops_ratio, shares=tuple(params.get("unit_flops") or ()),
                    order=order)
    removed, new_params = scorer.at_budget(result.scores, params, budget)
    if not budget.met(removed) or (order == "score" and len(removed) > params["k"]):
        raise TabpError(f"{asked} is larger than the scored budget (k = {params['k']}"
                        + (f", FLOPs {params['removed_flops_fraction']}"
                           if "removed_flops_fraction" in params else "") + ")")
    return replace(result, removed=removed, params=new_params)


def result_for_k(result: ScoringResult, k: int) -> ScoringResult:
    """`result_at` a smaller `k` (the comparison report cuts its k's this way)."""
    return result_at(result, k=k)


def mask_cut(mask: TaskMask, k: int | None = None, flops_ratio: float | None = None,
             where: str = "<mask>", order: str = "score") -> TaskMask:
    """The mask a scoring run at a smaller budget would have written, cut from a scored mask's
    own scores (`masks cut`): one scoring run, then any smaller k or FLOPs share."""
    if not mask.scores or "k" not in mask.params:
        raise TabpError(f"{where}: method {mask.method!r} recorded no per-block scores to cut "
                        f"(only masks written by `score` can be cut)")
    granularity = mask.params.get("granularity", "block")
    result = ScoringResult(method=mask.method, removed=[], scores=mask.scores, params=mask.params,
                           calibration=mask.calibration, wall_s=0.0, forward_passes=0)
    try:
        cut = result_at(result, k, flops_ratio, order)
    except TabpError as exc:
        raise TabpError(f"{where}: {exc}") from None
    return replace(mask, **to_mask_lists(cut.removed, granularity), params=cut.params,
                   created_at=now_iso())


def score_to_mask(model_path: str, result: ScoringResult, task: str,
                  model_id: str | None = None) -> TaskMask:
    lists = to_mask_lists(result.removed, result.params.get("granularity", "block"))
    return make_mask(model_path, task=task, model_id=model_id, method=result.method,
                     params=result.params, scores=result.scores, calibration=result.calibration,
                     **lists)


__all__ = ["METHOD_NAMES", "ScoringMethod", "ScoringResult", "all_methods", "get_method",
           "mask_cut", "parse_range", "resolve_k", "result_at", "result_for_k",
           "run_scoring", "score_to_mask"]
