"""Floors every method should beat: random blocks (seeded) and the last k blocks. No forward pass."""

from __future__ import annotations

import random

from tabp_vllm.scoring.base import MethodResult, ScoringMethod


class _Floor(ScoringMethod):
    """A floor ranks the candidates by a rule of its own, without looking at the model."""

    def forward_passes(self, samples: int, candidates: int, k: int) -> int:
        return 0

    def candidate_scores(self, ctx) -> list[float]:
        raise NotImplementedError

    def score(self, ctx) -> MethodResult:
        scores: list[float | None] = [None] * ctx.num_units
        for u, value in zip(ctx.candidates, self.candidate_scores(ctx)):
            scores[u] = value
        return MethodResult(scores, ctx.remove_lowest(scores))


class RandomBlocks(_Floor):
    name = "random"
    summary = "floor: k seeded random blocks"

    def candidate_scores(self, ctx) -> list[float]:
        rng = random.Random(ctx.seed)
        return [rng.random() for _ in ctx.candidates]


class LastK(_Floor):
    """The last k candidates before the final block, which Gromov et al.'s heuristic keeps (it
    maps the residual stream to the head's input); the final block goes last of all. At sublayer
    granularity the same order over units (the later unit first, the final block's units last)."""

    name = "last_k"
    summary = "floor: the last k candidate blocks, the final block kept"

    def candidate_scores(self, ctx) -> list[float]:
        per_block = ctx.num_units // ctx.num_blocks
        final_block, last = ctx.num_blocks - 1, ctx.num_units - 1
        return [float(ctx.num_units if u // per_block == final_block else last - u)
                for u in ctx.candidates]
