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
    from tabp_vllm.scoring.units import Budget


@dataclass
class MethodResult:
    """`scores[u]` is unit u's importance (higher = keep; a unit is a block, or a sublayer at
    sublayer granularity: units.py), None outside the candidates (or not scored); `removed` are
    the units the method takes out (its budget: `ScoreContext.budget`); `params` are values the run itself
    produced that the mask records (e.g. SLEB's removal order)."""

    scores: list[float | None]
    removed: list[int]
    params: dict[str, Any] = field(default_factory=dict)


def ranked(scores: list[float | None], candidates: list[int]) -> list[int]:
    """The candidates, lowest score (the first to remove) first; ties: the lower index first."""
    return sorted(candidates, key=lambda i: (scores[i], i))


def lowest(scores: list[float | None], candidates: list[int], k: int) -> list[int]:
    """The k candidates with the lowest scores (ties: the lower index), sorted."""
    return sorted(ranked(scores, candidates)[:k])


class ScoringMethod:
    """Base of every scoring method; instances are stateless (the run's state is the context)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    # True: the scores rank the blocks, so one run at the largest k gives the mask of every
    # smaller k (`at_budget`). False: the blocks removed depend on k (rerun per k).
    ranks_all_k: ClassVar[bool] = True
    # True: the method scores sublayers only (needs --granularity sublayer).
    sublayer_only: ClassVar[bool] = False
    # True: it removes its candidates by their scores, every candidate scored (so a budget may
    # take them in another order of those scores: `Budget.ordered`). False: its own order
    # (SLEB's rounds, angular's runs of k).
    ranks_by_score: ClassVar[bool] = True
    # True: it keeps its progress per batch in `ctx.saves` (run_scoring's `checkpoint`) and goes
    # on from it (SLEB, PPL: hours on a deeper model on a CPU).
    resumable: ClassVar[bool] = False

    def forward_passes(self, samples: int, candidates: int, k: int) -> int:
        """Sample-forward passes one run costs (one sample through the model once)."""
        return samples

    def params(self, ctx: ScoreContext) -> dict[str, Any]:
        """The method's own parameters, recorded in the mask beside k, range and seed."""
        return {}

    def score(self, ctx: ScoreContext) -> MethodResult:
        raise NotImplementedError

    def ranks(self, params: dict[str, Any]) -> bool:
        """Whether a run with these recorded `params` ranks its units for every budget (a smaller
        budget is a prefix of its ranking)."""
        return self.ranks_all_k

    def ranking(self, scores: list[float | None], params: dict[str, Any]) -> list[int]:
        """The recorded run's removal order (only when `ranks`): its candidate units, lowest
        score first."""
        from tabp_vllm.scoring.units import recorded_candidates

        return ranked(scores, recorded_candidates(params))

    def at_budget(self, scores: list[float | None], params: dict[str, Any],
                  budget: Budget) -> tuple[list[int], dict[str, Any]]:
        """(removed units, recorded params) of a run at a smaller `budget`, from a run that gave
        `scores` and `params` (only when `ranks`): the shortest prefix of its ranking that meets
        the budget (taken in the budget's order)."""
        removed = budget.take(budget.ordered(self.ranking(scores, params), scores))
        kept = {k: v for k, v in params.items()
                if k not in ("flops_ratio", "removed_flops_fraction", "budget_order")}
        return sorted(removed), {**kept, "k": len(removed), **budget.record(removed)}

    def __repr__(self) -> str:
        return f"<scoring method {self.name}>"
