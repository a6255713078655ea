"""TaBP aggregation: per-sample shifts of a statistic across each block, reduced to one score."""

from __future__ import annotations

import torch


def shifts(stats: torch.Tensor) -> torch.Tensor:
    """stats (N, B+1): s_0 (embeddings) .. s_B; returns d (N, B) with d_i = s_{i+1} - s_i."""
    return stats[:, 1:] - stats[:, :-1]


def ddf(d: torch.Tensor, alpha: int) -> torch.Tensor:
    """Directional desirable frequency: share of samples whose shift goes the desirable way."""
    return ((alpha * d) > 0).double().mean(0)


def ssn(d: torch.Tensor, p: float = 1.0) -> torch.Tensor:
    """Statistical shift norm: (mean |d|^p)^(1/p)."""
    return (d.double().abs().pow(p).mean(0)).pow(1.0 / p)


def aggregate(d: torch.Tensor, how: str, alpha: int, p: float = 1.0) -> torch.Tensor:
    if how == "ddf":
        return ddf(d, alpha)
    if how == "ssn":
        return ssn(d, p)
    raise ValueError(f"unknown aggregate {how!r} (ddf or ssn)")
