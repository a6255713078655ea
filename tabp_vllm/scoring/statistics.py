"""Statistics of an early-exit distribution, computed from log-probabilities.

Every function takes `logp` of shape (..., V) (log-softmax; -inf marks tokens outside the support,
e.g. a 3-choice item padded to 4 options) and returns one value per row (...). Divergences compare
to the final layer's distribution `ref` (also log-probs): KL(final || layer), JS, and the cross
entropy CE(final, layer) = -sum p_final log p_layer.

ALPHA gives each statistic's desirable direction: -1 where lower is better, +1 where higher is.
"""

from __future__ import annotations

import torch

NEG = -1e30  # finite stand-in for log(0) in products


def _p(logp: torch.Tensor) -> torch.Tensor:
    return logp.exp()


def _finite(logp: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))


def entropy(logp: torch.Tensor, **_) -> torch.Tensor:
    p = _p(logp)
    return -(p * _finite(logp)).sum(-1)


def top1(logp: torch.Tensor, **_) -> torch.Tensor:
    return _p(logp).max(-1).values


def gap(logp: torch.Tensor, **_) -> torch.Tensor:
    t = _p(logp).topk(2, dim=-1).values
    return t[..., 0] - t[..., 1]


def gold(logp: torch.Tensor, gold: torch.Tensor | None = None, **_) -> torch.Tensor:
    if gold is None:
        raise ValueError("the 'gold' statistic needs gold answers")
    return _p(logp).gather(-1, gold.unsqueeze(-1)).squeeze(-1)


def kl(logp: torch.Tensor, ref: torch.Tensor | None = None, **_) -> torch.Tensor:
    """KL(ref || logp): terms with p_ref = 0 contribute 0."""
    pr = _p(ref)
    diff = torch.where(pr > 0, _finite(ref) - logp.clamp_min(NEG), torch.zeros_like(pr))
    return (pr * diff).sum(-1)


def ce(logp: torch.Tensor, ref: torch.Tensor | None = None, **_) -> torch.Tensor:
    pr = _p(ref)
    return -(torch.where(pr > 0, pr * logp.clamp_min(NEG), torch.zeros_like(pr))).sum(-1)


def js(logp: torch.Tensor, ref: torch.Tensor | None = None, **_) -> torch.Tensor:
    p, q = _p(logp), _p(ref)
    m = 0.5 * (p + q)
    logm = torch.log(m.clamp_min(1e-45))

    def part(a, loga):
        return torch.where(a > 0, a * (loga.clamp_min(NEG) - logm), torch.zeros_like(a)).sum(-1)

    return 0.5 * part(p, logp) + 0.5 * part(q, ref)


STATISTICS = {"entropy": entropy, "top1": top1, "gold": gold, "gap": gap,
              "kl": kl, "js": js, "ce": ce}
ALPHA = {"entropy": -1, "top1": 1, "gold": 1, "gap": 1, "kl": -1, "js": -1, "ce": -1}
