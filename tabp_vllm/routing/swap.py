"""Polishing a learned mask by single swaps on the fit's own loss (`route fit --polish swap`).

    result = swap_search(cost, removed=[3, 4, 5, 7], candidates=range(1, 29), doubt=log_alpha)

Why: an L0 fit decides its mask while the sparsity target ramps up. A gate closed then sits at
the log_alpha clamp, samples z = 0 ~99 % of the time and gets almost no gradient, so it is never
reopened, even where keeping it and removing another unit costs less: in routing report v2 every
N = 1 L0 mask ended with a higher KL to dense on its own calibration inputs than Block
Influence's static mask ("The learned masks on their own objective"). The search takes the
deterministic mask and exchanges one removed unit for one kept unit while that lowers the loss the
gates were trained on, measured exactly (every calibration input, no sampled gates); it stops at a
mask that no single swap improves (a 1-swap local optimum) or after `max_swaps` swaps.

Swaps are tried in the gates' order of doubt, the pair whose log_alphas the fit separated least
first (kept unit's log_alpha minus removed unit's, ascending), and the first one that lowers the
loss is taken: a fit that was nearly right costs one scan of k x (n - k) evaluations. Each swap
keeps the budget: k units stay k; under a FLOPs budget only units of the same FLOPs share swap, so
the mask removes exactly the share the cut gave it. Model-agnostic: `cost(removed)` is any loss of
a set of removed units (the routing fit passes the KL or LM loss of the pruned model summed over
the cluster's inputs; the unit tests a function whose optimum is known).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

REL_TOL = 1e-6  # a swap must lower the loss by more than this share of it (not float noise)
MAX_SWAPS = 16


@dataclass
class SwapResult:
    removed: list[int]  # the polished mask's units, sorted
    loss_before: float
    loss_after: float
    swaps: list[tuple[int, int]] = field(default_factory=list)  # (unit put back, unit removed)
    evaluations: int = 0  # distinct masks whose loss was measured, the start included
    local_optimum: bool = False  # no single swap lowers the loss (False: stopped at max_swaps)
    wall_s: float = 0.0

    def record(self) -> dict:
        return {"kind": "swap", "loss_before": round(self.loss_before, 6),
                "loss_after": round(self.loss_after, 6), "swaps": [list(s) for s in self.swaps],
                "evaluations": self.evaluations, "local_optimum": self.local_optimum,
                "wall_s": round(self.wall_s, 3)}


def swap_search(cost: Callable[[list[int]], float], removed: Iterable[int],
                candidates: Iterable[int], doubt: dict[int, float] | None = None,
                shares: dict[int, float] | None = None, max_swaps: int = MAX_SWAPS,
                tick: Callable[[int], None] | None = None) -> SwapResult:
    """First-improvement single-swap search from `removed` over `candidates` on `cost`.
    `doubt`: each unit's final log_alpha (the order swaps are tried in; default: by index);
    `shares`: each unit's FLOPs share under a FLOPs budget (only equal shares swap)."""
    t0 = time.perf_counter()
    doubt = doubt or {}
    candidates = sorted(set(candidates))
    now = sorted(set(removed))
    if not set(now) <= set(candidates):
        raise ValueError(f"removed units {sorted(set(now) - set(candidates))} are not candidates")
    seen: dict[tuple[int, ...], float] = {}

    def loss(units: list[int]) -> float:
        key = tuple(sorted(units))
        if key not in seen:
            seen[key] = float(cost(list(key)))
            if tick:
                tick(1)
        return seen[key]

    def same_budget(out: int, back: int) -> bool:
        if shares is None:
            return True
        a, b = shares[out], shares[back]
        return abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1e-12)

    start = best = loss(now)
    swaps: list[tuple[int, int]] = []
    local_optimum = False
    while len(swaps) < max_swaps:
        kept = [u for u in candidates if u not in now]
        pairs = sorted(((r, a) for r in now for a in kept if same_budget(r, a)),
                       key=lambda p: (doubt.get(p[1], 0.0) - doubt.get(p[0], 0.0), p))
        for r, a in pairs:
            trial = sorted([u for u in now if u != r] + [a])
            value = loss(trial)
            if value < best - REL_TOL * abs(best):
                now, best = trial, value
                swaps.append((r, a))
                break
        else:
            local_optimum = True
            break
    return SwapResult(now, start, best, swaps, len(seen), local_optimum,
                      time.perf_counter() - t0)
