"""Similarity baselines: how little a block changes the hidden state (Block Influence, ShortGPT)
and the angular distance across a run of blocks (Gromov et al.)."""

from __future__ import annotations

import math
from typing import Any

import torch

from tabp_vllm.scoring.base import MethodResult, ScoringMethod
from tabp_vllm.scoring.floors import LastK
from tabp_vllm.scoring.probe import ScoreContext, forward_batches, lm_text


@torch.no_grad()
def per_unit_mean(ctx: ScoreContext, desc: str, measure) -> list[float]:
    """For each unit u (block or sublayer), the mean over the calibration text of `measure(h_u,
    h_u+1, batch) -> (sum, count)`, a comparison of the unit's input and output residual stream."""
    sums = torch.zeros(ctx.num_units, dtype=torch.float64)
    count = 0
    tick = ctx.task(desc, ctx.num_batches())
    for b in forward_batches(ctx, lm_text, hidden=True, tick=tick):
        for u in range(ctx.num_units):
            total, n = measure(b.hidden[u], b.hidden[u + 1], b)
            sums[u] += total
        count += n
    return (sums / max(count, 1)).tolist()


def lowest_units(ctx: ScoreContext, values: list[float]) -> MethodResult:
    """The candidates' values as scores; the budget removes the lowest."""
    scores = [values[u] if u in ctx.candidates else None for u in range(ctx.num_units)]
    return MethodResult(scores, ctx.remove_lowest(scores))


class BlockInfluence(ScoringMethod):
    """ShortGPT: BI_i = 1 - mean over tokens of cos(h_i, h_{i+1}); remove the lowest. At sublayer
    granularity the same of each attention and MLP sublayer: its input vs its output residual
    stream (the LayerNorm goes with its sublayer)."""

    name = "block_influence"
    summary = "ShortGPT: 1 - cosine(input, output) of each block (or sublayer)"

    def params(self, ctx: ScoreContext) -> dict[str, Any]:
        return {"mode": "text", "max_length": ctx.max_length}

    def score(self, ctx: ScoreContext) -> MethodResult:
        def one_minus_cos(h_in, h_out, batch):
            valid = batch.inputs["attention_mask"].bool()
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            return float((1 - cos)[valid].double().sum()), int(valid.sum())

        return lowest_units(ctx, per_unit_mean(ctx, "block influence", one_minus_cos))


class WhatMatters(BlockInfluence):
    """He et al. 2024, "What Matters in Transformers? Not All Attention Is Needed" (LLM-Drop,
    layer_drop.py with layer_drop_norm): importance of each attention / MLP sublayer = 1 - mean
    over tokens of cos(its input residual stream, input + its output), one-shot, on generic text
    (they calibrate on C4; here WikiText-2 paragraphs, as many as the task's samples, as `sleb`
    does). The same measure as `block_influence` at sublayer granularity, on generic text instead
    of the task's."""

    name = "what_matters"
    summary = "What Matters (He et al.): 1 - cosine(input, output) of each sublayer on WikiText-2"
    sublayer_only = True

    def params(self, ctx: ScoreContext) -> dict[str, Any]:
        from tabp_vllm.scoring.perplexity import WIKITEXT_SPLIT

        return {**super().params(ctx), "calibration_text": f"wikitext2 {WIKITEXT_SPLIT}"}

    def score(self, ctx: ScoreContext) -> MethodResult:
        from tabp_vllm.scoring.perplexity import on_wikitext

        return on_wikitext(ctx, super().score)


class Angular(ScoringMethod):
    """Gromov et al.: d(l, n) = arccos(cos(h_l, h_{l+n}))/pi on the last token, n = k; remove the
    contiguous run l .. l+n-1 (inside the candidate range) with the smallest mean distance.

    At sublayer granularity a contiguous run of units would mix attention and MLP sublayers of
    neighbouring blocks; the distance is taken across each sublayer alone (n = 1: its input vs
    output residual stream at the last token) and the lowest go, which ranks every budget."""

    name = "angular"
    summary = "Gromov et al.: contiguous run of k blocks with the least angular distance"
    ranks_all_k = False  # compares h_l with h_{l+k}: every k needs its own run

    def ranks(self, params: dict[str, Any]) -> bool:
        return params.get("granularity") == "sublayer"

    def params(self, ctx: ScoreContext) -> dict[str, Any]:
        return {"mode": "text", "max_length": ctx.max_length}

    @torch.no_grad()
    def score(self, ctx: ScoreContext) -> MethodResult:
        if ctx.granularity == "sublayer":
            return self.score_units(ctx)
        B, n = ctx.num_blocks, ctx.k
        sums = torch.zeros(B + 1, dtype=torch.float64)
        N = 0
        tick = ctx.task("angular distance", ctx.num_batches())
        for b in forward_batches(ctx, lm_text, hidden=True, tick=tick):
            hs = b.hidden
            for l in range(0, B - n + 1):
                cos = torch.nn.functional.cosine_similarity(hs[l][:, -1].float(), hs[l + n][:, -1].float(),
                                                            dim=-1)
                sums[l] += float((torch.arccos(cos.clamp(-1, 1)) / math.pi).double().sum())
            N += b.inputs["input_ids"].shape[0]
        cand = set(ctx.candidates)
        scores: list[float | None] = [None] * B
        for l in range(0, B - n + 1):
            if all(j in cand for j in range(l, l + n)):
                scores[l] = float(sums[l] / max(N, 1))
        starts = [l for l in range(B) if scores[l] is not None]
        if not starts:
            return MethodResult(scores, LastK().score(ctx).removed)
        best = min(starts, key=lambda l: (scores[l], l))
        return MethodResult(scores, list(range(best, best + n)))

    def score_units(self, ctx: ScoreContext) -> MethodResult:
        def angle_at_last_token(h_in, h_out, batch):
            cos = torch.nn.functional.cosine_similarity(h_in[:, -1].float(), h_out[:, -1].float(),
                                                        dim=-1)
            return float((torch.arccos(cos.clamp(-1, 1)) / math.pi).double().sum()), len(cos)

        return lowest_units(ctx, per_unit_mean(ctx, "angular distance", angle_at_last_token))
