"""Floors every method should beat: random blocks (seeded) and the last k blocks. No forward pass."""

from __future__ import annotations

import random

from tabp_vllm.scoring.base import MethodResult, ScoringMethod, lowest


class RandomBlocks(ScoringMethod):
    name = "random"
    summary = "floor: k seeded random blocks"

    def forward_passes(self, samples: int, candidates: int, k: int) -> int:
        return 0

    def score(self, ctx) -> MethodResult:
        rng = random.Random(ctx.seed)
        scores: list[float | None] = [None] * ctx.num_blocks
        for i in ctx.candidates:
            scores[i] = rng.random()
        return MethodResult(scores, lowest(scores, ctx.candidates, ctx.k))


class LastK(ScoringMethod):
    name = "last_k"
    summary = "floor: the last k candidate blocks"

    def forward_passes(self, samples: int, candidates: int, k: int) -> int:
        return 0

    def score(self, ctx) -> MethodResult:
        scores: list[float | None] = [None] * ctx.num_blocks
        for i in ctx.candidates:
            scores[i] = float(ctx.num_blocks - i)  # later blocks score lower: removed first
        return MethodResult(scores, sorted(ctx.candidates)[-ctx.k:])
