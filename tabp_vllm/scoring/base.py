"""The one shape of a block-scoring method.

A method is a small class: its `name`, a one-line `summary`, whether one scoring run ranks the
blocks for every k (`ranks_all_k`), its cost in sample-forward passes, the parameters it records in
the mask, and `score(ctx) -> MethodResult`. One family per file (tabp, similarity, perplexity,
floors); `registry.py` maps names to classes and is what the CLI, the benches and the tests read.

This module imports no torch: the CLI lists methods without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from tabp_vllm.scoring.probe import ScoreContext


@dataclass
class MethodResult:
    """`scores[i]` is block i's importance (higher = keep), None outside the candidate range (or not
    scored); `removed` are the k blocks the method takes out; `params` are values the run itself
    produced that the mask records (e.g. SLEB's removal order)."""

    scores: list[float | None]
    removed: list[int]
    params: dict[str, Any] = field(default_factory=dict)


def lowest(scores: list[float | None], candidates: list[int], k: int) -> list[int]:
    """The k candidates with the lowest scores (ties: the lower index), sorted."""
    ranked = sorted(candidates, key=lambda i: (scores[i], i))
    return sorted(ranked[:k])


class ScoringMethod:
    """Base of every scoring method; instances are stateless (the run's state is the context)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    # True: the scores rank the blocks, so one run at the largest k gives the mask of every
    # smaller k (`at_smaller_k`). False: the blocks removed depend on k (rerun per k).
    ranks_all_k: ClassVar[bool] = True

    def forward_passes(self, samples: int, candidates: int, k: int) -> int:
        """Sample-forward passes one run costs (one sample through the model once)."""
        return samples

    def params(self, ctx: ScoreContext) -> dict[str, Any]:
        """The method's own parameters, recorded in the mask beside k, range and seed."""
        return {}

    def score(self, ctx: ScoreContext) -> MethodResult:
        raise NotImplementedError

    def at_smaller_k(self, scores: list[float | None], params: dict[str, Any],
                     k: int) -> tuple[list[int], dict[str, Any]]:
        """(removed blocks, recorded params) of a run at `k`, from a run at a larger k that gave
        `scores` and `params` (only when `ranks_all_k`): the k lowest-scoring candidates."""
        lo, hi = params["candidate_range"]
        return lowest(scores, list(range(lo, hi)), k), {**params, "k": k}

    def __repr__(self) -> str:
        return f"<scoring method {self.name}>"
