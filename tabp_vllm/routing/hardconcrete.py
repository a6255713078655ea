"""Hard-Concrete gates (Louizos et al. 2018) as CoFi / Sheared-LLaMA use them, one gate per unit.

    u ~ U(0, 1)
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
    z = clamp(s * (r - l) + l, 0, 1)                  beta = 2/3, l = -0.1, r = 1.1
    E[L0] = P(z != 0) = sigmoid(log_alpha - beta * log(-l / r))

log_alpha is clamped to +-LOG_ALPHA_LIMIT (6; CoFi's 4.6 cannot reach the budget, see below) after
every step; gates start open. Sparsity enters as a
Lagrangian lambda1 (s_hat - t) + lambda2 (s_hat - t)^2 (lambdas by gradient ascent, the target t
warmed up linearly); the final, deterministic mask removes the k blocks of lowest log_alpha.
Pure torch: no model in here.
"""

from __future__ import annotations

import math

import torch

BETA = 2.0 / 3.0
LIMIT_L = -0.1
LIMIT_R = 1.1
# CoFi / Sheared-LLaMA clamp at +-4.6; at -4.6 a gate still has P(z != 0) = 0.047, so k closed
# gates give only 0.953 k of expected sparsity and the budget s_hat = k / n cannot be met without
# pulling the kept gates down against the loss (our fits stalled 0.016 short of the target on a
# toy stack). At -6, P(z != 0) = 0.012: the budget is reachable with the kept gates open.
LOG_ALPHA_LIMIT = 6.0
EPS = 1e-6  # keeps log u and log(1 - u) finite


def sample(log_alpha: torch.Tensor, generator: torch.Generator | None = None,
           u: torch.Tensor | None = None) -> torch.Tensor:
    """One stochastic gate value z in [0, 1] per log_alpha (differentiable in log_alpha); `u`
    gives the uniform noise explicitly (tests), otherwise it is drawn from `generator`."""
    if u is None:
        u = torch.rand(log_alpha.shape, generator=generator, dtype=log_alpha.dtype,
                       device=log_alpha.device)
    u = u.clamp(EPS, 1 - EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)


def expected_l0(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z != 0) per gate: the expected share of the block that stays."""
    return torch.sigmoid(log_alpha - BETA * math.log(-LIMIT_L / LIMIT_R))


def expected_sparsity(log_alpha: torch.Tensor) -> torch.Tensor:
    """s_hat: the expected share of gated blocks removed."""
    return 1.0 - expected_l0(log_alpha).mean()


def expected_removed(log_alpha: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i P(z_i = 0): what closing gates is expected to remove, each unit weighted (with
    `weights` each unit's share of the dense model's FLOPs: the expected removed FLOPs share)."""
    return (weights * (1.0 - expected_l0(log_alpha))).sum()


def lagrangian(s_hat: torch.Tensor, target: float, lambda1: torch.Tensor,
               lambda2: torch.Tensor) -> torch.Tensor:
    """lambda1 (s_hat - t) + lambda2 (s_hat - t)^2: minimised by the gates, maximised by the lambdas."""
    gap = s_hat - target
    return lambda1 * gap + lambda2 * gap * gap


def target_at(step: int, final: float, warmup_steps: int, start: float = 0.0) -> float:
    """The sparsity target t at `step` (0-based): linear from `start` to `final` over
    `warmup_steps`."""
    if warmup_steps <= 0:
        return final
    return start + (final - start) * min(1.0, (step + 1) / warmup_steps)


@torch.no_grad()
def clamp_(log_alpha: torch.Tensor) -> torch.Tensor:
    return log_alpha.clamp_(-LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT)


def deterministic_removed(log_alpha: torch.Tensor | list[float], gated: list[int], k: int) -> list[int]:
    """The k gated blocks of lowest log_alpha (ties: the lower block index), sorted: the budget
    exactly, whatever the gates converged to. `log_alpha[j]` is the gate of block `gated[j]`."""
    values = [float(v) for v in (log_alpha.tolist() if torch.is_tensor(log_alpha) else log_alpha)]
    if len(values) != len(gated):
        raise ValueError(f"{len(values)} gates for {len(gated)} gated blocks")
    if not 0 <= k <= len(gated):
        raise ValueError(f"k = {k}: must be between 0 and the {len(gated)} gated blocks")
    ranked = sorted(range(len(gated)), key=lambda j: (values[j], gated[j]))
    return sorted(gated[j] for j in ranked[:k])
