"""Floors every method should beat: random blocks (seeded) and the last k blocks. No forward pass."""

from __future__ import annotations

import random

from tabp_vllm.scoring.base import MethodResult, ScoringMethod, lowest


class _Floor(ScoringMethod):
    """A floor ranks the candidates by a rule of its own, without looking at the model."""

    def forward_passes(self, samples: int, candidates: int, k: int) -> int:
        return 0

    def candidate_scores(self, ctx) -> list[float]:
        raise NotImplementedError

    def score(self, ctx) -> MethodResult:
        scores: list[float | None] = [None] * ctx.num_blocks
        for i, value in zip(ctx.candidates, self.candidate_scores(ctx)):
            scores[i] = value
        return MethodResult(scores, lowest(scores, ctx.candidates, ctx.k))


class RandomBlocks(_Floor):
    name = "random"
    summary = "floor: k seeded random blocks"

    def candidate_scores(self, ctx) -> list[float]:
        rng = random.Random(ctx.seed)
        return [rng.random() for _ in ctx.candidates]


class LastK(_Floor):
    """The last k candidates before the final block, which Gromov et al.'s heuristic keeps (it
    maps the residual stream to the head's input); the final block goes last of all."""

    name = "last_k"
    summary = "floor: the last k candidate blocks, the final block kept"

    def candidate_scores(self, ctx) -> list[float]:
        final = ctx.num_blocks - 1
        return [float(ctx.num_blocks if i == final else final - i) for i in ctx.candidates]
