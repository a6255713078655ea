"""Perplexity baselines: SLEB (iterative: each round removes the block whose removal hurts the
calibration perplexity least) and the PPL sensitivity of Shortened LLaMA (each block alone)."""

from __future__ import annotations

import math
from typing import Any

import torch

from tabp_vllm.scoring.base import MethodResult, ScoringMethod, lowest
from tabp_vllm.scoring.probe import ScoreContext, forward_batches, lm_text


@torch.no_grad()
def calibration_nll(ctx: ScoreContext, removed: set[int], tick=None) -> float:
    """Mean next-token NLL over the calibration texts with `removed` blocks left out (log PPL)."""
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


class SLEB(ScoringMethod):
    """k rounds; each removes the block whose removal gives the lowest calibration PPL. Score of a
    block = the log-PPL measured when it was chosen / last evaluated (lower = remove)."""

    name = "sleb"
    summary = "SLEB: k greedy rounds, each removing the block that least raises perplexity"
    # Its ranking is the greedy removal order, not the scores: the first k rounds of a run at a
    # larger k are exactly the run at k (`at_smaller_k`).
    ranks_all_k = True

    def forward_passes(self, samples: int, candidates: int, k: int) -> int:
        return sum(candidates - r for r in range(k)) * samples

    def params(self, ctx: ScoreContext) -> dict[str, Any]:
        return {"mode": "text", "max_length": ctx.max_length}

    def at_smaller_k(self, scores, params, k):
        order = params["removal_order"][:k]
        return sorted(order), {**params, "k": k, "removal_order": order}

    def score(self, ctx: ScoreContext) -> MethodResult:
        removed: set[int] = set()
        scores: list[float | None] = [None] * ctx.num_blocks
        remaining = list(ctx.candidates)
        total = sum(len(remaining) - r for r in range(ctx.k)) * ctx.num_batches()
        tick = ctx.task("SLEB", total)
        order = []
        for _ in range(ctx.k):
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


class PPLSensitivity(ScoringMethod):
    """Shortened LLaMA (PPL criterion): log-PPL with block i alone removed; remove the lowest."""

    name = "ppl"
    summary = "Shortened LLaMA: perplexity with each block alone removed"

    def forward_passes(self, samples: int, candidates: int, k: int) -> int:
        return candidates * samples

    def params(self, ctx: ScoreContext) -> dict[str, Any]:
        return {"mode": "text", "max_length": ctx.max_length}

    def score(self, ctx: ScoreContext) -> MethodResult:
        scores: list[float | None] = [None] * ctx.num_blocks
        tick = ctx.task("PPL sensitivity", len(ctx.candidates) * ctx.num_batches())
        for b in ctx.candidates:
            scores[b] = calibration_nll(ctx, {b}, tick)
        return MethodResult(scores, lowest(scores, ctx.candidates, ctx.k))
