"""Similarity baselines: how little a block changes the hidden state (Block Influence, ShortGPT)
and the angular distance across a run of blocks (Gromov et al.)."""

from __future__ import annotations

import math
from typing import Any

import torch

from tabp_vllm.scoring.base import MethodResult, ScoringMethod, lowest
from tabp_vllm.scoring.floors import LastK
from tabp_vllm.scoring.probe import ScoreContext, forward_batches, lm_text


class BlockInfluence(ScoringMethod):
    """ShortGPT: BI_i = 1 - mean over tokens of cos(h_i, h_{i+1}); remove the lowest."""

    name = "block_influence"
    summary = "ShortGPT: 1 - cosine(input, output) of each block"

    def params(self, ctx: ScoreContext) -> dict[str, Any]:
        return {"mode": "text", "max_length": ctx.max_length}

    @torch.no_grad()
    def score(self, ctx: ScoreContext) -> MethodResult:
        B = ctx.num_blocks
        sums = torch.zeros(B, dtype=torch.float64)
        count = 0
        tick = ctx.task("block influence", ctx.num_batches())
        for b in forward_batches(ctx, lm_text, hidden=True, tick=tick):
            hs = b.hidden
            valid = b.inputs["attention_mask"].bool()
            for i in range(B):
                cos = torch.nn.functional.cosine_similarity(hs[i].float(), hs[i + 1].float(), dim=-1)
                sums[i] += float((1 - cos)[valid].double().sum())
            count += int(valid.sum())
        bi = (sums / max(count, 1)).tolist()
        scores = [bi[i] if i in ctx.candidates else None for i in range(B)]
        return MethodResult(scores, lowest(scores, ctx.candidates, ctx.k))


class Angular(ScoringMethod):
    """Gromov et al.: d(l, n) = arccos(cos(h_l, h_{l+n}))/pi on the last token, n = k; remove the
    contiguous run l .. l+n-1 (inside the candidate range) with the smallest mean distance."""

    name = "angular"
    summary = "Gromov et al.: contiguous run of k blocks with the least angular distance"
    ranks_all_k = False  # compares h_l with h_{l+k}: every k needs its own run

    def params(self, ctx: ScoreContext) -> dict[str, Any]:
        return {"mode": "text", "max_length": ctx.max_length}

    @torch.no_grad()
    def score(self, ctx: ScoreContext) -> MethodResult:
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
