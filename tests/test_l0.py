"""The L0 gate trainer (`routing/l0.py`) on a toy gated stack whose optimal gates are known: some
units contribute exactly nothing, so the fit must close exactly those, meet the sparsity target
and say it converged; a fit stopped too early must say it did not. Pure torch, no LLM."""

from __future__ import annotations

import pytest
import torch

from tabp_vllm.routing import hardconcrete as hc
from tabp_vllm.routing.l0 import (DECIDED_MARGIN, SPARSITY_TOL, GateSettings, flat, margin,
                                  train_gates)

USELESS = (1, 4, 6)


def toy_loss(n=8, useless=USELESS, d=16, seed=0):
    """A residual stack h + z_j tanh(h W_j); units in `useless` have W_j = 0. Loss: the squared
    error to the ungated stack's output on a fixed batch cycle."""
    g = torch.Generator().manual_seed(seed)
    W = [torch.randn(d, d, generator=g) / d ** 0.5 * (0.0 if j in useless else 1.0) for j in range(n)]
    X = torch.randn(256, d, generator=g)

    def run(x, z):
        h = x
        for j in range(n):
            h = h + z[j] * torch.tanh(h @ W[j])
        return h

    dense = run(X, torch.ones(n))

    def loss_of(step, z):
        b = (step * 32) % 256
        return ((run(X[b:b + 32], z) - dense[b:b + 32]) ** 2).mean()

    return loss_of


SETTINGS = GateSettings(max_steps=400, lr=0.2, lambda_lr=0.2, init_log_alpha=3.0, warmup_steps=40)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_the_useless_units_and_meets_the_target(seed):
    fit = train_gates(toy_loss(seed=seed), 8, 3, SETTINGS, seed)
    assert fit.converged and fit.failed == []
    assert fit.removed == sorted(USELESS)
    assert 40 <= fit.steps < SETTINGS.max_steps  # stopped at convergence, after the warm-up
    assert abs(fit.final["expected_sparsity"] - 3 / 8) <= SPARSITY_TOL
    assert fit.final["margin"] >= DECIDED_MARGIN
    # the gates say what the mask does: the removed ones are (nearly) closed, the others open
    p = hc.expected_l0(torch.tensor(fit.log_alpha))
    assert max(p[j] for j in USELESS) < 0.3 < 0.8 < min(p[j] for j in range(8) if j not in USELESS)
    # curves: one value per step, the target reached after the warm-up
    assert all(len(v) == fit.steps for v in fit.curves.values())
    assert fit.curves["target"][-1] == pytest.approx(3 / 8)
    assert fit.final["lambda1"] == pytest.approx(fit.curves["lambda1"][-1], abs=1e-5)


def test_a_fit_stopped_early_says_it_did_not_converge():
    short = GateSettings(max_steps=24, lr=0.1, lambda_lr=0.05, init_log_alpha=3.0, warmup_steps=12)
    fit = train_gates(toy_loss(), 8, 3, short, 0)
    assert not fit.converged and fit.steps == 24
    assert "on budget" in fit.failed  # 24 steps at the old rates never reach the target
    assert fit.final["expected_sparsity"] < 3 / 8 - SPARSITY_TOL


def test_criteria_pieces():
    # margin: min kept P(z != 0) - max removed; a tie is undecided
    assert margin(torch.tensor([-6.0, -6.0, 6.0, 6.0]), 2) > 0.95
    assert margin(torch.tensor([0.0, 0.0, 0.0, 0.0]), 2) == 0.0
    # flat: the last window's mean within 5 % of the one before, and enough steps seen
    assert flat([1.0] * 20, 10) and not flat([1.0] * 19, 10)
    assert not flat([2.0] * 10 + [1.0] * 10, 10) and flat([1.0] * 10 + [1.04] * 10, 10)
