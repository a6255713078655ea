"""TaBP: per-sample statistics of the early-exit distribution after every block, their shifts
across each block, and the DDF / SSN aggregation of those shifts into one score per block."""

from __future__ import annotations

from typing import Any

import torch

from tabp_vllm.data import MCQAItem, mcqa_lettered_prompt
from tabp_vllm.errors import TabpError
from tabp_vllm.scoring import statistics as st
from tabp_vllm.scoring.base import MethodResult, ScoringMethod, lowest
from tabp_vllm.scoring.probe import ScoreContext, forward_batches, lens_logits, lm_text, option_token_ids


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


def probe_text(mode: str):
    """What a sample looks like to the probe: MCQA mode the lettered prompt, text mode the text."""
    if mode != "mcqa":
        return lm_text

    def lettered(item) -> str:
        if not isinstance(item, MCQAItem):
            raise TabpError("MCQA mode needs MCQA data (question, choices, gold); "
                            "use --mode text for free text")
        return mcqa_lettered_prompt(item)

    return lettered


def _text_positions(length: int, wanted: int, device) -> torch.Tensor:
    """Evenly spaced prediction positions, counted from the right (batches are left padded)."""
    if wanted <= 0 or wanted >= length:
        return torch.arange(length, device=device)
    return torch.linspace(0, length - 1, wanted, device=device).round().long().unique()


@torch.no_grad()
def per_sample_statistics(ctx: ScoreContext) -> torch.Tensor:
    """s_i(n) for i = 0..B (h_0 = embeddings): a (N, B+1) tensor. One forward pass per sample."""
    name = ctx.statistic
    fn = st.STATISTICS[name]
    rows: list[torch.Tensor] = []
    tick = ctx.task(f"probe ({ctx.mode}, {name})", ctx.num_batches())
    for b in forward_batches(ctx, probe_text(ctx.mode), hidden=True, tick=tick):
        hs, items = b.hidden, b.items
        if ctx.mode == "mcqa":
            nmax = max(len(i.choices) for i in items)
            opt_ids = option_token_ids(ctx.tokenizer, nmax)
            last = torch.stack([h[:, -1, :] for h in hs])  # (B+1, N, H), left padded
            logits = lens_logits(ctx, last, opt_ids)  # (B+1, N, C)
            absent = torch.tensor([[j >= len(i.choices) for j in range(nmax)] for i in items],
                                  device=logits.device)
            logits = logits.masked_fill(absent, float("-inf"))
            logp = torch.log_softmax(logits, -1)
            gold = torch.tensor([i.gold for i in items], device=logp.device)
            ref = logp[-1]
            s = torch.stack([fn(logp[i], gold=gold, ref=ref) for i in range(len(hs))], -1)
        else:
            att = b.inputs["attention_mask"]
            # A full-vocabulary read-out at every position of every block is the whole cost of
            # text mode; `text_positions` evenly spaced positions estimate the same average.
            pos = _text_positions(att.shape[1] - 1, ctx.text_positions, att.device)
            valid = (att[:, 1:] * att[:, :-1]).float()[:, pos]  # positions with a real next token
            nxt = b.inputs["input_ids"][:, 1:][:, pos]
            ref = torch.log_softmax(lens_logits(ctx, hs[-1][:, :-1][:, pos]), -1)
            cols = []
            for h in hs:
                logp = torch.log_softmax(lens_logits(ctx, h[:, :-1][:, pos]), -1)
                v = fn(logp, gold=nxt, ref=ref)  # (N, T-1)
                cols.append((v * valid).sum(-1) / valid.sum(-1).clamp_min(1))
                del logp
            s = torch.stack(cols, -1)
        rows.append(s.double().cpu())
    return torch.cat(rows, 0)


class TaBP(ScoringMethod):
    name = "tabp"
    summary = "task-aware: shift of an early-exit statistic across each block (DDF/SSN)"

    def params(self, ctx: ScoreContext) -> dict[str, Any]:
        out: dict[str, Any] = dict(statistic=ctx.statistic, alpha=st.ALPHA[ctx.statistic],
                                   aggregate=ctx.aggregate, p=ctx.p, final_norm=ctx.norm, mode=ctx.mode)
        if ctx.mode == "text":
            out.update(max_length=ctx.max_length, text_positions=ctx.text_positions)
        return out

    def score(self, ctx: ScoreContext) -> MethodResult:
        d = shifts(per_sample_statistics(ctx))
        agg = aggregate(d, ctx.aggregate, st.ALPHA[ctx.statistic], ctx.p)
        scores: list[float | None] = [None] * ctx.num_blocks
        for i in ctx.candidates:
            scores[i] = float(agg[i])
        return MethodResult(scores, lowest(scores, ctx.candidates, ctx.k))
