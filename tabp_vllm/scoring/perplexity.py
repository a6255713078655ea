"""Perplexity baselines: SLEB (iterative: each round removes the block whose removal hurts the
calibration perplexity least) and the PPL sensitivity of Shortened LLaMA (each block alone).

Each comes twice: as published (`sleb`, `ppl`: perplexity of generic text, WikiText-2
paragraphs as the SLEB paper calibrates, here from the test split, the only one
../shared/data ships: our evaluations never score WikiText, so nothing leaks; Shortened LLaMA used BookCorpus, which is not here), and
task-aligned (`sleb-task`, `ppl-task`: perplexity of the task's own question + gold answer text,
the very likelihood a zero-shot evaluation scores)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

import torch

from tabp_vllm.scoring.base import MethodResult, ScoringMethod
from tabp_vllm.scoring.probe import ScoreContext, forward_batches, lm_text


@torch.no_grad()
def calibration_nll(ctx: ScoreContext, removed: set[int], tick=None) -> float:
    """Mean next-token NLL over the calibration texts with `removed` units (blocks, or sublayers
    at sublayer granularity) left out (log PPL)."""
    total, count = 0.0, 0
    for b in forward_batches(ctx, lm_text, skip=removed, tick=tick):
        logits = ctx.model.lm_head(b.output).float()
        ids, att = b.inputs["input_ids"], b.inputs["attention_mask"]
        tgt = ids[:, 1:]
        valid = (att[:, 1:] * att[:, :-1]).bool()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        total += float(-(lp * valid).sum())
        count += int(valid.sum())
    return total / max(count, 1)


WIKITEXT_SPLIT = "test"  # the one split of WikiText-2 in ../shared/data


def on_wikitext(ctx: ScoreContext, score: Callable[[ScoreContext], MethodResult]) -> MethodResult:
    """`score` run on generic text, as the published baselines calibrate: as many WikiText-2
    paragraphs as the task gave samples, seeded (the same cost either way); its passes count in
    `ctx`."""
    from tabp_vllm.data import load_task

    text = load_task("wikitext2", WIKITEXT_SPLIT).subset(len(ctx.dataset), ctx.seed)
    sub = replace(ctx, dataset=text, mode="text", forward_passes=0)
    result = score(sub)
    ctx.forward_passes += sub.forward_passes
    return result


class _PerplexityMethod(ScoringMethod):
    """Where the calibration text comes from: WikiText-2 (as published) or the task's own data."""

    calibration_text = "wikitext2"  # or "task"

    def params(self, ctx: ScoreContext) -> dict[str, Any]:
        return {"mode": "text", "max_length": ctx.max_length,
                "calibration_text": f"wikitext2 {WIKITEXT_SPLIT}"
                if self.calibration_text == "wikitext2" else "task"}

    def score(self, ctx: ScoreContext) -> MethodResult:
        if self.calibration_text == "task":
            return self.score_on(ctx)
        return on_wikitext(ctx, self.score_on)

    def score_on(self, ctx: ScoreContext) -> MethodResult:
        raise NotImplementedError


class SLEB(_PerplexityMethod):
    """k rounds (or until a FLOPs budget is met); each removes the unit (block or sublayer) whose
    removal gives the lowest calibration PPL. Score of a unit = the log-PPL measured when it was
    chosen / last evaluated (lower = remove)."""

    name = "sleb"
    summary = "SLEB: k greedy rounds, each removing the block that least raises WikiText-2 perplexity"
    # Its ranking is the greedy removal order, not the scores: the first k rounds of a run at a
    # larger k are exactly the run at k (`at_budget`).
    ranks_all_k = True
    ranks_by_score = False  # its rounds remove, not its scores (only the rounds' units are scored)

    def forward_passes(self, samples: int, candidates: int, k: int) -> int:
        return sum(candidates - r for r in range(k)) * samples

    def ranking(self, scores, params):
        return list(params["removal_order"])

    def at_budget(self, scores, params, budget):
        removed, recorded = super().at_budget(scores, params, budget)
        return removed, {**recorded, "removal_order": params["removal_order"][:len(removed)]}

    def score_on(self, ctx: ScoreContext) -> MethodResult:
        removed: set[int] = set()
        scores: list[float | None] = [None] * ctx.num_units
        remaining = list(ctx.candidates)
        budget = ctx.the_budget()
        # a FLOPs budget: the rounds are not known ahead; the bar counts up to every candidate
        rounds = ctx.k if ctx.k is not None else len(remaining)
        total = sum(len(remaining) - r for r in range(rounds)) * ctx.num_batches()
        tick = ctx.task("SLEB", total)
        order = []
        while remaining and not budget.met(removed):
            best, best_nll = None, math.inf
            for b in remaining:
                nll = calibration_nll(ctx, removed | {b}, tick)
                scores[b] = nll
                if nll < best_nll:
                    best, best_nll = b, nll
            removed.add(best)
            remaining.remove(best)
            order.append(best)
        return MethodResult(scores, sorted(removed), {"removal_order": order})


class PPLSensitivity(_PerplexityMethod):
    """Shortened LLaMA (PPL criterion): log-PPL with block i alone removed; remove the lowest."""

    name = "ppl"
    summary = "Shortened LLaMA: WikiText-2 perplexity with each block alone removed"

    def forward_passes(self, samples: int, candidates: int, k: int) -> int:
        return candidates * samples

    def score_on(self, ctx: ScoreContext) -> MethodResult:
        scores: list[float | None] = [None] * ctx.num_units
        tick = ctx.task("PPL sensitivity", len(ctx.candidates) * ctx.num_batches())
        for u in ctx.candidates:
            scores[u] = calibration_nll(ctx, {u}, tick)
        return MethodResult(scores, ctx.remove_lowest(scores))


class SLEBTask(SLEB):
    name = "sleb-task"
    summary = "SLEB on the task's own question + answer text (task-aligned)"
    calibration_text = "task"


class PPLSensitivityTask(PPLSensitivity):
    name = "ppl-task"
    summary = "Shortened LLaMA's criterion on the task's own question + answer text"
    calibration_text = "task"
