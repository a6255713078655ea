"""What a scoring run ranks and removes: whole blocks, or sublayer units (the attention and the MLP of
every block, 2L of them, unit 2*i block i's attention and 2*i+1 its MLP: tabp_vllm/sublayers.py),
which of them are candidates, and the budget that says how far down a ranking the removal goes.

A budget is a number of units (`k`) or a share of the dense model's ideal FLOPs (`flops_ratio`,
tabp_vllm/flops.py `removed_flops_fraction`: one decode step at flops.DECODE_CONTEXT keys, LM head
included, so 1 / (1 - fraction) is the ideal speedup). A FLOPs budget takes the lowest-ranked units
in order until the removed FLOPs reach the ratio: the smallest prefix of the ranking that reaches it,
so the overshoot is less than the last unit's own share, and never a skip down the ranking to fit
the budget more tightly (a unit is never removed ahead of a lower-scored one). Ties in score keep
the lower unit index first (base.lowest).

The order a FLOPs budget takes units in (`--budget-order`): `score`, the lowest score first, or
`score-per-flop`, the lowest score per FLOP removed first. A FLOPs budget is a knapsack (lose the
least importance for the FLOPs removed), and the lowest ratio first is its greedy answer; it needs
scores that are nonnegative importances on one scale (TaBP's SSN and DDF, 1 - cosine), and every
candidate scored, so it applies to the methods that rank by their scores (not SLEB's rounds nor
angular's runs).

This module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from tabp_vllm.errors import TabpError

GRANULARITIES = ("block", "sublayer")
UNIT_KINDS = ("attention", "mlp", "both")
BUDGET_ORDERS = ("score", "score-per-flop")
BUDGET_ORDER_HELP = ("The order a --flops-ratio budget removes units in: score (the lowest first) or "
                     "score-per-flop (the lowest score per FLOP removed first: the knapsack's "
                     "greedy order; methods that rank by nonnegative scores).")
# How a sublayer mask's 2L scores are laid out (recorded in the mask beside them).
UNIT_NUMBERING = "unit 2*i: block i's attention, unit 2*i+1: block i's MLP"


def candidate_units(blocks: list[int], granularity: str, units: str | None) -> list[int]:
    """The candidates a run ranks: the candidate blocks themselves, or, at sublayer granularity,
    the attention and/or MLP units of those blocks."""
    if granularity == "block":
        return list(blocks)
    from tabp_vllm.sublayers import unit_of

    kinds = ("attention", "mlp") if units in (None, "both") else (units,)
    return sorted(unit_of(i, kind) for i in blocks for kind in kinds)


def recorded_candidates(params: dict[str, Any]) -> list[int]:
    """The candidate units of a recorded run (its mask's params): a mask without `granularity`
    (every mask before sublayers) is a whole-block run."""
    lo, hi = params["candidate_range"]
    return candidate_units(list(range(lo, hi)), params.get("granularity", "block"),
                           params.get("units"))


def unit_flops_shares(config: dict[str, Any] | Any, granularity: str) -> list[float]:
    """Each unit's share of a dense decode step's ideal FLOPs: per block (its attention and MLP
    together) or per sublayer unit."""
    from tabp_vllm.flops import DecoderShape, removed_flops_fraction

    shape = DecoderShape.from_config(config)
    if granularity == "block":
        return [removed_flops_fraction(shape, {2 * i, 2 * i + 1})
                for i in range(shape.num_hidden_layers)]
    return [removed_flops_fraction(shape, {u}) for u in range(2 * shape.num_hidden_layers)]


@dataclass(frozen=True)
class Budget:
    """How much a run removes: `k` units, or units until their FLOPs shares (`shares`, one per
    unit) reach `flops_ratio`."""

    k: int | None = None
    flops_ratio: float | None = None
    shares: tuple[float, ...] = ()
    order: str = "score"  # BUDGET_ORDERS: which candidates a FLOPs budget takes first

    def removed_flops(self, removed: Iterable[int]) -> float:
        return sum(self.shares[u] for u in removed)

    def met(self, removed: Iterable[int]) -> bool:
        removed = list(removed)
        if self.k is not None:
            return len(removed) >= self.k
        # a hair under the ratio counts as reaching it: shares are floats summed in any order
        return self.removed_flops(removed) >= self.flops_ratio - 1e-12

    def take(self, order: list[int]) -> list[int]:
        """The removed units: the shortest prefix of `order` (lowest score first) that meets the
        budget."""
        taken: list[int] = []
        for u in order:
            if self.met(taken):
                break
            taken.append(u)
        return taken

    def ordered(self, ranking: list[int], scores: list[float | None]) -> list[int]:
        """The order the budget takes units in, from the run's `ranking` (lowest score first):
        that ranking, or its units by score per FLOP share (ties: the ranking's order)."""
        if self.order == "score":
            return ranking
        bad = next((u for u in ranking if scores[u] is None or scores[u] < 0), None)
        if bad is not None:
            raise TabpError(f"--budget-order {self.order}: unit {bad} scored {scores[bad]}; a score "
                            f"per FLOP needs every candidate scored with a nonnegative importance")
        return sorted(ranking, key=lambda u: scores[u] / self.shares[u])

    def record(self, removed: Iterable[int]) -> dict[str, Any]:
        """What the mask records of a FLOPs budget: the ratio asked, the share removed, and the
        order when it is not the default."""
        if self.flops_ratio is None:
            return {}
        return {"flops_ratio": self.flops_ratio,
                "removed_flops_fraction": round(self.removed_flops(removed), 6),
                **({"budget_order": self.order} if self.order != "score" else {})}


def check_order(order: str, flops_ratio: float | None) -> None:
    """One error line for an unknown budget order, or a per-FLOP order without a FLOPs budget."""
    if order not in BUDGET_ORDERS:
        raise TabpError(f"unknown --budget-order {order!r}: choose from {', '.join(BUDGET_ORDERS)}")
    if order != "score" and flops_ratio is None:
        raise TabpError(f"--budget-order {order} needs a --flops-ratio budget (with --k every unit "
                        f"counts one)")


def resolve_budget(k: int | None, ratio: float | None, flops_ratio: float | None,
                   num_units: int, candidates: list[int], shares: list[float],
                   what: str = "blocks", order: str = "score") -> Budget:
    """The run's budget from --k, --ratio (a share of all units) or --flops-ratio, taken in
    `order`; one error line when none or several are given, or when it would remove every unit or
    more than the candidates hold."""
    if sum(x is not None for x in (k, ratio, flops_ratio)) != 1:
        raise TabpError("give exactly one of --k, --ratio and --flops-ratio")
    check_order(order, flops_ratio)
    if flops_ratio is not None:
        if not 0 < flops_ratio < 1:
            raise TabpError(f"--flops-ratio {flops_ratio}: must be between 0 and 1")
        budget = Budget(flops_ratio=flops_ratio, shares=tuple(shares), order=order)
        if not budget.met(candidates):
            raise TabpError(f"--flops-ratio {flops_ratio}: the {len(candidates)} candidate {what} "
                            f"hold only {budget.removed_flops(candidates):.3f} of the FLOPs")
        # the most units any ranking can take: the cheapest first
        if len(budget.take(sorted(candidates, key=lambda u: shares[u]))) >= num_units:
            raise TabpError(f"--flops-ratio {flops_ratio}: would remove every one of the "
                            f"{num_units} {what}")
        return budget
    if ratio is not None:
        if not 0 < ratio < 1:
            raise TabpError(f"--ratio {ratio}: must be between 0 and 1")
        k = max(1, round(ratio * num_units))
    if k < 1 or k > len(candidates):
        raise TabpError(f"k = {k}: must be between 1 and the {len(candidates)} candidate {what}")
    if k >= num_units:
        raise TabpError(f"k = {k}: would remove every one of the {num_units} {what}")
    return Budget(k=k, shares=tuple(shares))


def to_mask_lists(removed: list[int], granularity: str) -> dict[str, list[int]]:
    """The removed units as the mask's three lists (a block whose attention and MLP both go is a
    removed block)."""
    if granularity == "block":
        return {"removed_layers": sorted(removed), "removed_attention": [], "removed_mlp": []}
    from tabp_vllm.sublayers import units_to_mask_lists

    layers, attention, mlp = units_to_mask_lists(removed)
    return {"removed_layers": layers, "removed_attention": attention, "removed_mlp": mlp}
