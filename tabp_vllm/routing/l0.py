"""Training Hard-Concrete gates to a sparsity budget, until the fit has converged.

    result = train_gates(loss_of, n_units=n, k=k, settings=GateSettings(...), seed=0)

Model-agnostic: `loss_of(step, z)` returns the task loss (a differentiable scalar) of the gated
model with gate values `z` (one per unit) on the step's batch; the routing fit (`fit.py`) passes
the KL or LM loss of the gated LLM, the unit tests a toy stack whose useless units are known.

The loss per step is task loss + lambda1 (s_hat - t) + lambda2 (s_hat - t)^2 (`hardconcrete.py`):
log_alpha by Adam (descent), the lambdas by Adam ascent (`ascent_optimizer`), the target t rising
linearly to k / n over the warm-up. After the warm-up, training stops at the first step where the
fit is **converged**, all three of:

- *on budget*: |s_hat - k/n| <= SPARSITY_TOL (the expected share of units removed is the target);
- *decided*: the deterministic mask (the k lowest log_alpha) removes the units the gates say:
  every removed unit's P(z != 0) is below every kept one's by at least DECIDED_MARGIN;
- *flat*: the task loss's mean over the last `window` steps differs from its mean over the
  `window` steps before by at most FLAT_TOL of the latter (window: whole passes over the
  batches, at least MIN_WINDOW steps).

A fit that reaches the step cap first is returned with `converged = False` and the criteria that
failed; callers say so (a warning and a flag in the router file), never silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from tabp_vllm.routing import hardconcrete as hc

SPARSITY_TOL = 0.01
DECIDED_MARGIN = 0.5
FLAT_TOL = 0.1
MIN_WINDOW = 10


def ascent_optimizer(lambdas: torch.Tensor, lr: float) -> torch.optim.Optimizer:
    """Adam ascent on the multipliers (lambda moves about lr per step). Plain gradient ascent
    (lambda moves lr x gap) was tried on the demo model at lr 5 and did worse: lambda1 wound up
    to -25 while the gates lagged, the expected sparsity swung to 0.39 and then every gate
    stuck open at the clamp (bench/results/routing/l0_study/, setting sgd-lam5). What tames the
    wind-up is a slow target: the warm-up (a share of --steps) lets the gates track it."""
    return torch.optim.Adam([lambdas], lr=lr, maximize=True)


def window_for(batches: int) -> int:
    """Steps per mean in the flatness check: at least MIN_WINDOW and a whole number of passes
    over the batches, so each window sees every batch about equally often."""
    return batches * max(1, -(-MIN_WINDOW // max(batches, 1)))


@dataclass(frozen=True)
class GateSettings:
    max_steps: int
    lr: float  # Adam, log_alpha
    lambda_lr: float  # Adam ascent, lambda1 and lambda2
    init_log_alpha: float
    warmup_steps: int  # the target reaches k / n at this step
    window: int = MIN_WINDOW  # steps per mean in the flatness check


@dataclass
class GateFit:
    log_alpha: list[float]
    removed: list[int]  # unit indices (0..n-1), the k lowest log_alpha
    steps: int
    converged: bool
    failed: list[str]  # criteria not met at the last step ("on budget", "decided", "flat")
    final: dict[str, float]  # expected sparsity, target, lambdas, loss (window mean), margin
    curves: dict[str, list[float]] = field(default_factory=dict)  # per step


def margin(log_alpha: torch.Tensor, k: int) -> float:
    """min P(z != 0) over the kept units - max over the k removed ones (1 = fully decided, < 0:
    the deterministic mask removes a unit the gates keep more of than one they keep)."""
    p = hc.expected_l0(log_alpha.detach()).sort().values
    if k == 0 or k == len(p):
        return 1.0
    return float(p[k] - p[k - 1])


def flat(losses: list[float], window: int) -> bool:
    if len(losses) < 2 * window:
        return False
    now = sum(losses[-window:]) / window
    before = sum(losses[-2 * window:-window]) / window
    return abs(now - before) <= FLAT_TOL * max(abs(before), 1e-8)


def unmet(s_hat: float, target: float, decided: float, losses: list[float], window: int) -> list[str]:
    failed = []
    if abs(s_hat - target) > SPARSITY_TOL:
        failed.append("on budget")
    if decided < DECIDED_MARGIN:
        failed.append("decided")
    if not flat(losses, window):
        failed.append("flat")
    return failed


def train_gates(loss_of: Callable[[int, torch.Tensor], torch.Tensor], n_units: int, k: int,
                settings: GateSettings, seed: int,
                tick: Callable[[int], None] | None = None) -> GateFit:
    """Gates on `n_units` units trained on `loss_of` until converged or `settings.max_steps`."""
    s = settings
    log_alpha = torch.full((n_units,), float(s.init_log_alpha), requires_grad=True)
    lambdas = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([log_alpha], lr=s.lr)
    ascent = ascent_optimizer(lambdas, s.lambda_lr)
    gen = torch.Generator().manual_seed(seed)
    target = k / n_units
    curves: dict[str, list[float]] = {key: [] for key in
                                      ("loss", "expected_sparsity", "target", "lambda1", "lambda2", "margin")}
    failed = ["on budget", "decided", "flat"]
    step = 0
    while step < s.max_steps:
        z = hc.sample(log_alpha, gen)
        task = loss_of(step, z)
        t = hc.target_at(step, target, s.warmup_steps)
        s_hat = hc.expected_sparsity(log_alpha)
        loss = task + hc.lagrangian(s_hat, t, lambdas[0], lambdas[1])
        opt.zero_grad()
        ascent.zero_grad()
        loss.backward()
        opt.step()
        ascent.step()
        hc.clamp_(log_alpha)
        step += 1
        with torch.no_grad():
            s_now = float(hc.expected_sparsity(log_alpha))
        m = margin(log_alpha, k)
        for key, v in (("loss", task.item()), ("expected_sparsity", s_now), ("target", t),
                       ("lambda1", lambdas[0].item()), ("lambda2", lambdas[1].item()), ("margin", m)):
            curves[key].append(float(v))
        if tick:
            tick(1)
        if step >= s.warmup_steps:
            failed = unmet(s_now, target, m, curves["loss"], s.window)
            if not failed:
                break
    w = min(s.window, len(curves["loss"])) or 1
    final = {"expected_sparsity": curves["expected_sparsity"][-1] if step else 0.0,
             "target": target,
             "lambda1": curves["lambda1"][-1] if step else 0.0,
             "lambda2": curves["lambda2"][-1] if step else 0.0,
             "loss": sum(curves["loss"][-w:]) / w if step else float("nan"),
             "margin": margin(log_alpha, k)}
    values = [float(v) for v in log_alpha.detach()]
    ranked = sorted(range(n_units), key=lambda j: (values[j], j))
    return GateFit(values, sorted(ranked[:k]), step, not failed, failed,
                   {key: round(v, 6) for key, v in final.items()}, curves)
