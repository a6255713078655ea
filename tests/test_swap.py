"""The swap search that polishes an L0 mask (`routing/swap.py`): on toy losses whose optimum is
found by brute force, the L0 fit with route fit's defaults locks in a wrong unit (a gate closed
during the ramp is never reopened) and the search from its mask recovers the optimum; from an
optimal mask it costs exactly one scan; swaps keep a FLOPs budget; the cap and bad input are
reported. Pure torch, no LLM."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from tabp_vllm.routing.l0 import GateSettings, train_gates
from tabp_vllm.routing.options import LAMBDA_LR, LAMBDA_P, LR, MULTIPLIER, STEPS, WARMUP
from tabp_vllm.routing.swap import swap_search

N, K, D = 28, 4, 16  # shaped like the demo model's fit: 28 candidate blocks, k = 4


def graded_toy(seed: int):
    """A residual stack h + z_j tanh(h W_j) of N units of graded use (W_j scaled 0.05 .. 1,
    shuffled; the interactions through tanh make the cheapest k units not simply the k smallest
    scales). Returns the fit's loss (squared error to the ungated stack on a batch cycle) and the
    exact cost of a set of removed units, vectorised over many sets for the brute force."""
    scale = torch.linspace(0.05, 1.0, N)[torch.randperm(N, generator=torch.Generator().manual_seed(100 + seed))]
    g = torch.Generator().manual_seed(seed)  # (test_l0.py's graded toy, drawn the same way)
    W = torch.stack([torch.randn(D, D, generator=g) / D ** 0.5 * scale[j] for j in range(N)])
    X = torch.randn(256, D, generator=g)

    def run(x, z):  # z: (N,) or (M, N) gates
        h = x if z.dim() == 1 else x.expand(z.shape[0], *x.shape)
        for j in range(N):
            gate = z[j] if z.dim() == 1 else z[:, j, None, None]
            h = h + gate * torch.tanh(h @ W[j])
        return h

    dense = run(X, torch.ones(N))

    def loss_of(step, z):
        b = (step * 32) % 256
        return ((run(X[b:b + 32], z) - dense[b:b + 32]) ** 2).mean()

    def costs(masks: list[tuple[int, ...]]) -> list[float]:
        out = []
        with torch.no_grad():
            for s in range(0, len(masks), 2048):
                chunk = masks[s:s + 2048]
                z = torch.ones(len(chunk), N)
                for i, m in enumerate(chunk):
                    z[i, list(m)] = 0
                out += ((run(X, z) - dense) ** 2).mean((1, 2)).tolist()
        return out

    return loss_of, lambda removed: costs([tuple(removed)])[0], costs


@functools.lru_cache(maxsize=None)
def brute_force(seed: int) -> tuple[list[int], float]:
    """The optimal k-unit mask of the toy and its cost, over all C(28, 4) = 20,475 masks."""
    costs = graded_toy(seed)[2]
    every = list(itertools.combinations(range(N), K))
    values = costs(every)
    best = min(range(len(every)), key=values.__getitem__)
    return list(every[best]), values[best]


# route fit's defaults (options.py): cap 300, the target rising over half of it
DEFAULTS = GateSettings(max_steps=STEPS, lr=LR, lambda_lr=LAMBDA_LR[MULTIPLIER], init_log_alpha=3.0,
                        warmup_steps=round(WARMUP * STEPS), multiplier=MULTIPLIER, lambda_p=LAMBDA_P)


@pytest.mark.parametrize("seed", [3, 4])
def test_l0_locks_in_a_wrong_unit_and_the_search_recovers_the_optimum(seed):
    loss_of, cost, _ = graded_toy(seed)
    optimum, least = brute_force(seed)
    fit = train_gates(loss_of, N, K, DEFAULTS, seed)
    # the trap is real: the fit converges by its own criteria to a mask that is not the optimum
    assert fit.converged and fit.removed != optimum
    assert cost(fit.removed) > least * 1.05
    res = swap_search(cost, fit.removed, range(N), dict(enumerate(fit.log_alpha)))
    assert res.removed == optimum and res.local_optimum
    assert res.loss_after == pytest.approx(least) and res.loss_before == pytest.approx(cost(fit.removed))
    assert 1 <= len(res.swaps) <= 2
    # each swap put back a unit the fit removed and took one it kept
    for back, out in res.swaps:
        assert back in fit.removed and out not in fit.removed
    # the cost: at most one scan per swap plus the scan that proves the local optimum
    scan = K * (N - K)
    assert res.evaluations <= 1 + (len(res.swaps) + 1) * scan


def test_an_optimal_mask_costs_one_scan_and_stays():
    cost = graded_toy(3)[1]
    optimum = brute_force(3)[0]
    res = swap_search(cost, optimum, range(N))
    assert res.removed == optimum and res.swaps == [] and res.local_optimum
    assert res.evaluations == 1 + K * (N - K)
    rec = res.record()
    assert rec["kind"] == "swap" and rec["loss_before"] == rec["loss_after"] and rec["local_optimum"]


def additive(weights: dict[int, float]):
    calls: list[list[int]] = []

    def cost(removed):
        calls.append(list(removed))
        return sum(weights[u] for u in removed)
    return cost, calls


def test_swaps_are_tried_in_the_gates_order_of_doubt():
    # units 0..5; the mask removes 0 and 1; unit 1's gate is the least sure removal (highest
    # log_alpha among removed), unit 4's the least sure keep: that pair is tried first
    cost, calls = additive({0: 0.0, 1: 5.0, 2: 9.0, 3: 9.0, 4: 1.0, 5: 1.0})
    doubt = {0: -6.0, 1: -1.0, 2: 6.0, 3: 6.0, 4: 0.0, 5: 2.0}
    res = swap_search(cost, [0, 1], range(6), doubt)
    assert calls[1] == [0, 4]  # the first swap tried: 1 back, 4 out
    assert res.removed == [0, 4] and res.swaps == [(1, 4)] and res.local_optimum


def test_a_flops_budget_swaps_only_units_of_equal_share():
    # sublayer-like shares: even units (attention) 1.0, odd units (MLP) 2.0; the cheapest to remove
    # is an attention unit, but the mask holds an MLP: it may only trade it for another MLP
    weights = {0: 0.1, 1: 3.0, 2: 0.2, 3: 1.0, 4: 5.0, 5: 2.0}
    shares = {u: 1.0 if u % 2 == 0 else 2.0 for u in weights}
    cost, _ = additive(weights)
    res = swap_search(cost, [1, 4], range(6), shares=shares)
    assert res.removed == [0, 3] and res.local_optimum
    assert sum(shares[u] for u in res.removed) == sum(shares[u] for u in [1, 4])


def test_the_cap_stops_the_search_and_says_so():
    cost, _ = additive({u: float(10 - u) for u in range(10)})  # the optimum removes 8, 9
    res = swap_search(cost, [0, 1], range(10), max_swaps=1)
    assert len(res.swaps) == 1 and not res.local_optimum and res.loss_after < res.loss_before
    full = swap_search(cost, [0, 1], range(10))
    assert full.removed == [8, 9] and full.local_optimum


def test_removed_units_outside_the_candidates_are_refused():
    with pytest.raises(ValueError, match="not candidates"):
        swap_search(lambda r: 0.0, [0, 7], range(1, 5))
