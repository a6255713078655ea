"""Every block-scoring method behind one signature: `fn(ctx) -> MethodResult`.

`scores[i]` is block i's importance (higher = keep); None for blocks outside the candidate range
(or not scored). `removed` are the k blocks the method takes out.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from tabp_vllm.scoring import statistics as st
from tabp_vllm.scoring.probe import (ScoreContext, calibration_nll, hidden_states, lens_logits,
                                     option_token_ids, probe_batches)
from tabp_vllm.scoring.tabp import aggregate, shifts


@dataclass
class MethodResult:
    scores: list[float | None]
    removed: list[int]


def _lowest(scores: list[float | None], candidates: list[int], k: int) -> list[int]:
    ranked = sorted(candidates, key=lambda i: (scores[i], i))
    return sorted(ranked[:k])


def _valid_mask(att: torch.Tensor) -> torch.Tensor:
    return att.bool()


# --------------------------------------------------------------------------- TaBP

@torch.no_grad()
def per_sample_statistics(ctx: ScoreContext) -> torch.Tensor:
    """s_i(n) for i = 0..B (h_0 = embeddings): a (N, B+1) tensor. One forward pass per sample."""
    name = ctx.statistic
    fn = st.STATISTICS[name]
    rows: list[torch.Tensor] = []
    tick = ctx.task(f"probe ({ctx.mode}, {name})", ctx.num_batches())
    opt_ids = None
    for batch, items in probe_batches(ctx):
        hs = hidden_states(ctx, batch)
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
            att = batch["attention_mask"]
            # A full-vocabulary read-out at every position of every block is the whole cost of
            # text mode; `text_positions` evenly spaced positions estimate the same average.
            pos = _text_positions(att.shape[1] - 1, ctx.text_positions, att.device)
            valid = (att[:, 1:] * att[:, :-1]).float()[:, pos]  # positions with a real next token
            nxt = batch["input_ids"][:, 1:][:, pos]
            ref = torch.log_softmax(lens_logits(ctx, hs[-1][:, :-1][:, pos]), -1)
            cols = []
            for h in hs:
                logp = torch.log_softmax(lens_logits(ctx, h[:, :-1][:, pos]), -1)
                v = fn(logp, gold=nxt, ref=ref)  # (N, T-1)
                cols.append((v * valid).sum(-1) / valid.sum(-1).clamp_min(1))
                del logp
            s = torch.stack(cols, -1)
        rows.append(s.double().cpu())
        tick(1)
    return torch.cat(rows, 0)


def _text_positions(length: int, wanted: int, device) -> torch.Tensor:
    """Evenly spaced prediction positions, counted from the right (batches are left padded)."""
    if wanted <= 0 or wanted >= length:
        return torch.arange(length, device=device)
    return torch.linspace(0, length - 1, wanted, device=device).round().long().unique()


def tabp(ctx: ScoreContext) -> MethodResult:
    stats = per_sample_statistics(ctx)
    d = shifts(stats)
    agg = aggregate(d, ctx.aggregate, st.ALPHA[ctx.statistic], ctx.p)
    scores: list[float | None] = [None] * ctx.num_blocks
    for i in ctx.candidates:
        scores[i] = float(agg[i])
    ctx.extra["stat_mean"] = [float(x) for x in stats.mean(0)]
    return MethodResult(scores, _lowest(scores, ctx.candidates, ctx.k))


# --------------------------------------------------------------------------- similarity baselines

def _text_batches(ctx: ScoreContext):
    from tabp_vllm.scoring.probe import _encode, lm_text
    items = ctx.dataset.items
    for s in range(0, len(items), ctx.batch_size):
        yield _encode(ctx, [lm_text(i) for i in items[s:s + ctx.batch_size]])


@torch.no_grad()
def block_influence(ctx: ScoreContext) -> MethodResult:
    """ShortGPT: BI_i = 1 - mean over tokens of cos(h_i, h_{i+1}); remove the lowest."""
    B = ctx.num_blocks
    sums = torch.zeros(B, dtype=torch.float64)
    count = 0
    tick = ctx.task("block influence", ctx.num_batches())
    for batch in _text_batches(ctx):
        hs = hidden_states(ctx, batch)
        valid = batch["attention_mask"].bool()
        for i in range(B):
            cos = torch.nn.functional.cosine_similarity(hs[i].float(), hs[i + 1].float(), dim=-1)
            sums[i] += float((1 - cos)[valid].double().sum())
        count += int(valid.sum())
        tick(1)
    bi = (sums / max(count, 1)).tolist()
    scores = [bi[i] if i in ctx.candidates else None for i in range(B)]
    return MethodResult(scores, _lowest(scores, ctx.candidates, ctx.k))


@torch.no_grad()
def angular(ctx: ScoreContext) -> MethodResult:
    """Gromov et al.: d(l, n) = arccos(cos(h_l, h_{l+n}))/pi on the last token, n = k; remove the
    contiguous run l .. l+n-1 (inside the candidate range) with the smallest mean distance."""
    B, n = ctx.num_blocks, ctx.k
    sums = torch.zeros(B + 1, dtype=torch.float64)
    N = 0
    tick = ctx.task("angular distance", ctx.num_batches())
    for batch in _text_batches(ctx):
        hs = hidden_states(ctx, batch)
        for l in range(0, B - n + 1):
            cos = torch.nn.functional.cosine_similarity(hs[l][:, -1].float(), hs[l + n][:, -1].float(), dim=-1)
            sums[l] += float((torch.arccos(cos.clamp(-1, 1)) / math.pi).double().sum())
        N += batch["input_ids"].shape[0]
        tick(1)
    cand = set(ctx.candidates)
    scores: list[float | None] = [None] * B
    for l in range(0, B - n + 1):
        if all(j in cand for j in range(l, l + n)):
            scores[l] = float(sums[l] / max(N, 1))
    starts = [l for l in range(B) if scores[l] is not None]
    if not starts:
        return MethodResult(scores, last_k(ctx).removed)
    best = min(starts, key=lambda l: (scores[l], l))
    return MethodResult(scores, list(range(best, best + n)))


# --------------------------------------------------------------------------- perplexity baselines

def sleb(ctx: ScoreContext) -> MethodResult:
    """SLEB: k rounds; each removes the block whose removal gives the lowest calibration PPL.
    Score of a block = the log-PPL measured when it was chosen / last evaluated (lower = remove)."""
    removed: set[int] = set()
    scores: list[float | None] = [None] * ctx.num_blocks
    remaining = list(ctx.candidates)
    total = sum(len(remaining) - r for r in range(ctx.k)) * ctx.num_batches()
    tick = ctx.task("SLEB", total)
    order = []
    for _ in range(ctx.k):
        best, best_nll = None, math.inf
        for b in remaining:
            nll = calibration_nll(ctx, removed | {b}, tick)
            scores[b] = nll
            if nll < best_nll:
                best, best_nll = b, nll
        removed.add(best)
        remaining.remove(best)
        order.append(best)
    ctx.extra["removal_order"] = order
    # importance: higher log-PPL when removed = more important; chosen blocks keep their round's value
    return MethodResult(scores, sorted(removed))


def ppl(ctx: ScoreContext) -> MethodResult:
    """Shortened LLaMA (PPL criterion): log-PPL with block i alone removed; remove the lowest."""
    scores: list[float | None] = [None] * ctx.num_blocks
    tick = ctx.task("PPL sensitivity", len(ctx.candidates) * ctx.num_batches())
    for b in ctx.candidates:
        scores[b] = calibration_nll(ctx, {b}, tick)
    return MethodResult(scores, _lowest(scores, ctx.candidates, ctx.k))


def random_blocks(ctx: ScoreContext) -> MethodResult:
    rng = random.Random(ctx.seed)
    scores: list[float | None] = [None] * ctx.num_blocks
    for i in ctx.candidates:
        scores[i] = rng.random()
    return MethodResult(scores, _lowest(scores, ctx.candidates, ctx.k))


def last_k(ctx: ScoreContext) -> MethodResult:
    scores: list[float | None] = [None] * ctx.num_blocks
    for i in ctx.candidates:
        scores[i] = float(ctx.num_blocks - i)  # later blocks score lower: removed first
    return MethodResult(scores, sorted(ctx.candidates)[-ctx.k:])


METHODS = {
    "tabp": tabp,
    "block_influence": block_influence,
    "angular": angular,
    "sleb": sleb,
    "ppl": ppl,
    "random": random_blocks,
    "last_k": last_k,
}
