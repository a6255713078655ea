"""TaBP: per-sample statistics of the early-exit distribution after every block, their shifts
across each block, and the DDF / SSN aggregation of those shifts into one score per block.

At sublayer granularity the early exit is read after every attention and after every MLP (2B + 1
states, probe.ForwardBatch.hidden): 2B shifts, one per sublayer unit, the same statistics and
aggregates."""

from __future__ import annotations

from typing import Any

import torch

from tabp_vllm.data import LETTERS, MCQAItem, TextItem, mcqa_context, mcqa_lettered_prompt
from tabp_vllm.errors import TabpError
from tabp_vllm.scoring import statistics as st
from tabp_vllm.scoring.base import MethodResult, ScoringMethod
from tabp_vllm.scoring.probe import (ScoreContext, forward_batches, lens_logits, lm_text,
                                     option_token_ids)


def shifts(stats: torch.Tensor) -> torch.Tensor:
    """stats (N, B+1): s_0 (embeddings) .. s_B; returns d (N, B) with d_i = s_{i+1} - s_i (the
    shift across unit i, a block or a sublayer)."""
    return stats[:, 1:] - stats[:, :-1]


def ddf(d: torch.Tensor, alpha: int, ties: str = "against") -> torch.Tensor:
    """Directional desirable frequency: share of samples whose shift goes the desirable way.

    `ties="neutral"` counts a shift of exactly 0 as not undesirable, as the official code does (it
    counts undesirable shifts, alpha * d < 0, and removes the blocks with the most)."""
    if ties == "neutral":
        return ((alpha * d) >= 0).double().mean(0)
    return ((alpha * d) > 0).double().mean(0)


def ssn(d: torch.Tensor, p: float = 1.0) -> torch.Tensor:
    """Statistical shift norm: (mean |d|^p)^(1/p)."""
    return (d.double().abs().pow(p).mean(0)).pow(1.0 / p)


def aggregate(d: torch.Tensor, how: str, alpha: int, p: float = 1.0,
              ties: str = "against") -> torch.Tensor:
    if how == "ddf":
        return ddf(d, alpha, ties)
    if how == "ssn":
        return ssn(d, p)
    raise ValueError(f"unknown aggregate {how!r} (ddf or ssn)")


# The official TaBP prompt (Song-haJo/TaBP, main.py and data/preprocessing.py): an instruction
# line, the options as "A. text" lines, and "Answer: " with a trailing space; the probed key tokens
# are the bare letters ("A", no leading space).
PAPER_INSTRUCTION = ("Answer the following multiple choice question by giving the most "
                     "appropriate response.\n")


def paper_prompt(item: MCQAItem) -> str:
    options = "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(item.choices))
    pre = f"{item.context}\n" if item.context else ""
    return f"{PAPER_INSTRUCTION}{pre}Question: {item.question}\n{options}Answer: "


# The run_scoring settings of `--preset paper` (the CLI adds the data: the first 1,024 ARC-Easy
# train questions, used for every task).
PAPER_PRESET: dict[str, Any] = dict(method="tabp", statistic="entropy", aggregate="ddf",
                                    norm=False, probe="letters", block_range="latter")
PROBES = ("auto", "letters", "cloze")


def _mcqa_only(item) -> MCQAItem:
    if not isinstance(item, MCQAItem):
        raise TabpError("MCQA mode needs MCQA data (question, choices, gold); "
                        "use --mode text for free text")
    return item


def probe_text(ctx: ScoreContext):
    """What a sample looks like to the probe: in MCQA mode the lettered prompt (ours or the
    paper's) or the cloze context (`Question: ...\nAnswer:`, as lm-eval scores it); in text mode
    the text."""
    if ctx.mode != "mcqa":
        return lm_text
    if ctx.probe == "cloze":
        return lambda item: mcqa_context(_mcqa_only(item))
    if ctx.preset == "paper":
        return lambda item: paper_prompt(_mcqa_only(item))
    return lambda item: mcqa_lettered_prompt(_mcqa_only(item))


def cloze_token_ids(tok, item: MCQAItem) -> list[int] | None:
    """The first token of each choice's continuation (" " + choice), or None when two choices of
    the item share it (their first-token distribution cannot tell them apart)."""
    ids = [tok.encode(f" {c}", add_special_tokens=False)[0] for c in item.choices]
    return ids if len(set(ids)) == len(ids) else None


def _letter_ids(ctx: ScoreContext, n: int) -> list[int]:
    return option_token_ids(ctx.tokenizer, n, bare=ctx.preset == "paper")


def _text_positions(length: int, wanted: int, device) -> torch.Tensor:
    """Evenly spaced prediction positions, counted from the right (batches are left padded)."""
    if wanted <= 0 or wanted >= length:
        return torch.arange(length, device=device)
    return torch.linspace(0, length - 1, wanted, device=device).round().long().unique()


@torch.no_grad()
def per_sample_statistics(ctx: ScoreContext, answers: list[bool] | None = None) -> torch.Tensor:
    """s_i(n) for i = 0..B (h_0 = embeddings): a (N, B+1) tensor (N, 2B+1 at sublayer
    granularity). One forward pass per sample.

    With `answers` (a list, letters probe), appends per sample whether the model's own output
    picks the gold letter: what `auto` needs to judge the lettered format, from the same pass."""
    name = ctx.statistic
    fn = st.STATISTICS[name]
    rows: list[torch.Tensor] = []
    tick = ctx.task(f"probe ({ctx.mode}, {name})", ctx.num_batches())
    for b in forward_batches(ctx, probe_text(ctx), hidden=True, tick=tick):
        hs, items = b.hidden, b.items
        if ctx.mode == "mcqa":
            nmax = max(len(i.choices) for i in items)
            last = torch.stack([h[:, -1, :] for h in hs])  # (B+1, N, H), left padded
            if ctx.probe == "cloze":
                logits = _cloze_logits(ctx, items, last, nmax)  # (B+1, N, C)
            else:
                ids = _letter_ids(ctx, nmax)
                logits = lens_logits(ctx, last, ids)  # (B+1, N, C)
                if answers is not None:  # the model's real output: final norm, then the head
                    own = ctx.model.lm_head(b.output[:, -1, :])[:, ids].float()
                    answers += [int(own[n, :len(i.choices)].argmax()) == i.gold
                                for n, i in enumerate(items)]
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


def _cloze_logits(ctx: ScoreContext, items: list[MCQAItem], last: torch.Tensor,
                  nmax: int) -> torch.Tensor:
    """Per block, a logit per choice: the early-exit logit of the choice's first token, or, for an
    item whose choices share first tokens, the choice's whole continuation log-likelihood read out
    at that block (one more forward pass per choice of such an item)."""
    out = torch.full((last.shape[0], len(items), nmax), float("-inf"), device=last.device)
    for n, item in enumerate(items):
        ids = cloze_token_ids(ctx.tokenizer, item)
        if ids is not None:
            out[:, n, :len(ids)] = lens_logits(ctx, last[:, n, :], ids)
        else:
            out[:, n, :len(item.choices)] = _continuation_loglik(ctx, item)
    return out


def _continuation_loglik(ctx: ScoreContext, item: MCQAItem) -> torch.Tensor:
    """(B+1, C): sum over a choice's continuation tokens of their early-exit log-probability after
    each block, the lm-eval log-likelihood read out through the logit lens."""
    from dataclasses import replace

    from tabp_vllm.data import Dataset

    context = mcqa_context(item)
    n_ctx = len(ctx.tokenizer(context, add_special_tokens=True)["input_ids"])
    texts = [TextItem(f"{context} {c}") for c in item.choices]
    sub = replace(ctx, dataset=Dataset("cloze-fallback", "", "text", texts), forward_passes=0)
    cols = []
    for b in forward_batches(sub, lm_text, hidden=True):
        ids, att = b.inputs["input_ids"], b.inputs["attention_mask"]
        for r in range(ids.shape[0]):
            length = int(att[r].sum())
            n_cont = max(1, length - n_ctx)
            pos = torch.arange(ids.shape[1] - n_cont - 1, ids.shape[1] - 1, device=ids.device)
            target = ids[r, pos + 1]
            per_block = [torch.log_softmax(lens_logits(ctx, h[r, pos]), -1)
                         .gather(-1, target[:, None]).sum() for h in b.hidden]
            cols.append(torch.stack(per_block))
    ctx.forward_passes += sub.forward_passes
    return torch.stack(cols, -1)  # (B+1, C)


def judge_letters(answers: list[bool], items: list[MCQAItem]) -> dict[str, Any]:
    """`auto`: letters only when the model's accuracy in the lettered format is clearly above
    chance (more than two binomial standard errors), else cloze. Recorded in the mask."""
    n = len(items)
    acc = sum(answers) / n
    chance = sum(1.0 / len(i.choices) for i in items) / n
    bar = chance + 2 * (chance * (1 - chance) / n) ** 0.5
    return {"lettered_accuracy": round(acc, 4), "chance": round(chance, 4), "n": n,
            "letters_if_above": round(bar, 4), "choice": "letters" if acc > bar else "cloze"}


class TaBP(ScoringMethod):
    """One forward pass per sample (`forward_passes`); the `auto` probe adds a second pass per
    sample when it finds the lettered format at chance and switches to cloze."""

    name = "tabp"
    summary = "task-aware: shift of an early-exit statistic across each block (DDF/SSN)"

    def params(self, ctx: ScoreContext) -> dict[str, Any]:
        out: dict[str, Any] = dict(statistic=ctx.statistic, alpha=st.ALPHA[ctx.statistic],
                                   aggregate=ctx.aggregate, p=ctx.p, final_norm=ctx.norm, mode=ctx.mode)
        if ctx.mode == "mcqa":
            out.update(probe=ctx.probe, ddf_ties=self.ties(ctx))
            if ctx.preset:
                out.update(preset=ctx.preset, prompt="paper" if ctx.preset == "paper" else "ours")
            if ctx.probe_measurement:
                out["probe_auto"] = ctx.probe_measurement
        if ctx.mode == "text":
            out.update(max_length=ctx.max_length, text_positions=ctx.text_positions)
        return out

    @staticmethod
    def ties(ctx: ScoreContext) -> str:
        return "neutral" if ctx.preset == "paper" else "against"

    def score(self, ctx: ScoreContext) -> MethodResult:
        if ctx.mode == "mcqa" and ctx.probe == "auto":
            # Probe letters and judge the format in one pass; a second pass only if cloze wins.
            ctx.probe, answers = "letters", []
            stats = per_sample_statistics(ctx, answers)
            ctx.probe_measurement = judge_letters(answers, ctx.dataset.items)
            if ctx.probe_measurement["choice"] == "cloze":
                ctx.probe = "cloze"
                stats = per_sample_statistics(ctx)
        else:
            stats = per_sample_statistics(ctx)
        d = shifts(stats)
        agg = aggregate(d, ctx.aggregate, st.ALPHA[ctx.statistic], ctx.p, self.ties(ctx))
        scores: list[float | None] = [None] * ctx.num_units
        for u in ctx.candidates:
            scores[u] = float(agg[u])
        return MethodResult(scores, ctx.remove_lowest(scores))
